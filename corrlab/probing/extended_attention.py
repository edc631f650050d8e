"""Multi-image self-attention for single-image diffusers models, and an MVDream-style UNet processor.

Both group the batch: groups of ``num_images`` consecutive batch entries are the images of one set
(a pipeline's classifier-free-guidance batch ``[uncond x N, cond x N]`` keeps groups intact when N is a
multiple of ``num_images``). Inside a group, every image's queries attend to the image tokens of all
images of the group:

* without text tokens (UNet ``attn1``) this is joint attention over the group's concatenated sequence,
  ``(B*V, heads, S, d) -> (B, heads, V*S, d)``, one kernel call;
* with leading text tokens (Flux: ``[text, image]`` in every sequence) image ``i`` attends to
  ``[its own text tokens, the image tokens of all V images]``; text tokens of other images stay out.

``num_images = 1`` leaves the kernel call untouched, so the model is reproduced exactly.

* :func:`extended_attention` switches a model's self-attention layers to this for the duration of a
  ``with`` block (forward hooks; processors are never replaced, nothing lands in ``state_dict``).
* :class:`MultiViewAttnProcessor` is the same thing as a permanent ``attn1`` processor of a
  ``UNet2DConditionModel`` (a multi-view UNet whose views are batch entries); install it with
  ``unet.set_attn_processor(multiview_attention_processors(unet, num_views))``.

Both are *structural* interceptors (:mod:`corrlab.probing.interception`): probes attached with
:class:`~corrlab.probing.taps.AttentionTaps` see each image's own q / k / v and the grouped output, as
``num_images`` images per group.
"""
from __future__ import annotations

import threading
from typing import Any

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from ..errors import CorrlabError, ShapeError, ValueRangeError, describe
from . import interception
from .layouts import find_denoisers

__all__ = [
    "GroupAttention",
    "ExtendedAttention",
    "extended_attention",
    "MultiViewAttnProcessor",
    "multiview_attention_processors",
]


def _check_num_images(num_images: Any) -> int:
    if not isinstance(num_images, int) or isinstance(num_images, bool) or num_images < 1:
        raise ValueRangeError(f"num_images: expected a positive integer, got {num_images!r}")
    return num_images


class GroupAttention:
    """Structural interceptor: queries of each image attend to the image tokens of its whole group.

    ``text_tokens()`` returns how many leading (text) tokens every sequence holds (0 for UNets); they stay
    private to their image. Kernel tensors are ``(B*V, heads, text + S, d)``.
    """

    structural = True

    def __init__(self, num_images: int, text_tokens=lambda: 0, image_tokens=lambda: None):
        self.num_images = _check_num_images(num_images)
        self.text_tokens = text_tokens
        self.image_tokens = image_tokens

    def __call__(self, call, q, k, v, proceed):
        V = self.num_images
        if V == 1:
            return proceed(q, k, v)
        if call.attn_mask is not None or call.is_causal:
            raise CorrlabError(
                f"attn_mask: multi-image attention over groups of {V} needs an unmasked, non-causal self-attention "
                f"kernel call, got attn_mask={describe(call.attn_mask)}, is_causal={call.is_causal}"
            )
        Bk, H, L, d = q.shape
        T = int(self.text_tokens())
        S = L - T
        expected_s = self.image_tokens()
        if Bk % V or k.shape[2] != L or S <= 0 or (expected_s is not None and S != expected_s):
            raise ShapeError(
                f"q: expected a self-attention kernel call of shape (B*{V}, heads, {T} + S, d) with matching keys"
                f"{'' if expected_s is None else f' and S = {expected_s}'}, got q {describe(q)} and k {describe(k)}"
            )
        B = Bk // V

        def joint(x: torch.Tensor) -> torch.Tensor:  # (B*V, H, T+S, d) image part -> (B, H, V*S, d)
            return x[:, :, T:].unflatten(0, (B, V)).transpose(1, 2).reshape(B, H, V * S, x.shape[-1])

        if T == 0:
            out = proceed(joint(q), joint(k), joint(v))  # (B, H, V*S, d)
            return out.unflatten(2, (V, S)).transpose(1, 2).reshape(Bk, H, S, out.shape[-1])

        def extended(x: torch.Tensor) -> torch.Tensor:  # -> (B*V, H, T + V*S, d): own text, all images
            images = joint(x).unsqueeze(1).expand(B, V, H, V * S, x.shape[-1]).reshape(Bk, H, V * S, x.shape[-1])
            return torch.cat([x[:, :, :T], images], dim=2)

        return proceed(q, extended(k), extended(v))


class _ForwardShapes:
    """Forward pre-hook on a denoiser remembering its text length and image-token count (Flux)."""

    def __init__(self, module: Any):
        self.text, self.image = 0, None
        self.owner = threading.get_ident()  # calls in other threads are not grouped (see interception)
        self._handle = module.register_forward_pre_hook(self._read, with_kwargs=True)

    def _read(self, module, args, kwargs):
        if threading.get_ident() != self.owner:
            return
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if text is None or hidden is None:
            raise CorrlabError(
                "encoder_hidden_states: extended attention on Flux needs the transformer called with "
                "hidden_states and encoder_hidden_states"
            )
        self.text, self.image = int(text.shape[1]), int(hidden.shape[1])

    def remove(self) -> None:
        self._handle.remove()


class ExtendedAttention:
    """Extended attention on a model, not yet attached: ``with`` it, or :meth:`attach` / :meth:`remove`.

    Construction validates the model and attaches nothing (no side effects); :meth:`attach` registers the
    hooks (calls in the attaching thread are grouped, see :mod:`corrlab.probing.interception`) and
    returns this object as the handle; :meth:`remove` detaches (idempotent). Not re-entrant.
    """

    def __init__(self, model_or_pipeline: Any, num_images: int):
        self.num_images = _check_num_images(num_images)
        self._denoisers = find_denoisers(model_or_pipeline)
        for denoiser in self._denoisers:
            family = denoiser.family.name
            if family not in ("unet_self", "flux"):
                raise CorrlabError(
                    f"model_or_pipeline: extended attention supports single-image UNet2DConditionModel and "
                    f"FluxTransformer2DModel denoisers, got a {family} denoiser ({type(denoiser.module).__name__}), "
                    f"which already attends across images"
                )
        self._handles: list = []
        self._attached = False

    @property
    def attached(self) -> bool:
        return self._attached

    def attach(self) -> "ExtendedAttention":
        """Attach to the model; returns this object (the handle). Raises if already attached."""
        if self._attached:
            raise CorrlabError("ExtendedAttention: already attached; remove() it first or use a new one")
        self._attached = True
        try:
            for d in self._denoisers:
                self._attach(d)
        except BaseException:
            self.remove()
            raise
        return self

    def _attach(self, denoiser) -> None:
        if denoiser.family.name == "unet_self":
            group = GroupAttention(self.num_images)
        else:  # flux (checked in __init__)
            shapes = _ForwardShapes(denoiser.module)
            self._handles.append(shapes)
            group = GroupAttention(self.num_images, lambda: shapes.text, lambda: shapes.image)
        for _, module, _ in denoiser.family.layers(denoiser.module):
            self._handles.append(interception.attach(module, group))

    def remove(self) -> None:
        """Detach from the model (idempotent)."""
        while self._handles:
            self._handles.pop().remove()
        self._attached = False

    def __enter__(self) -> "ExtendedAttention":
        return self.attach()

    def __exit__(self, *exc) -> bool:
        self.remove()
        return False


def extended_attention(model_or_pipeline: Any, num_images: int) -> ExtendedAttention:
    """Make a single-image model's self-attention layers attend across groups of ``num_images`` images.

    Use as ``with extended_attention(pipe.unet, 4): pipe(prompt, num_images_per_prompt=4)``; the model is
    restored when the block ends (also on exceptions). Without ``with``, nothing is attached until
    ``handle = extended_attention(...).attach()``; ``handle.remove()`` restores the model.
    Supported: ``UNet2DConditionModel`` (``attn1`` layers) and ``FluxTransformer2DModel`` (all attention
    layers, text tokens kept per image), or pipelines holding them.
    """
    return ExtendedAttention(model_or_pipeline, num_images)


class MultiViewAttnProcessor(AttnProcessor2_0):
    """``AttnProcessor2_0`` whose self-attention runs jointly over groups of ``num_views`` batch entries.

    For a ``UNet2DConditionModel``'s ``attn1`` layers: hidden states ``(B*V, h*w, C)``, each view's
    queries attend to the keys of all V views of its group (MVDream / MV-Adapter style). Not an
    ``nn.Module``, so it adds nothing to ``state_dict``.
    """

    def __init__(self, num_views: int):
        super().__init__()
        self.num_views = _check_num_images(num_views)
        self._group = GroupAttention(self.num_views)

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):
        if encoder_hidden_states is not None:
            raise CorrlabError(
                f"encoder_hidden_states: MultiViewAttnProcessor is for self-attention layers (attn1), got "
                f"{describe(encoder_hidden_states)}"
            )
        with interception.intercepting(attn, self._group):
            return super().__call__(attn, hidden_states, None, attention_mask, temb, *args, **kwargs)


def multiview_attention_processors(unet: Any, num_views: int) -> dict[str, Any]:
    """A fresh processor dict for ``unet.set_attn_processor``: ``attn1`` layers get
    :class:`MultiViewAttnProcessor` (one shared instance), every other layer keeps its processor."""
    from diffusers import UNet2DConditionModel

    if not isinstance(unet, UNet2DConditionModel):
        raise CorrlabError(f"unet: expected a UNet2DConditionModel, got {type(unet).__name__}")
    processor = MultiViewAttnProcessor(num_views)
    self_layers = {
        name + ".processor"
        for name, m in unet.named_modules()
        if name.endswith(".attn1") and not m.is_cross_attention
    }
    return {key: (processor if key in self_layers else p) for key, p in unet.attn_processors.items()}
