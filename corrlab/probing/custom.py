"""Probing and adapting attention that is not diffusers': the extension point.

corrlab taps an attention layer in two steps, and a model outside diffusers (an ldm/SGM-style UNet as in
SyncDreamer, a research codebase, your own module) supplies both:

1. **Where q, k, v and the output are** (:func:`register_attention_module`). diffusers processors call
   ``F.scaled_dot_product_attention`` (or ``dispatch_attention_fn``), which corrlab intercepts. Modules
   that compute attention themselves (``einsum`` + ``softmax``) have no such call: register their type
   with a :class:`ProjectionSpec` naming the q / k / v projection sub-modules and the output projection.
   corrlab then reads q, k, v as those projections' outputs (``(B, S, heads*d)``, heads-major), the
   attention output as the output projection's input, and writes CorrAdapter's result there (before the
   projection, per head, as both releases do). Observing leaves outputs bit-identical.
2. **Which layers are multi-image, and their token layout** (:func:`register_family`). Subclass
   :class:`Family`: ``matches(model)`` recognises the denoiser; ``layers(model)`` lists
   ``(name, module, kind)`` of its multi-image attention layers (stable names, e.g.
   ``"output_blocks.9.1.transformer_blocks.0.attn1"``); ``read_forward(model, arguments)`` reads the
   shapes the layout needs from the denoiser's forward arguments (sizes only); ``image_tokens(state, q,
   group_size, scale, kind, k)`` returns an :class:`ImageTokens` saying where the V images' tokens sit in
   ``q (Bk, heads, S, d)``: ``"sequence"`` (V images in one sequence), ``"batch"`` (images as groups of
   batch entries) or ``"rows"`` (row-wise multi-view attention, ``TokenLayout(..., row_wise=True)``).
   Set ``timestep_argument`` if the forward names its timestep differently (ldm: ``"timesteps"``).

Worked example (an ldm-style ``CrossAttention`` inside a denoiser holding V views in one sequence; the
full, tested version is ``tests/test_custom_attention.py``)::

    register_attention_module(CrossAttention, q="to_q", k="to_k", v="to_v", out="to_out",
                              heads="heads", scale="scale")

    class MyFamily(Family):
        name = "my_ldm"
        timestep_argument = "timesteps"

        def matches(self, model):
            return isinstance(model, MyMultiViewUNet)

        def layers(self, model):
            return [(f"output_blocks.{i}.attn1", b.attn1, self.name) for i, b in enumerate(model.output_blocks)]

        def read_forward(self, model, arguments):
            x = arguments["x"]                                   # (B, V, C, h, w)
            return {"views": x.shape[1], "grid": (x.shape[3], x.shape[4])}

        def image_tokens(self, state, q, group_size, scale, kind, k=None):
            h, w = state["grid"]
            layout = TokenLayout(state["views"], (h, w), (int(h * scale), int(w * scale)))
            return ImageTokens(layout, "sequence")

    register_family(MyFamily())
    with corrlab.probe(model, steps=[0]) as rec: model(x, timesteps=t)       # probes work
    with corr_adapter(model, eta=0.1): model(x, timesteps=t)                 # and CorrAdapter

Both registrations are process-wide; undo them with :func:`unregister_attention_module` and
:func:`unregister_family`.
"""
from .interception import ProjectionSpec, projection_spec, register_attention_module, unregister_attention_module
from .layouts import Family, ImageTokens, TokenLayout, register_family, unregister_family

__all__ = [
    "ProjectionSpec",
    "register_attention_module",
    "unregister_attention_module",
    "projection_spec",
    "Family",
    "ImageTokens",
    "TokenLayout",
    "register_family",
    "unregister_family",
]
