"""Capture the queries and keys of multi-image attention layers during an ordinary generation.

The explorer's similarity heat maps and joint PCA view need the layer's own q and k, which a
:class:`~corrlab.probing` record does not keep (it keeps matches). :func:`capture_queries_keys`
adds forward hooks on ``<layer>.to_q`` / ``<layer>.to_k`` (diffusers ``Attention``) and a forward
pre-hook on the model that counts denoising steps (one model call per step: the pipelines batch
classifier-free guidance into one call); every hook is removed on exit, also on exceptions, so the
model and its outputs are unchanged.

Token layout (the embedded model's, ``docs/architecture.md``): the sequence ``(B, V*h*w, C)`` is
view-major then row-major; ``C = heads * d``.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from ..errors import CorrlabError, describe

__all__ = ["QueryKeyCapture", "capture_queries_keys"]


@dataclass
class QueryKeyCapture:
    """Captured ``queries[(layer, step)]`` and ``keys[(layer, step)]``, each ``(V, heads, h, w, d)`` float32.

    Only batch entry ``batch_index`` is kept (entry 0 is the first prompt's conditional branch).
    ``grid = (h, w)`` is the token grid, ``steps_seen`` the number of model calls observed.
    """

    queries: dict = field(default_factory=dict)
    keys: dict = field(default_factory=dict)
    grid: tuple[int, int] | None = None
    num_views: int | None = None
    steps_seen: int = 0

    def key_features(self, layer: str, step: int) -> torch.Tensor:
        """``(V, h, w, heads * d)`` keys of one layer and step (heads concatenated), for the PCA view."""
        k = self._get(self.keys, layer, step, "keys")
        V, n_heads, h, w, d = k.shape
        return k.permute(0, 2, 3, 1, 4).reshape(V, h, w, n_heads * d)

    def query(self, layer: str, step: int, view: int, row: int, col: int) -> torch.Tensor:
        """``(heads, d)`` query of the token at ``(row, col)`` of ``view``."""
        q = self._get(self.queries, layer, step, "queries")
        V, _, h, w, _ = q.shape
        if not (0 <= view < V and 0 <= row < h and 0 <= col < w):
            raise CorrlabError(f"view, row, col: expected a token in {V} views of {h} x {w}, got ({view}, {row}, {col})")
        return q[view, :, row, col]

    def view_keys(self, layer: str, step: int, view: int) -> torch.Tensor:
        """``(heads, h, w, d)`` keys of one view."""
        k = self._get(self.keys, layer, step, "keys")
        if not 0 <= view < k.shape[0]:
            raise CorrlabError(f"view: expected an index in [0, {k.shape[0] - 1}], got {view}")
        return k[view]

    def _get(self, store: dict, layer: str, step: int, what: str) -> torch.Tensor:
        if (layer, step) not in store:
            have = sorted({s for (_, s) in store})
            raise CorrlabError(
                f"layer, step: expected a captured pair, got ({layer!r}, {step!r}); {what} were captured for "
                f"layers {sorted({l for (l, _) in store})} at steps {have}"
            )
        return store[(layer, step)]


def _model_of(model_or_pipeline):
    model = getattr(model_or_pipeline, "model", model_or_pipeline)
    if not isinstance(model, torch.nn.Module):
        raise CorrlabError(f"model_or_pipeline: expected a torch model or a CorrlabPipeline, got {describe(model_or_pipeline)}")
    return model


@contextmanager
def capture_queries_keys(model_or_pipeline, layers: Iterable[str], steps: Iterable[int] | None = None,
                         batch_index: int = 0) -> Iterator[QueryKeyCapture]:
    """Record q and k of ``layers`` (e.g. ``["blocks.3.attn"]``) at denoising ``steps`` (None = all).

    Use around an unchanged generation call::

        with capture_queries_keys(pipe, ["blocks.5.attn"], steps=[0, 9]) as cap:
            mvs = pipe("red box", seed=0, num_inference_steps=10)
        cap.key_features("blocks.5.attn", 9)   # (V, h, w, C)
    """
    model = _model_of(model_or_pipeline)
    modules = dict(model.named_modules())
    layers = list(layers)
    for name in layers:
        mod = modules.get(name)
        if mod is None or not hasattr(mod, "to_q") or not hasattr(mod, "to_k"):
            attn = [n for n, m in modules.items() if hasattr(m, "to_q") and hasattr(m, "to_k")]
            raise CorrlabError(f"layers: expected attention module names such as {attn[:4]}, got {name!r}")
    wanted = None if steps is None else {int(s) for s in steps}
    patch = int(getattr(getattr(model, "config", None), "patch_size", 1) or 1)
    cap = QueryKeyCapture()
    state = {"step": -1, "shape": None}

    def pre_hook(_module, args, kwargs):
        sample = kwargs.get("sample", args[0] if args else None)
        state["step"] += 1
        cap.steps_seen = state["step"] + 1
        if sample is None or sample.ndim != 5:
            raise CorrlabError(f"sample: expected a (B, V, C, H, W) model input, got {describe(sample)}")
        _, V, _, H, W = sample.shape
        state["shape"] = (V, H // patch, W // patch)
        cap.grid, cap.num_views = (H // patch, W // patch), V

    def make_hook(layer: str, store: dict, attn):
        def hook(_module, _inputs, output):
            step = state["step"]
            if state["shape"] is None or (wanted is not None and step not in wanted):
                return
            V, h, w = state["shape"]
            heads = int(attn.heads)
            x = output[batch_index].detach().float().cpu()  # (V*h*w, heads*d)
            store[(layer, step)] = x.reshape(V, h, w, heads, -1).permute(0, 3, 1, 2, 4).contiguous()
        return hook

    handles = [model.register_forward_pre_hook(pre_hook, with_kwargs=True)]
    try:
        for name in layers:
            attn = modules[name]
            handles.append(attn.to_q.register_forward_hook(make_hook(name, cap.queries, attn)))
            handles.append(attn.to_k.register_forward_hook(make_hook(name, cap.keys, attn)))
        yield cap
    finally:
        for h in handles:
            h.remove()
