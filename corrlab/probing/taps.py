"""Taps on the multi-image attention layers of a model: see (and optionally replace) q, k, v and output.

>>> with AttentionTaps(pipe, layers=["blocks.3.attn"], on_call=lambda call: print(call.layer, call.q.shape)):
...     pipe("red striped box", seed=0)                                                 # doctest: +SKIP

Every call of a tapped layer hands ``on_call`` an :class:`AttentionCall` holding the image tokens of the
q, k, v the model fed its attention kernel (after qk-norm and RoPE) and the kernel's output, each
``(B, V, heads, h*w, d)``: views of the model's own tensors, no copies (keep only what you need, e.g.
``call.q.clone()``, or memory grows with every call). ``on_call`` returns ``None`` (observe: outputs stay
bit-identical) or a replacement for ``call.out`` of the same shape, written into the layer's output
before its output projection (text tokens and everything else untouched).

Supported denoisers (and pipelines holding them under ``model``, ``unet``, ``transformer``,
``transformer_2``): corrlab's ``MultiViewDiT`` (views in one sequence), ``WanTransformer3DModel``
(latent frames in one sequence), ``UNet2DConditionModel`` (views as batch entries, grouped by a
:class:`~corrlab.probing.extended_attention.MultiViewAttnProcessor` or
:func:`~corrlab.probing.extended_attention.extended_attention`), ``FluxTransformer2DModel`` (under
extended attention). See :mod:`corrlab.probing.layouts` for each family's token layout and pixel size,
and :mod:`corrlab.probing.interception` for how the kernel call is intercepted (forward hooks; processors
are never replaced; everything is restored on exit, also on exceptions).

``image_size`` of a layout is in pixels of the generated images: for a pipeline, the latent size times
its VAE scale factor; for a bare latent denoiser, latent pixels (pass ``image_scale`` to override).
"""
from __future__ import annotations

import inspect
import math
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..errors import CorrlabError, ShapeError, ValueRangeError, describe
from . import interception
from .extended_attention import MultiViewAttnProcessor, extended_attention, multiview_attention_processors
from .layouts import Denoiser, ImageTokens, LayerEntry, TokenLayout, find_layers

__all__ = [
    "TokenLayout",
    "AttentionCall",
    "StepClock",
    "LayerInfo",
    "list_layers",
    "AttentionTaps",
    "extended_attention",
    "MultiViewAttnProcessor",
    "multiview_attention_processors",
]


@dataclass
class AttentionCall:
    """One call of one multi-image attention layer (tensors are views into the model's own).

    ``q``, ``k``, ``v``, ``out``: ``(B, V, heads, h*w, d)`` image tokens only (views of the kernel's tensors;
    copies for row-wise layouts, whose rows sit in separate kernel entries); ``scale``: the softmax scale
    the kernel applies; ``call_index``: how many denoiser forward calls happened before this one inside
    the taps context; ``timestep``: the denoiser's ``timestep`` argument as a float (None when absent or
    when its entries differ); ``step``, ``slot``, ``generation``: the taps' :class:`StepClock` at this call
    (the one step clock every consumer reads).
    """

    layer: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor | None  # None only for a fused kernel's on_call (see _Tap._fused)
    scale: float
    layout: TokenLayout
    call_index: int
    timestep: float | None
    step: int
    slot: int
    generation: int


@dataclass(frozen=True)
class LayerInfo:
    """A multi-image attention layer: stable name, kind (family), token grid if known, heads, head size."""

    name: str
    kind: str
    grid: tuple[int, int] | None
    num_heads: int
    head_dim: int


def _num_heads(module: Any) -> int:
    spec = interception.projection_spec(module)
    return spec.num_heads(module) if spec is not None else int(module.heads)


def _head_dim(module: Any) -> int:
    d = getattr(module, "head_dim", None)
    if isinstance(d, int):
        return d
    spec = interception.projection_spec(module)
    if spec is not None:
        q = interception._submodule(module, spec.q)
        return int(getattr(q, "out_features")) // spec.num_heads(module)
    return int(module.inner_dim // module.heads)


def _timestep_value(t: Any) -> float | None:
    if isinstance(t, torch.Tensor):
        if t.numel() == 0:
            return None
        flat = t.detach().flatten()
        if flat.numel() > 1 and not bool((flat == flat[0]).all()):
            return None
        return float(flat[0])
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return float(t)
    return None


@dataclass
class _ForwardState:
    layout: dict
    call_index: int
    timestep: float | None
    step: int
    slot: int
    generation: int


class StepClock:
    """The one step clock of corrlab: denoising steps derived from the denoiser's forward calls.

    A *step* is a run of consecutive denoiser calls with the same timestep, counted from 0 in call order
    since the taps were entered (a call without a timestep is a step of its own); ``slot`` is a call's
    position within its step (e.g. a true-CFG pipeline's second guidance branch: slot 1); a timestep
    larger than the previous call's starts a new *generation* (the sampler went back to noise).
    Shared by all denoisers of one :class:`AttentionTaps` (``call_index`` counts their calls together).
    """

    def __init__(self) -> None:
        self.calls = 0
        self.step = -1
        self.slot = 0
        self.generation = 0
        self._last: float | None = None

    def tick(self, timestep: float | None) -> None:
        """Advance for one denoiser forward call with ``timestep`` (None: unknown)."""
        last = self._last
        if timestep is not None and last is not None and timestep > last:
            self.generation += 1
        if timestep is None or last is None or timestep != last:
            self.step += 1
            self.slot = 0
        else:
            self.slot += 1
        self._last = timestep
        self.calls += 1


class _DenoiserWatch:
    """Forward pre-hook (with kwargs) on a denoiser: the layout arguments and timestep of the current call.

    Only calls in the thread that created the watch count (the thread that entered the taps): a model
    shared with another thread keeps that thread's calls out of this step clock.
    """

    def __init__(self, denoiser: Denoiser, counter: StepClock):
        self.denoiser, self.counter = denoiser, counter
        self.owner = threading.get_ident()
        self.current: _ForwardState | None = None
        self._signature = inspect.signature(denoiser.module.forward)
        self._handles = [
            denoiser.module.register_forward_pre_hook(self._before, with_kwargs=True),
            denoiser.module.register_forward_hook(self._after, always_call=True),
        ]

    def _before(self, module, args, kwargs):
        if threading.get_ident() != self.owner:
            return
        try:
            arguments = self._signature.bind_partial(*args, **kwargs).arguments
        except TypeError as e:
            raise CorrlabError(f"{type(module).__name__}.forward: arguments do not match its signature ({e})") from None
        layout = self.denoiser.family.read_forward(module, arguments)
        t = arguments.get(getattr(self.denoiser.family, "timestep_argument", "timestep"))
        clock, timestep = self.counter, _timestep_value(t)
        clock.tick(timestep)
        self.current = _ForwardState(layout, clock.calls - 1, timestep, clock.step, clock.slot, clock.generation)

    def _after(self, module, args, output):
        if threading.get_ident() == self.owner:
            self.current = None

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        self.current = None


class _Tap:
    """Observer interceptor of one layer: builds the AttentionCall, applies the replacement."""

    structural = False

    def __init__(self, entry: LayerEntry, watch: _DenoiserWatch, on_call: Callable, image_scale: float):
        self.entry, self.watch, self.on_call, self.image_scale = entry, watch, on_call, image_scale

    def __call__(self, call, q, k, v, proceed):
        fused = getattr(self.on_call, "fused_kernel", None)
        if fused is not None and getattr(proceed, "is_kernel", False) and call.plain and call.group_size == 1:
            out = self._fused(fused, call, q, k, v, proceed)
            if out is not None:
                return out
        out = proceed(q, k, v)
        tokens, record = self._record(call, q, k, v, out)
        replacement = self.on_call(record)
        del record
        if replacement is None:
            return out
        expected = tokens.select(out).shape
        if not isinstance(replacement, torch.Tensor) or replacement.shape != expected:
            raise ShapeError(
                f"on_call: expected None or a replacement for call.out of shape {tuple(expected)} for layer "
                f"{self.entry.name!r}, got {describe(replacement)}"
            )
        new_out = out.clone()
        tokens.scatter(new_out, replacement)
        return new_out

    def _record(self, call, q, k, v, out) -> tuple[ImageTokens, AttentionCall]:
        state = self.watch.current
        if state is None:
            raise CorrlabError(
                f"layers: {self.entry.name!r} ran outside a forward call of its denoiser "
                f"({type(self.watch.denoiser.module).__name__}); call the denoiser (or pipeline), not the layer"
            )
        if k.shape[:2] != q.shape[:2] or v.shape[:3] != k.shape[:3]:
            raise ShapeError(
                f"layers: {self.entry.name!r} is not a self-attention kernel call: q {describe(q)}, k {describe(k)}, "
                f"v {describe(v)}"
            )
        tokens: ImageTokens = self.entry.family.image_tokens(
            state.layout, q, call.group_size, self.image_scale, self.entry.kind, k
        )
        if k.shape[2] != q.shape[2] and tokens.images_in != "rows":
            raise ShapeError(
                f"layers: {self.entry.name!r} is not a self-attention kernel call: q {describe(q)}, k {describe(k)}, "
                f"v {describe(v)}"
            )
        record = AttentionCall(
            layer=self.entry.name,
            q=tokens.select(q),
            k=tokens.select_keys(k),
            v=tokens.select_keys(v),
            out=None if out is None else tokens.select(out),
            scale=call.softmax_scale(q.shape[-1]),
            layout=tokens.layout,
            call_index=state.call_index,
            timestep=state.timestep,
            step=state.step,
            slot=state.slot,
            generation=state.generation,
        )
        return tokens, record

    def _fused(self, fused, call, q, k, v, proceed):
        """The on_call's ``fused_kernel(record, q, k, v, kernel)``: it computes the kernel output itself.

        Only for a plain kernel call (see :class:`interception.KernelCall`) whose whole sequence is the
        images' tokens (no text tokens, not row-wise) and when ``proceed`` is the kernel itself. The record
        has ``out=None``; ``kernel(q', k', v')`` runs the original kernel on batch slices.
        """
        if q.shape != k.shape or v.shape[:3] != k.shape[:3]:
            return None
        tokens, record = self._record(call, q, k, v, None)
        if tokens.images_in != "sequence" or tokens.text_tokens:
            return None
        return fused(record, q, k, v, proceed)

    def check_kernel_called(self, calls: int) -> None:
        if calls == 0:
            raise CorrlabError(
                f"layers: {self.entry.name!r} finished without calling its attention kernel, so nothing was "
                f"tapped; its processor {type(self.entry.module.processor).__name__} is not supported"
            )


def _select(entries: list[LayerEntry], layers: Sequence[str] | None) -> list[LayerEntry]:
    if layers is None:
        return entries
    if isinstance(layers, str) or not all(isinstance(n, str) for n in layers):
        raise CorrlabError(f"layers: expected None or a list of layer names, got {describe(layers)}")
    names = {e.name for e in entries}
    unknown = [n for n in layers if n not in names]
    if unknown:
        shown = [e.name for e in entries]
        raise CorrlabError(
            f"layers: unknown layer names {unknown}; expected names from list_layers(model): "
            f"{shown[:12]}{' ...' if len(shown) > 12 else ''}"
        )
    wanted = set(layers)
    return [e for e in entries if e.name in wanted]


class AttentionTaps:
    """Context manager tapping the multi-image attention layers ``layers`` (None = all) of a model.

    ``on_call(call: AttentionCall) -> None | Tensor`` runs on every call of a tapped layer; see the module
    docstring. ``image_scale`` (optional) sets decoded pixels per latent pixel for the layouts' image
    sizes (default: the pipeline's VAE scale factor, 1 for a bare model). Everything attached is removed
    on exit, also when the block raises. Constructing it attaches nothing: ``with taps:``, or
    ``taps.attach()`` ... ``taps.remove()``. Not re-entrant: one attachment at a time per instance.
    """

    def __init__(
        self,
        model_or_pipeline: Any,
        layers: Sequence[str] | None,
        on_call: Callable[[AttentionCall], torch.Tensor | None],
        *,
        image_scale: float | None = None,
    ):
        if not callable(on_call):
            raise CorrlabError(f"on_call: expected a callable taking an AttentionCall, got {describe(on_call)}")
        valid_scale = isinstance(image_scale, (int, float)) and math.isfinite(image_scale) and image_scale > 0
        if image_scale is not None and not valid_scale:
            raise ValueRangeError(f"image_scale: expected None or a positive number, got {image_scale!r}")
        self.entries = _select(find_layers(model_or_pipeline), layers)
        self.on_call = on_call
        self.image_scale = image_scale
        self._handles: list = []
        self._active = False

    @property
    def layers(self) -> list[str]:
        """Names of the tapped layers, in forward order."""
        return [e.name for e in self.entries]

    def attach(self) -> "AttentionTaps":
        """Attach the taps (hooks on the tapped layers and their denoisers) and return this object as the
        handle; :meth:`remove` detaches. ``with taps:`` does both. Calls in the attaching thread are tapped."""
        if self._active:
            raise CorrlabError("AttentionTaps: this instance is already active; use a new one for nested taps")
        self._active = True
        try:
            counter = StepClock()
            watches: dict[int, _DenoiserWatch] = {}
            for entry in self.entries:
                d = entry.denoiser
                if id(d.module) not in watches:
                    watches[id(d.module)] = _DenoiserWatch(d, counter)
                    self._handles.append(watches[id(d.module)])
                scale = float(self.image_scale) if self.image_scale is not None else d.pixel_scale
                tap = _Tap(entry, watches[id(d.module)], self.on_call, scale)
                self._handles.append(interception.attach(entry.module, tap, tap.check_kernel_called))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Detach everything :meth:`attach` attached (idempotent)."""
        while self._handles:
            self._handles.pop().remove()
        self._active = False

    @property
    def attached(self) -> bool:
        return self._active

    def __enter__(self) -> "AttentionTaps":
        return self.attach()

    def __exit__(self, *exc) -> bool:
        self.remove()
        return False


def list_layers(model_or_pipeline: Any, sample_inputs: Any = None) -> list[LayerInfo]:
    """The multi-image attention layers of a model or pipeline, in forward order, with stable names.

    ``grid`` comes from the config where it can (``sample_size`` of the embedded model and UNets), else
    ``None``; with ``sample_inputs`` (a dict of keyword arguments, or a tuple of positional ones, for one
    forward call of the first denoiser) one forward runs under taps and every layer's grid is the one it
    actually used (layers that did not run keep ``None``).
    """
    entries = find_layers(model_or_pipeline)
    grids = {e.name: e.family.config_grid(e.denoiser.module, e.name[len(e.denoiser.prefix):], e.kind) for e in entries}
    if sample_inputs is not None:
        first = entries[0].denoiser.module if entries else None
        seen: dict[str, tuple[int, int]] = {}

        def record(call: AttentionCall) -> None:
            seen[call.layer] = call.layout.grid

        names = [e.name for e in entries if e.denoiser.module is first]
        with torch.no_grad(), AttentionTaps(model_or_pipeline, names, record):
            if isinstance(sample_inputs, dict):
                first(**sample_inputs)
            elif isinstance(sample_inputs, (tuple, list)):
                first(*sample_inputs)
            else:
                raise CorrlabError(
                    f"sample_inputs: expected a dict of keyword arguments or a tuple of positional arguments "
                    f"for the denoiser's forward, got {describe(sample_inputs)}"
                )
        grids.update({n: seen.get(n) for n in names})
    return [
        LayerInfo(e.name, e.kind, grids[e.name], _num_heads(e.module), _head_dim(e.module))
        for e in entries
    ]
