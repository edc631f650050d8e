"""Run code around the attention kernel call of one diffusers attention layer.

Diffusers attention processors build q, k, v and then call a kernel, looked up by name in the
globals of the processor's ``__call__``:

* legacy processors (``AttnProcessor2_0``, used by ``Attention``: UNets, the embedded model) call
  ``F.scaled_dot_product_attention(q, k, v, ...)`` with ``(B, heads, S, d)`` tensors;
* ``AttentionModuleMixin`` processors (Flux, Wan) call ``dispatch_attention_fn(q, k, v, ...)`` with
  ``(B, S, heads, d)`` tensors.

While an intercepted layer runs, that name is swapped for a router (``F`` for a proxy of
``torch.nn.functional`` whose ``scaled_dot_product_attention`` routes). The router hands the call, as
canonical ``(B, heads, S, d)`` views of the very tensors the processor built, through the layer's
chain of :class:`Interceptor` s, and the last link calls the original kernel with the original
arguments, so a chain of observers leaves the output bit-identical. Observers
(``structural = False``) run outermost, in the order they were attached; structural interceptors
(which change what the layer computes, e.g. extended attention) run innermost, so observers always
see the per-image q / k / v the processor built and the output of the (changed) kernel.

Nothing on the model changes: :func:`attach` registers a forward pre-hook and an ``always_call`` forward
hook on the attention module (removed by the returned handle), and the swapped global is restored
when the last active layer call of any thread ends, also when it raises. The router passes calls
through untouched in threads that have no active layer call. Not supported under ``torch.compile``.
"""
from __future__ import annotations

import math
import threading
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as torch_functional
from torch import nn

from ..errors import CorrlabError

__all__ = ["KernelCall", "Interceptor", "intercepting", "attach", "AttachHandle", "kernel_globals", "active_frames"]

Proceed = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class KernelCall:
    """One kernel call of one attention module, as its interceptors see it."""

    module: nn.Module
    attn_mask: torch.Tensor | None
    scale: float | None  # the scale passed to the kernel; None = 1/sqrt(d)
    is_causal: bool
    group_size: int  # images per group set by structural interceptors (1 if none)

    def softmax_scale(self, head_dim: int) -> float:
        """The softmax scale the kernel applies."""
        return float(self.scale) if self.scale is not None else 1.0 / math.sqrt(head_dim)


class Interceptor(Protocol):
    """``interceptor(call, q, k, v, proceed) -> out``, all ``(Bk, heads, S, d)``; ``proceed`` runs the rest."""

    structural: bool

    def __call__(
        self, call: KernelCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proceed: Proceed
    ) -> torch.Tensor:
        ...


@dataclass
class _Frame:
    module: nn.Module
    interceptors: list = field(default_factory=list)
    patches: list = field(default_factory=list)
    kernel_calls: int = 0
    routing: bool = False


_local = threading.local()
_patch_lock = threading.Lock()
_patch_counts: dict[tuple[int, str], list] = {}  # (id(globals), name) -> [count, globals, original]


def active_frames() -> list[_Frame]:
    """This thread's active layer calls, innermost last (empty outside intercepted layers)."""
    frames = getattr(_local, "frames", None)
    if frames is None:
        frames = _local.frames = []
    return frames


_globals_cache: dict[type, list[tuple[dict, str]]] = {}


def kernel_globals(processor: Any) -> list[tuple[dict, str]]:
    """``(globals, name)`` of the kernel references used by ``processor``'s ``__call__`` (and its bases')."""
    cached = _globals_cache.get(type(processor))
    if cached is None:
        cached = _globals_cache[type(processor)] = _find_kernel_globals(processor)
    return cached


def _find_kernel_globals(processor: Any) -> list[tuple[dict, str]]:
    found: list[tuple[dict, str]] = []
    seen: set[tuple[int, str]] = set()
    for cls in type(processor).__mro__:
        fn = cls.__dict__.get("__call__")
        if not isinstance(fn, types.FunctionType):
            continue
        g = fn.__globals__
        for name in ("dispatch_attention_fn", "F"):
            value = g.get(name)
            if value is None or (id(g), name) in seen:
                continue
            if name == "F" and not (value is torch_functional or isinstance(value, _FunctionalProxy)):
                continue
            if name not in fn.__code__.co_names:
                continue
            seen.add((id(g), name))
            found.append((g, name))
    return found


# ---------------------------------------------------------------------------------------------- routing
def _kernel_args(args: tuple, kwargs: dict) -> tuple[Any, float | None, bool]:
    """``attn_mask, scale, is_causal`` of a kernel call ``(q, k, v, attn_mask, dropout_p, is_causal, scale)``."""
    def arg(i: int, name: str, default):
        if len(args) > i:
            return args[i]
        return kwargs.get(name, default)

    return arg(3, "attn_mask", None), arg(6, "scale", None), bool(arg(5, "is_causal", False))


def _route(original: Callable, sequence_first: bool, q, k, v, *args, **kwargs):
    frames = active_frames()
    frame = frames[-1] if frames else None
    if frame is None or frame.routing or not frame.interceptors:
        return original(q, k, v, *args, **kwargs)
    frame.kernel_calls += 1
    attn_mask, scale, is_causal = _kernel_args((q, k, v) + args, kwargs)
    observers = [i for i in frame.interceptors if not i.structural]
    structural = [i for i in frame.interceptors if i.structural]
    group = 1
    for s in structural:
        group *= int(getattr(s, "num_images", 1))
    call = KernelCall(frame.module, attn_mask, scale, is_causal, group)

    def terminal(qc, kc, vc):
        if sequence_first:
            return original(qc.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), *args, **kwargs).transpose(1, 2)
        return original(qc, kc, vc, *args, **kwargs)

    def link(chain: list) -> Proceed:
        if not chain:
            return terminal
        head, rest = chain[0], link(chain[1:])
        return lambda qc, kc, vc: head(call, qc, kc, vc, rest)

    if sequence_first:
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    frame.routing = True
    try:
        out = link(observers + structural)(q, k, v)
    finally:
        frame.routing = False
    return out.transpose(1, 2) if sequence_first else out


class _FunctionalProxy(types.ModuleType):
    """Stands in for ``torch.nn.functional``: everything delegates, except the routed SDPA."""

    def __init__(self, functional):
        super().__init__("torch.nn.functional")
        self._functional = functional
        original = functional.scaled_dot_product_attention

        def scaled_dot_product_attention(q, k, v, *args, **kwargs):
            return _route(original, False, q, k, v, *args, **kwargs)

        self.scaled_dot_product_attention = scaled_dot_product_attention

    def __getattr__(self, name: str):
        return getattr(self._functional, name)


def _router_for(name: str, original: Any) -> Any:
    if name == "F":
        return _FunctionalProxy(original)

    def dispatch_attention_fn(q, k, v, *args, **kwargs):
        return _route(original, True, q, k, v, *args, **kwargs)

    dispatch_attention_fn._corrlab_router = True  # type: ignore[attr-defined]
    return dispatch_attention_fn


def _patch(g: dict, name: str) -> None:
    with _patch_lock:
        entry = _patch_counts.get((id(g), name))
        if entry is None:
            original = g[name]
            _patch_counts[(id(g), name)] = [1, g, original]
            g[name] = _router_for(name, original)
        else:
            entry[0] += 1


def _unpatch(g: dict, name: str) -> None:
    with _patch_lock:
        entry = _patch_counts.get((id(g), name))
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            g[name] = entry[2]
            del _patch_counts[(id(g), name)]


# ---------------------------------------------------------------------------------------------- frames
def enter(module: nn.Module, interceptor: Interceptor) -> None:
    """Make ``interceptor`` see the kernel calls of ``module`` until :func:`leave` (same thread)."""
    frames = active_frames()
    if frames and frames[-1].module is module:
        frames[-1].interceptors.append(interceptor)
        return
    processor = getattr(module, "processor", None)
    targets = kernel_globals(processor)
    if not targets:
        raise CorrlabError(
            f"module: expected an attention module whose processor calls F.scaled_dot_product_attention "
            f"(legacy AttnProcessor2_0 family) or dispatch_attention_fn (Flux/Wan family), got "
            f"{type(module).__name__} with processor {type(processor).__name__}"
        )
    frame = _Frame(module, [interceptor])
    for g, name in targets:
        _patch(g, name)
        frame.patches.append((g, name))
    frames.append(frame)


def leave(module: nn.Module, interceptor: Interceptor) -> int:
    """Undo :func:`enter`; returns how many kernel calls the frame saw (0 if it was not entered)."""
    frames = active_frames()
    for idx in range(len(frames) - 1, -1, -1):
        frame = frames[idx]
        if frame.module is module and any(i is interceptor for i in frame.interceptors):
            frame.interceptors = [i for i in frame.interceptors if i is not interceptor]
            calls = frame.kernel_calls
            if not frame.interceptors:
                del frames[idx]
                for g, name in reversed(frame.patches):
                    _unpatch(g, name)
            return calls
    return 0


class intercepting:
    """Context manager: ``with intercepting(attn, interceptor): attn(...)`` (or the processor body)."""

    def __init__(self, module: nn.Module, interceptor: Interceptor):
        self.module, self.interceptor = module, interceptor

    def __enter__(self) -> "intercepting":
        enter(self.module, self.interceptor)
        return self

    def __exit__(self, *exc) -> bool:
        leave(self.module, self.interceptor)
        return False


class AttachHandle:
    """Removes the hooks :func:`attach` registered (idempotent)."""

    def __init__(self, handles: list):
        self._handles = handles

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()


def attach(
    module: nn.Module,
    interceptor: Interceptor,
    after_call: Callable[[int], None] | None = None,
) -> AttachHandle:
    """Intercept every call of ``module`` (forward hooks; the processor is untouched).

    ``after_call(kernel_calls)`` runs after each successful call of the module with the number of
    kernel calls the interceptors saw (e.g. to raise when a processor bypassed the kernel).
    """
    def pre_hook(mod, args):
        enter(mod, interceptor)

    def post_hook(mod, args, output):
        calls = leave(mod, interceptor)
        if output is not None and after_call is not None:
            after_call(calls)

    handles = [
        module.register_forward_pre_hook(pre_hook),
        module.register_forward_hook(post_hook, always_call=True),
    ]
    return AttachHandle(handles)
