"""The one place where corrlab intercepts attention kernels: run code around the kernel call of a layer.

Which path each model family takes, and why a patch remains where one does:

* **Legacy ``Attention`` (UNets, corrlab's embedded DiT/UNet)** with ``AttnProcessor2_0``: the processor
  computes q, k, v (after norms) and calls ``F.scaled_dot_product_attention(q, k, v, ...)`` with
  ``(B, heads, S, d)`` tensors, ``F`` looked up in the globals of ``diffusers.models.attention_processor``.
  diffusers' sanctioned extension point here is the processor itself (``set_processor`` /
  ``set_attn_processor``), which corrlab uses for *permanent* behaviour
  (:class:`~corrlab.probing.extended_attention.MultiViewAttnProcessor`, row-wise attention). A probe that
  must see the q / k / v the stock processor builds cannot use it without copying the processor body
  (whose internals change between diffusers versions, see integration-notes.md), and a wrapping processor
  never sees q / k / v. So the name ``F`` in that module is swapped for a proxy while a tapped layer runs.
* **``AttentionModuleMixin`` (Flux, Wan)**: processors call ``dispatch_attention_fn(q, k, v, ...)``
  (``(B, S, heads, d)``). diffusers 0.42's attention-backend registry is the sanctioned point where the
  kernel is chosen, but backends are keyed by the closed enum ``AttentionBackendName`` (no custom backend
  can be registered) and the active backend (``attention_backend(...)``) is one process-wide class
  attribute, so a backend swap would reach every thread and every model. So ``dispatch_attention_fn`` is
  swapped in the processor's module instead, with the same routing.
* **Modules without a kernel call** (ldm-style einsum attention, registered with
  :func:`register_attention_module`): read through forward hooks on their projections (torch's
  sanctioned hooks; no patch at all).

Isolation (thread safety). The swapped globals are shared by every thread, so:

* every swap is reference-counted under one lock (:data:`_patch_lock`): the first active layer call of
  any thread installs the router, the last one restores the original, also when the call raises;
* the router delivers a kernel call only to the interceptors of the layer call that is active *in the
  calling thread* (a thread-local stack of frames); in threads with no active frame it calls the
  original kernel untouched;
* :func:`attach` binds an interceptor to one module **and to the thread that attached it**: its hooks do
  nothing when the module runs in another thread. Two pipelines probed in two threads never see each
  other's calls, and a model shared with an unprobed thread computes that thread's calls untouched.
  (Run the denoiser in the thread that entered the ``with``; a call made from a worker thread is not
  tapped.)

Routing. The router hands the call, as canonical ``(B, heads, S, d)`` views of the very tensors the
processor built, through the layer's chain of :class:`Interceptor` s, and the last link calls the original
kernel with the original arguments, so a chain of observers leaves the output bit-identical. Observers
(``structural = False``) run outermost, in the order they were attached; structural interceptors (which
change what the layer computes, e.g. extended attention) run innermost, so observers always see the
per-image q / k / v the processor built and the output of the (changed) kernel. The ``proceed`` handed to
the innermost interceptor carries ``is_kernel = True`` when it is the original kernel itself (no
structural interceptor in between): such an interceptor may compute the kernel's output itself (the
probe's fused mode) and call ``proceed`` on batch slices.

Nothing on the model changes: :func:`attach` registers a forward pre-hook and an ``always_call`` forward
hook on the attention module (removed by the returned handle). Not supported under ``torch.compile``.
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

__all__ = [
    "KernelCall",
    "Interceptor",
    "intercepting",
    "attach",
    "AttachHandle",
    "kernel_globals",
    "active_frames",
    "ProjectionSpec",
    "register_attention_module",
    "unregister_attention_module",
    "projection_spec",
]

Proceed = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class KernelCall:
    """One kernel call of one attention module, as its interceptors see it."""

    module: nn.Module
    attn_mask: torch.Tensor | None
    scale: float | None  # the scale passed to the kernel; None = 1/sqrt(d)
    is_causal: bool
    group_size: int  # images per group set by structural interceptors (1 if none)
    plain: bool = False  # no mask, not causal, no dropout, no extra kernel options: softmax(scale q k^T) v


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
    with _patch_lock:
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
def _kernel_args(args: tuple, kwargs: dict) -> tuple[Any, float | None, bool, bool]:
    """``attn_mask, scale, is_causal, plain`` of a kernel call ``(q, k, v, attn_mask, dropout_p, is_causal, scale)``."""
    def arg(i: int, name: str, default):
        if len(args) > i:
            return args[i]
        return kwargs.get(name, default)

    attn_mask, dropout_p, is_causal = arg(3, "attn_mask", None), arg(4, "dropout_p", 0.0), bool(arg(5, "is_causal", False))
    known = {"attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa", "backend", "parallel_config",
             "attention_kwargs"}
    plain = (
        attn_mask is None and not is_causal and not dropout_p and len(args) <= 7 and set(kwargs) <= known
        and not kwargs.get("enable_gqa", False) and not kwargs.get("attention_kwargs")
        and kwargs.get("parallel_config") is None
    )
    return attn_mask, arg(6, "scale", None), is_causal, plain


def _route(original: Callable, sequence_first: bool, q, k, v, *args, **kwargs):
    frames = active_frames()
    frame = frames[-1] if frames else None
    if frame is None or frame.routing or not frame.interceptors:
        return original(q, k, v, *args, **kwargs)
    frame.kernel_calls += 1
    attn_mask, scale, is_causal, plain = _kernel_args((q, k, v) + args, kwargs)
    observers = [i for i in frame.interceptors if not i.structural]
    structural = [i for i in frame.interceptors if i.structural]
    group = 1
    for s in structural:
        group *= int(getattr(s, "num_images", 1))
    call = KernelCall(frame.module, attn_mask, scale, is_causal, group, plain)

    def terminal(qc, kc, vc):
        if sequence_first:
            return original(qc.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), *args, **kwargs).transpose(1, 2)
        return original(qc, kc, vc, *args, **kwargs)

    terminal.is_kernel = True  # type: ignore[attr-defined]  # see the module docstring (fused probes)

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


# ------------------------------------------------------------------------------ modules without a kernel call
@dataclass(frozen=True)
class ProjectionSpec:
    """How to read an attention module that has no kernel call to intercept (ldm-style einsum attention).

    The module must compute ``q = <q>(x)``, ``k = <k>(context)``, ``v = <v>(context)`` with sub-modules
    (outputs ``(B, S, heads * d)``, heads-major in the last dimension, as ``rearrange('b n (h d) -> ...')``
    splits them), use them unchanged in ``softmax(scale q k^T) v`` per head, and hand the merged heads
    ``(B, S, heads * d)`` to the sub-module ``<out>`` (the output projection). corrlab hooks those
    sub-modules: q, k, v are their outputs, the attention output is ``<out>``'s input, and a replacement
    becomes ``<out>``'s input. A module that transforms q or k after projecting them (qk-norm, RoPE) is not
    read correctly this way: give it a diffusers-style processor calling ``F.scaled_dot_product_attention``.

    Attributes:
        q, k, v, out: dotted sub-module names (default ``to_q``, ``to_k``, ``to_v``, ``to_out``).
        heads: attribute holding the number of heads (default ``heads``), or an int.
        scale: attribute holding the softmax scale (default ``scale``), a float, or None for ``1/sqrt(d)``.
    """

    q: str = "to_q"
    k: str = "to_k"
    v: str = "to_v"
    out: str = "to_out"
    heads: str | int = "heads"
    scale: str | float | None = "scale"

    def num_heads(self, module: nn.Module) -> int:
        h = self.heads if isinstance(self.heads, int) else getattr(module, self.heads, None)
        if isinstance(h, bool) or not isinstance(h, int) or h < 1:
            raise CorrlabError(f"heads: expected {type(module).__name__}.{self.heads} to be a positive int, got {h!r}")
        return h

    def softmax_scale(self, module: nn.Module) -> float | None:
        if self.scale is None or isinstance(self.scale, (int, float)):
            return None if self.scale is None else float(self.scale)
        value = getattr(module, self.scale, None)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CorrlabError(f"scale: expected {type(module).__name__}.{self.scale} to be a number, got {value!r}")
        return float(value)


_PROJECTION_MODULES: dict[type, ProjectionSpec] = {}


def register_attention_module(module_type: type, spec: ProjectionSpec | None = None, **fields: Any) -> ProjectionSpec:
    """Make corrlab intercept attention modules of ``module_type`` through their projections.

    ``spec`` (or its fields as keywords) says where q, k, v and the output projection are; see
    :class:`ProjectionSpec`. Modules of this type (and subclasses) are then tapped by probes and
    CorrAdapter like diffusers' attention layers. Undo with :func:`unregister_attention_module`.
    """
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise CorrlabError(f"module_type: expected an nn.Module subclass, got {module_type!r}")
    if spec is not None and fields:
        raise CorrlabError("spec: expected either a ProjectionSpec or its fields as keywords, got both")
    spec = spec if spec is not None else ProjectionSpec(**fields)
    if not isinstance(spec, ProjectionSpec):
        raise CorrlabError(f"spec: expected a ProjectionSpec, got {type(spec).__name__}")
    _PROJECTION_MODULES[module_type] = spec
    return spec


def unregister_attention_module(module_type: type) -> None:
    """Forget a type registered with :func:`register_attention_module` (a no-op if unknown)."""
    _PROJECTION_MODULES.pop(module_type, None)


def projection_spec(module: nn.Module) -> ProjectionSpec | None:
    """The registered :class:`ProjectionSpec` of ``module``'s type (or a base type), else None."""
    for cls in type(module).__mro__:
        if cls in _PROJECTION_MODULES:
            return _PROJECTION_MODULES[cls]
    return None


def _submodule(module: nn.Module, name: str) -> nn.Module:
    try:
        return module.get_submodule(name)
    except AttributeError:
        raise CorrlabError(
            f"module: {type(module).__name__} has no sub-module {name!r} (its registered ProjectionSpec names it)"
        ) from None


class _ProjectionHooks:
    """Hooks reading q, k, v from a module's projections and replacing the input of its output projection."""

    def __init__(self, module: nn.Module, spec: ProjectionSpec, interceptor: Interceptor, after_call, owner: int):
        if getattr(interceptor, "structural", False):
            raise CorrlabError(
                f"interceptor: {type(module).__name__} is read through its projections; structural interceptors "
                f"(which change q, k, v) need a kernel call and are not supported on it"
            )
        self.module, self.spec, self.interceptor, self.after_call = module, spec, interceptor, after_call
        self.owner = owner  # the thread whose calls are intercepted (see the module docstring)
        self.active = False
        self.captured: dict[str, torch.Tensor] = {}
        self.calls = 0
        subs = {name: _submodule(module, getattr(spec, name)) for name in ("q", "k", "v", "out")}  # before any hook
        self.handles = [module.register_forward_pre_hook(self._begin)]
        for name in ("q", "k", "v"):
            self.handles.append(subs[name].register_forward_hook(self._capture(name)))
        # prepend: an interceptor attached later runs first, so one attached earlier (outer) sees its result,
        # as with kernel interception
        self.handles.append(subs["out"].register_forward_pre_hook(self._replace, prepend=True))
        self.handles.append(module.register_forward_hook(self._end, always_call=True))

    def _begin(self, mod, args):
        if threading.get_ident() != self.owner:
            return
        self.active, self.calls = True, 0
        self.captured.clear()

    def _capture(self, name: str):
        def hook(mod, args, output):
            if self.active and threading.get_ident() == self.owner:
                self.captured[name] = output
        return hook

    def _replace(self, mod, args):
        if not self.active or threading.get_ident() != self.owner or len(self.captured) < 3 or not args:
            return None
        x = args[0]
        heads = self.spec.num_heads(self.module)
        q, k, v = self.captured["q"], self.captured["k"], self.captured["v"]
        for name, t in (("q", q), ("k", k), ("v", v), ("out", x)):
            if not isinstance(t, torch.Tensor) or t.ndim != 3 or t.shape[-1] % heads:
                raise CorrlabError(
                    f"{name}: expected (B, S, heads * d) with {heads} heads from {type(self.module).__name__}'s "
                    f"projections, got {tuple(getattr(t, 'shape', ()))}"
                )

        def canonical(t: torch.Tensor) -> torch.Tensor:  # (B, S, heads*d) -> (B, heads, S, d), a view
            return t.unflatten(-1, (heads, t.shape[-1] // heads)).transpose(1, 2)

        qc, kc, vc, oc = canonical(q), canonical(k), canonical(v), canonical(x)
        call = KernelCall(self.module, None, self.spec.softmax_scale(self.module), False, 1)

        def terminal(q2, k2, v2):
            if q2 is not qc or k2 is not kc or v2 is not vc:
                raise CorrlabError(f"{type(self.module).__name__}: q, k, v cannot be changed on a projection-read module")
            return oc

        self.calls += 1
        self.captured.clear()
        result = self.interceptor(call, qc, kc, vc, terminal)
        if result is oc:
            return None
        return (result.transpose(1, 2).reshape(x.shape).to(x.dtype),) + tuple(args[1:])

    def _end(self, mod, args, output):
        if threading.get_ident() != self.owner:
            return
        self.active = False
        self.captured.clear()
        if output is not None and self.after_call is not None:
            self.after_call(self.calls)

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()


def attach(
    module: nn.Module,
    interceptor: Interceptor,
    after_call: Callable[[int], None] | None = None,
) -> AttachHandle:
    """Intercept every call of ``module`` made in the calling thread (forward hooks; the processor is untouched).

    ``after_call(kernel_calls)`` runs after each successful call of the module with the number of
    kernel calls the interceptors saw (e.g. to raise when a processor bypassed the kernel). Modules of a
    type registered with :func:`register_attention_module` are read through their projections instead.
    Calls of ``module`` in other threads are not intercepted (see the module docstring). The returned
    handle's ``remove()`` detaches (idempotent; from any thread).
    """
    owner = threading.get_ident()
    spec = projection_spec(module)
    if spec is not None:
        return AttachHandle([_ProjectionHooks(module, spec, interceptor, after_call, owner)])

    def pre_hook(mod, args):
        if threading.get_ident() == owner:
            enter(mod, interceptor)

    def post_hook(mod, args, output):
        if threading.get_ident() != owner:
            return
        calls = leave(mod, interceptor)
        if output is not None and after_call is not None:
            after_call(calls)

    handles = [
        module.register_forward_pre_hook(pre_hook),
        module.register_forward_hook(post_hook, always_call=True),
    ]
    return AttachHandle(handles)
