"""An attention cache read off the taps: the q and k of chosen layers and steps, kept for later views.

The TransformerLens ``ActivationCache`` is the model: values keyed by stable hook names. Here the hook
points are the multi-image attention layers' stable names (:func:`corrlab.probing.taps.list_layers`), the
hooks are ``hook_q`` and ``hook_k`` and a key carries the step of the taps' step clock::

    with cache_attention(pipe, ["blocks.4.attn"], steps=[0, 9]) as cache:
        mvs = pipe("red box", seed=0, num_inference_steps=10)
    cache["blocks.4.attn.hook_k", 9]        # (V, heads, h*w, d), image tokens, one batch entry
    cache.layout("blocks.4.attn", 9)        # TokenLayout: grid, image size, row-wise or not

It reads attention only through :class:`corrlab.probing.taps.AttentionTaps`, so it works for every model
family the taps support (the embedded models, Wan, UNets and Flux under extended attention), and it uses
the taps' steps (:class:`corrlab.probing.taps.StepClock`) and the probe's choice of the conditional batch
entry (:func:`conditional_batch_entry`), so a cache and a probe record of the same generation name the
same (layer, step) cells. Only the first call of a layer within a step is kept (as in the probe). Tensors
are detached float32 copies on the CPU: memory grows by ``2 x V x heads x h*w x d`` values per kept cell.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from ..errors import CorrlabError, ValueRangeError, describe
from .layouts import TokenLayout
from .taps import AttentionCall, AttentionTaps

__all__ = ["CachedAttention", "AttentionCache", "cache_attention", "conditional_batch_entry", "HOOKS"]

#: Hook names of a cached layer: ``f"{layer}.{hook}"``.
HOOKS = ("hook_q", "hook_k")


def is_corrlab_model(model_or_pipeline: Any) -> bool:
    """Whether ``model_or_pipeline`` is corrlab's embedded pipeline or model (CFG batched ``[cond, uncond]``).

    Read from the class attribute ``corrlab_embedded`` that :class:`corrlab.model.CorrlabPipeline`,
    :class:`~corrlab.model.MultiViewDiT` and :class:`~corrlab.model.MultiViewUNet` set, so capture code
    does not import the model package (the model's tracking evaluation imports the probe).
    """
    return bool(getattr(type(model_or_pipeline), "corrlab_embedded", False))


def conditional_batch_entry(model_or_pipeline: Any, batch: int, batch_index: int | None,
                            corrlab_model: bool | None = None) -> int:
    """The batch entry of a tapped call to read: ``batch_index`` if given (negative counts from the end),
    else the conditional branch: 0 for corrlab's pipeline (``[cond, uncond]``); for a diffusers pipeline
    whose ``do_classifier_free_guidance`` is true, the first entry of the second half (``[uncond, cond]``);
    otherwise 0. ``corrlab_model`` caches the type check (None: checked here)."""
    b = batch_index
    if b is None:
        corrlab = is_corrlab_model(model_or_pipeline) if corrlab_model is None else corrlab_model
        cfg = bool(getattr(model_or_pipeline, "do_classifier_free_guidance", False)) and not corrlab
        b = batch // 2 if cfg and batch % 2 == 0 else 0
    if not -batch <= b < batch:
        raise ValueRangeError(f"batch_index: expected an index into the layer's batch of {batch}, got {b}")
    return b % batch


def check_steps(steps) -> list[int] | None:
    """``steps`` as a sorted list of distinct step indices (an int is one step; None stays None)."""
    if steps is None:
        return None
    if isinstance(steps, int) and not isinstance(steps, bool):
        steps = [steps]
    if isinstance(steps, (str, bytes)) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in steps):
        raise ValueRangeError(f"steps: expected None or a list of step indices >= 0, got {describe(steps)}")
    return sorted(set(steps))


@dataclass(frozen=True)
class CachedAttention:
    """One cached (layer, step): ``q``, ``k`` ``(V, heads, h*w, d)`` float32 image tokens of one batch entry,
    the kernel's softmax ``scale``, the ``layout`` and the denoiser's ``timestep`` (None if unknown)."""

    q: torch.Tensor
    k: torch.Tensor
    scale: float
    layout: TokenLayout
    timestep: float | None


class AttentionCache:
    """Cached q and k by ``(layer, step)``; see the module docstring.

    ``cache[f"{layer}.hook_q", step]`` / ``cache[f"{layer}.hook_k", step]`` give ``(V, heads, h*w, d)``;
    ``(layer, step) in cache`` tells whether a cell was kept; :meth:`entry` gives the whole
    :class:`CachedAttention`. The views :meth:`query`, :meth:`view_keys` and :meth:`key_features` are the
    shapes the widgets draw.
    """

    def __init__(self) -> None:
        self.entries: dict[tuple[str, int], CachedAttention] = {}

    def __contains__(self, key: Any) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def keys(self) -> list[tuple[str, int]]:
        """The cached ``(layer, step)`` cells, in caching order."""
        return list(self.entries)

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(layer for layer, _ in self.entries))

    @property
    def steps(self) -> list[int]:
        return sorted({step for _, step in self.entries})

    def __getitem__(self, key: tuple[str, int]) -> torch.Tensor:
        if not (isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], str)):
            raise CorrlabError(f"key: expected (f'{{layer}}.hook_q' or '.hook_k', step), got {key!r}")
        name, step = key
        layer, _, hook = name.rpartition(".")
        if hook not in HOOKS:
            raise CorrlabError(f"key: expected a hook name ending in one of {HOOKS}, got {name!r}")
        e = self.entry(layer, step)
        return e.q if hook == "hook_q" else e.k

    def entry(self, layer: str, step: int) -> CachedAttention:
        """The :class:`CachedAttention` of ``(layer, step)``; a clear error names what was cached otherwise."""
        e = self.entries.get((layer, step))
        if e is None:
            raise CorrlabError(
                f"layer, step: expected a cached pair, got ({layer!r}, {step!r}); cached layers {self.layers} "
                f"at steps {self.steps}"
            )
        return e

    def layout(self, layer: str, step: int) -> TokenLayout:
        return self.entry(layer, step).layout

    def scale(self, layer: str, step: int) -> float:
        return self.entry(layer, step).scale

    def _image(self, e: CachedAttention, view: int) -> None:
        V = e.layout.num_images
        if isinstance(view, bool) or not isinstance(view, int) or not 0 <= view < V:
            raise CorrlabError(f"view: expected an image index in [0, {V - 1}], got {view!r}")

    def query(self, layer: str, step: int, view: int, row: int, col: int) -> torch.Tensor:
        """``(heads, d)`` query of the token at ``(row, col)`` of image ``view``."""
        e = self.entry(layer, step)
        self._image(e, view)
        h, w = e.layout.grid
        if not (0 <= row < h and 0 <= col < w):
            raise CorrlabError(f"row, col: expected a token of the {h} x {w} grid, got ({row}, {col})")
        return e.q[view, :, row * w + col]

    def view_keys(self, layer: str, step: int, view: int) -> torch.Tensor:
        """``(heads, h, w, d)`` keys of image ``view``."""
        e = self.entry(layer, step)
        self._image(e, view)
        h, w = e.layout.grid
        return e.k[view].reshape(e.k.shape[1], h, w, e.k.shape[-1])

    def key_features(self, layer: str, step: int) -> torch.Tensor:
        """``(V, h, w, heads * d)`` keys of every image (heads concatenated), for the joint PCA view."""
        e = self.entry(layer, step)
        V, heads, _, d = e.k.shape
        h, w = e.layout.grid
        return e.k.reshape(V, heads, h, w, d).permute(0, 2, 3, 1, 4).reshape(V, h, w, heads * d)


class _CacheRecorder:
    """The ``on_call`` of the taps: keeps q and k of the wanted (layer, step) cells."""

    def __init__(self, target: Any, cache: AttentionCache, steps: set[int] | None, batch_index: int | None):
        self.target, self.cache, self.steps, self.batch_index = target, cache, steps, batch_index
        self.corrlab_model = is_corrlab_model(target)

    def __call__(self, call: AttentionCall) -> None:
        key = (call.layer, call.step)
        if (self.steps is not None and call.step not in self.steps) or key in self.cache:
            return None
        b = conditional_batch_entry(self.target, call.q.shape[0], self.batch_index, self.corrlab_model)
        self.cache.entries[key] = CachedAttention(
            q=call.q[b].detach().to("cpu", torch.float32, copy=True),
            k=call.k[b].detach().to("cpu", torch.float32, copy=True),
            scale=float(call.scale), layout=call.layout, timestep=call.timestep,
        )
        return None


@contextmanager
def cache_attention(model_or_pipeline: Any, layers: Sequence[str] | None = None, steps: Sequence[int] | None = None,
                    *, batch_index: int | None = None, image_scale: float | None = None) -> Iterator[AttentionCache]:
    """Cache the q and k of ``layers`` (None = all multi-image attention layers) at ``steps`` (None = all)
    during the calls inside the ``with``; observe only (outputs stay bit-identical), everything detached on
    exit, also on exceptions. ``batch_index`` and ``image_scale`` as in :func:`corrlab.probe`."""
    steps = check_steps(steps)
    if batch_index is not None and (isinstance(batch_index, bool) or not isinstance(batch_index, int)):
        raise ValueRangeError(f"batch_index: expected None or an int, got {batch_index!r}")
    cache = AttentionCache()
    recorder = _CacheRecorder(model_or_pipeline, cache, None if steps is None else set(steps), batch_index)
    with AttentionTaps(model_or_pipeline, layers, recorder, image_scale=image_scale):
        yield cache
