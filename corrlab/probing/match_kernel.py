"""corrlab's compiled kernels: the fused probe's attention with per-image matches, and CorrAdapter's windows.

No torch kernel returns the per-image argmax of the attention logits together with the softmax; torch's flash
kernel hides its logits, and at the head sizes of the embedded model (``d = 32``) every elementwise pass torch
makes over materialised logits costs about as much as computing them. :func:`attention_matches` computes, per head
and per block of 4 query rows, the logits ``q k^T`` (a register tile), each image block's max, first argmax and
the matcher's global confidence, the softmax numerators in place and ``(P @ v) / Z`` (a register tile), in C
(``match_kernel.c``, GCC vector extensions); the logits of 4 rows are the only intermediate. This is what the
probe's fused mode (:mod:`corrlab.probing.fused_attention`) runs by default on the CPU in float32.

The same library holds CorrAdapter's windowed aggregation (:func:`window_attention`, used by
:mod:`corrlab.interventions.aggregation` for float32 on the CPU): per kept match, the logits of the window around
the matched token 8 keys at a time from a transposed copy of the keys, their softmax and the weighted sum of the
window's values, averaged over the kept other images and blended into the attention output in place.

Build: the C source is compiled on first use with the system's C compiler (``$CC``, else ``cc``, ``gcc``,
``clang``; ``-O3 -march=native``, else without ``-march``) into a cache folder (``$CORRLAB_KERNEL_CACHE``, else
``$XDG_CACHE_HOME/corrlab/kernels`` or ``~/.cache/corrlab/kernels``), named by a hash of the source, the
compiler's version, the flags and this CPU's feature flags; the library is written atomically and loaded with
ctypes (about a second on first use). Where no compiler is found or the build fails, :func:`load_match_kernel`
returns None and :func:`match_kernel_status` says why; the fused mode and CorrAdapter then use their torch-only paths
(same results within float rounding, higher cost). ``CORRLAB_MATCH_KERNEL=0`` turns both kernels off.

Threads: the heads are split over ``torch.get_num_threads()`` threads (ctypes releases the GIL during the call).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..errors import ShapeError, ValueRangeError, describe

__all__ = ["attention_matches", "load_match_kernel", "load_window_kernel", "match_kernel_status", "window_attention",
           "ROWS_PER_TILE"]

SOURCE = Path(__file__).with_name("match_kernel.c")
FLAGS = ("-O3", "-fPIC", "-shared", "-std=gnu11")
NATIVE = ("-march=native",)
#: Query rows per register tile (``RB`` in the C source): the kernel's only intermediate is RB x L logits.
ROWS_PER_TILE = 6
PANEL = 16  # keys per packed panel of k

_lock = threading.Lock()
_state: dict = {"fn": None, "tried": False, "status": "not built yet", "pool": None}


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    env = os.environ.get("CORRLAB_KERNEL_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "corrlab" / "kernels"


def _compile(cc: str, out: Path) -> str | None:
    """Build the shared library at ``out`` (written atomically); None on success, else why not."""
    errors = []
    for extra in (NATIVE, ()):  # -march=native where the compiler knows this CPU, else portable code
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            proc = subprocess.run([cc, *FLAGS, *extra, f"-DRB={ROWS_PER_TILE}", str(SOURCE), "-o", tmp, "-lm"],
                                  capture_output=True, text=True, timeout=120)
            if proc.returncode == 0:
                os.replace(tmp, out)
                return None
            errors.append((proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1])
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(repr(e))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return f"{cc} could not build {SOURCE.name}: {'; '.join(errors)}"


def load_match_kernel():
    """The compiled kernel (a ctypes function), or None where it cannot be built here (see the module docstring)."""
    with _lock:
        if _state["tried"]:
            return _state["fn"]
        _state["tried"] = True
        if os.environ.get("CORRLAB_MATCH_KERNEL", "1") == "0":
            _state["status"] = "off (CORRLAB_MATCH_KERNEL=0)"
            return None
        cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
        if cc is None:
            _state["status"] = "no C compiler found ($CC, cc, gcc, clang)"
            return None
        try:
            version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError) as e:
            _state["status"] = f"{cc} --version failed: {e!r}"
            return None
        key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(FLAGS + NATIVE), str(ROWS_PER_TILE),
                                        _cpu_flags(), platform.machine()]).encode()).hexdigest()[:16]
        lib = _cache_dir() / f"match_kernel-{key}.so"
        try:
            lib.parent.mkdir(parents=True, exist_ok=True)
            if not lib.is_file():
                reason = _compile(cc, lib)
                if reason is not None:
                    _state["status"] = reason
                    return None
            dll = ctypes.CDLL(str(lib))
            fn, window_fn = dll.corrlab_attention_matches, dll.corrlab_window_attention
        except (OSError, AttributeError) as e:
            _state["status"] = f"loading {lib} failed: {e!r}"
            return None
        i64, i32, f32, ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_void_p
        fn.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, i64, f32, ptr, ptr, ptr, ptr, ptr]
        fn.restype = None
        window_fn.argtypes = [ptr] * 12 + [i64] * 10 + [i32, f32, f32, i32, i64, i64, ptr, ptr]
        window_fn.restype = None
        _state["fn"], _state["window_fn"], _state["status"] = fn, window_fn, f"compiled: {lib}"
        return fn


def load_window_kernel():
    """CorrAdapter's compiled windowed aggregation (a ctypes function, same library as the match kernel), or None
    where the library cannot be built here (:func:`match_kernel_status` says why)."""
    if load_match_kernel() is None:
        return None
    return _state.get("window_fn")


def match_kernel_status() -> str:
    """Where the kernel was built, or why it is not in use."""
    return _state["status"]


def _pool(workers: int) -> ThreadPoolExecutor:
    with _lock:
        pool, size = _state["pool"] or (None, 0)
        if size < workers:
            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="corrlab-match")
            _state["pool"] = (pool, workers)
        return pool


def _split(fn, n: int, workers: int) -> None:
    """``fn(w, lo, hi)`` over ``[0, n)`` in ``workers`` contiguous parts, on the pool's threads (ctypes releases the
    GIL during a C call); the calling thread alone for one worker."""
    if workers == 1:
        fn(0, 0, n)
        return
    bounds = [n * w // workers for w in range(workers + 1)]
    for job in [_pool(workers).submit(fn, w, bounds[w], bounds[w + 1]) for w in range(workers)]:
        job.result()


def attention_matches(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_images: int, gap: float,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax attention of one batch entry and each query's per-image first argmax and global confidence.

    Args:
        q: ``(H, L, d)`` float32 queries, already multiplied by the softmax scale.
        k: ``(H, L, d)`` float32 keys; v: ``(H, L, dv)`` float32 values; CPU tensors.
        num_images: ``V``: keys ``b*n .. (b+1)*n - 1`` belong to image ``b`` (``L = V*n``).
        gap: a block whose max lies more than ``gap`` below its row's max gets its confidence summed from its
            own max (the softmax numerators lose precision there).

    Returns:
        ``out (H, L, dv)`` = ``softmax(q k^T) v``; ``argmax (H, L, V)`` int64, each query's first argmax of the
        logits within each image's keys (position in the image); ``confidence (H, L, V)`` float32,
        ``1 / sum_{l in b} exp(S_l - max_b S)`` (the matcher's global confidence).

    Raises ShapeError for other shapes, dtypes or devices; RuntimeError where the kernel is unavailable.
    """
    fn = load_match_kernel()
    if fn is None:
        raise RuntimeError(f"match kernel unavailable: {match_kernel_status()}")
    ok = q.ndim == 3 and k.shape == q.shape and v.ndim == 3 and v.shape[:2] == q.shape[:2]
    ok = ok and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (q, k, v))
    ok = ok and int(num_images) >= 1 and q.shape[1] % int(num_images) == 0
    if not ok:
        raise ShapeError(f"attention_matches: expected CPU float32 q, k (H, L, d) and v (H, L, dv) with L divisible "
                         f"by num_images={num_images}; got q {describe(q)}, k {describe(k)}, v {describe(v)}")
    H, L, d = q.shape
    dv = v.shape[-1]
    V = int(num_images)
    Lp = -(-L // PANEL) * PANEL
    qc, vc = q.contiguous(), v.contiguous()
    # the keys in panels of 16 (kP[h, p, :, c] = k[h, 16 p + c]): one tile's loads are adjacent, not L apart
    k_pad = k if Lp == L else torch.cat([k, k.new_zeros((H, Lp - L, d))], dim=1)
    kP = torch.empty((H, Lp // PANEL, d, PANEL), dtype=torch.float32)
    kP.transpose(-1, -2).copy_(k_pad.reshape(H, Lp // PANEL, PANEL, d))
    out = torch.empty((H, L, dv), dtype=torch.float32)
    argmax = torch.empty((H, L, V), dtype=torch.int64)
    conf = torch.empty((H, L, V), dtype=torch.float32)
    row_sum = torch.empty((H, L), dtype=torch.float32)
    if H * L == 0:
        return out, argmax, conf
    workers = max(1, min(H, torch.get_num_threads()))
    work = torch.empty((workers, ROWS_PER_TILE, Lp), dtype=torch.float32)
    f4, i8 = 4, 8  # bytes per float32, int64

    def heads(w: int, h0: int, h1: int) -> None:
        fn(qc.data_ptr() + h0 * L * d * f4, kP.data_ptr() + h0 * Lp * d * f4, vc.data_ptr() + h0 * L * dv * f4,
           h1 - h0, L, Lp, d, dv, V, L // V, float(gap), work[w].data_ptr(), argmax.data_ptr() + h0 * L * V * i8,
           conf.data_ptr() + h0 * L * V * f4, row_sum.data_ptr() + h0 * L * f4, out.data_ptr() + h0 * L * dv * f4)

    _split(heads, H, workers)
    return out, argmax, conf


def window_attention(rows: tuple, strides: tuple, heads: int, index: torch.Tensor, kept: torch.Tensor,
                     grid: tuple[int, int], window: tuple[int, int], *, clamp: bool, scale: float, eta: float,
                     scale_out: bool) -> None:
    """CorrAdapter's windowed aggregation blended into the output rows in place, in C (``corrlab_window_attention``).

    Args:
        rows: ``(q, k, v, out)``, each a 2-D CPU float32 tensor of contiguous rows (``(R, d)`` for q and k,
            ``(R, dv)`` for v and out) holding the ``(B, V, heads, N)`` rows of that tensor; out is written.
        strides: for each of the four, ``(offset, b, image, head, token)`` in rows (non-negative): row
            ``(b, i, h, n)`` is ``offset + b * sb + i * sv + h * sh + n * sn``.
        heads: the number of heads H.
        index: ``(B, V, H', V-1, N)`` long, matched token in the t-th other image (order of
            :func:`corrlab.interventions.aggregation.other_images`); kept: same shape, bool. ``H'`` = heads or 1.
        grid: ``(h, w)``, ``h * w = N``; window: ``(wr, wc)``, the window's rows ``-wr..wr`` and columns
            ``-wc..wc`` around the match (``(r, r)`` square, ``(0, r)`` one row).
        clamp: window entries outside the grid are clamped into it (else left out of the softmax).
        scale: the softmax scale; eta: weight of the original output; scale_out: multiply the original rows
            of tokens with a kept match by ``eta`` (else they are taken as they are: already scaled).

    Every output row ``(b, i, h, p)`` with at least one kept match becomes ``(eta * out if scale_out else out) +
    (1 - eta) * mean_t softmax_window(scale q k^T) v`` over its kept other images. Per kept match the window's
    logits come 8 keys at a time from a transposed copy of the keys (``B V H d (N + 2 wc + 8)`` floats; with
    ``clamp`` one dot product an entry), their exponentials 8 at a time, and the values are summed with the
    weights: about ``(2 wr + 1) (2 wc + 1) (d + dv)`` multiply-adds, where a dense block computes ``N (d + dv)``.
    The heads are split over ``torch.get_num_threads()`` threads. Raises RuntimeError where the kernel is
    unavailable, ShapeError or ValueRangeError for tensors it cannot take.
    """
    fn = load_window_kernel()
    if fn is None:
        raise RuntimeError(f"window kernel unavailable: {match_kernel_status()}")
    q, k, v, out = rows
    if not all(isinstance(t, torch.Tensor) and t.ndim == 2 and t.is_contiguous() and t.dtype == torch.float32
               and t.device.type == "cpu" for t in rows) or q.shape[1] != k.shape[1] or v.shape[1] != out.shape[1]:
        raise ShapeError(f"window_attention: expected contiguous CPU float32 row tensors q, k (R, d) and v, out "
                         f"(R, dv); got {', '.join(describe(t) for t in rows)}")
    if index.ndim != 5 or kept.shape != index.shape:
        raise ShapeError(f"window_attention: expected index and kept of one shape (B, V, H', V-1, N), got "
                         f"{describe(index)} and {describe(kept)}")
    B, V, Hp, _, N = index.shape
    H, (wr, wc) = int(heads), (int(window[0]), int(window[1]))
    d, dv = q.shape[1], v.shape[1]
    if Hp not in (1, H) or index.shape[3] != V - 1 or V < 2 or int(grid[0]) * int(grid[1]) != N or min(wr, wc) < 0:
        raise ShapeError(f"window_attention: index {describe(index)} does not fit heads={H}, grid={tuple(grid)} "
                         f"and window={tuple(window)}")
    for name, t, s in zip(("q", "k", "v", "out"), rows, strides):
        last = int(s[0]) + sum(int(x) * (n - 1) for x, n in zip(s[1:], (B, V, H, N)))
        if len(s) != 5 or min(int(x) for x in s) < 0 or last >= t.shape[0]:
            raise ShapeError(f"window_attention: {name} rows {describe(t)} do not hold rows {tuple(s)} of "
                             f"(B, V, H, N) = {(B, V, H, N)}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= N):
        raise ValueRangeError(f"window_attention: index: expected token indices in [0, {N}), got values in "
                              f"[{int(index.min())}, {int(index.max())}]")
    jobs = B * V * H
    if jobs == 0 or N == 0:
        return
    index = index.to(torch.int64).contiguous()
    kept = kept.to(torch.uint8).contiguous()
    targets = torch.arange(V - 1)[None] + (torch.arange(V - 1)[None] >= torch.arange(V)[:, None]).long()
    st = [torch.tensor([int(x) for x in s], dtype=torch.int64) for s in strides]
    if clamp:
        kT = k  # not read
    else:
        s = [int(x) for x in strides[1]]
        keys = k.as_strided((B, V, H, N, d), (s[1] * d, s[2] * d, s[3] * d, s[4] * d, 1), s[0] * d)
        kT = k.new_zeros((B, V, H, d, N + 2 * wc + 8))
        kT[..., wc:wc + N] = keys.transpose(-1, -2)
    workers = max(1, min(jobs, torch.get_num_threads()))
    entries = (2 * wr + 1) * (2 * wc + 8) + 8  # the window's logits in whole vectors, per thread
    work = torch.empty((workers, entries + dv), dtype=torch.float32)
    tok = torch.empty((workers, entries), dtype=torch.int64)

    def run(w: int, j0: int, j1: int) -> None:
        fn(q.data_ptr(), st[0].data_ptr(), k.data_ptr(), st[1].data_ptr(), kT.data_ptr(), v.data_ptr(),
           st[2].data_ptr(), out.data_ptr(), st[3].data_ptr(), index.data_ptr(), kept.data_ptr(), targets.data_ptr(),
           wr, wc, V, H, Hp, N, d, dv, int(grid[0]), int(grid[1]), int(bool(clamp)), float(scale), float(eta),
           int(bool(scale_out)), j0, j1, work[w].data_ptr(), tok[w].data_ptr())

    _split(run, jobs, workers)
