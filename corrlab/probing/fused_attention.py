"""Fused probe kernel: one multi-image attention call and its native matches, from the same logits.

The probe's exact mode lets the model's own kernel (SDPA) compute the attention output and then, for
matching, computes the cross-image logits ``scale * q_i . k_j`` a second time and runs its own softmax
normalisers over them (max, exp, sum per target image). The fused mode computes the recorded batch entry's
output and its matches from one set of logits. Three implementations, chosen per call:

**compiled** (per_head + global confidence, float32 on the CPU: the probe's defaults; used wherever a C compiler
is present): :func:`corrlab.probing.match_kernel.attention_matches`, one C call per layer call. Per head and per
block of a few query rows it forms the logits (a register tile), each target image block's max and first argmax
(the argmax of :func:`corrlab.probing.matcher.match_views`, whose ties also resolve to the first index), the
softmax numerators ``P = exp(S - M)`` with the row sum ``Z``, the global confidence
``1 / sum_{l in b} exp(S_l - m_b) = exp(m_b - M) / Z_b``, and ``(P @ v) / Z``. The logits of those few rows are the
only intermediate. Where a block's max lies more than :data:`UNDERFLOW_GAP` below the row max, that block's
confidence is summed from its own max (its numerators lose precision there).

**flash + logits** (the same options where no C compiler is found): torch's flash-attention kernel on the entry
with ``V`` one-hot columns appended to v (and zero columns to q, k): it returns the output, each row's attention
mass on every image block (``Z_b / Z``) and ``log Z``; then, in blocks of ``chunk_size // heads`` query rows of all
heads (at most ``chunk_size x V*N`` logits at once), ``S`` again for the block max and first argmax (three
vectorised passes, :func:`_first_block_argmax`) and the confidence ``exp(m_b - log Z) / (Z_b / Z)``.

**general** (``heads="mean"``, ``confidence="window"``, other dtypes or devices): in the same blocks, ``S`` once;
block max and first argmax as above (of the head-averaged logits ``mean_h S_h`` for ``heads="mean"``);
``P = softmax(S)`` over all keys (torch's softmax kernel, into a reused buffer); the output ``P @ v``; the global
confidence ``P[argmax_b] / sum_{l in b} P_l`` from the same exponentials (``heads="mean"``: one exp pass over the
averaged logits; ``"window"``: the window softmax of :mod:`corrlab.probing.matcher`, read from ``S``).

Supported matching options: ``similarity="softmax"``, ``heads`` ``"per_head"`` or ``"mean"``,
``confidence`` ``"global"`` or ``"window"``, ``threshold`` / ``strict``. ``dual_softmax`` and ``mutual``
need a second pass over all source rows (their column statistics) and are left to the exact mode.

Tolerance: the output differs from SDPA's only by float32 rounding (another summation order):
``|out - sdpa| <= 1e-5 + 1e-4 |sdpa|``, see tests/test_interception.py and tests/test_match_kernel.py; matches
equal the exact mode's except where two logits of a row are within rounding of each other (a tie that may flip).

Cost (embedded model, CPU, 1 thread; ``benchmarks/probe_overhead.py``, figures in the README): the compiled path
costs about what SDPA costs for the same entry (both compute the logits, the exponentials and ``P @ v`` once;
the matches add one max/argmax pass over logits already in cache), so a probe of every layer at every step
costs about as much as an unprobed run; the flash + logits path costs about three SDPA entries per recorded
entry.
"""
from __future__ import annotations

import torch

from ..errors import CorrlabError, ShapeError, describe
from .matcher import Workspace, _window_centre_probability
from .match_kernel import attention_matches, load_match_kernel

__all__ = ["fused_attention_matches", "check_fused_options", "UNDERFLOW_GAP"]

#: A block whose max lies more than this below the row max gets its confidence from fresh logits
#: (``exp(-60)`` ~ 1e-26: its exponentials stay normal float32 numbers down to 27 more units below).
UNDERFLOW_GAP = 60.0


def check_fused_options(options: dict) -> None:
    """Raise :class:`CorrlabError` for matching options the fused kernel cannot serve in one pass."""
    bad = []
    if options.get("similarity", "softmax") != "softmax":
        bad.append(f"similarity={options['similarity']!r}")
    if options.get("mutual", False):
        bad.append("mutual=True")
    if bad:
        raise CorrlabError(
            f"kernel: 'fused' computes matches in one pass over the logits and supports similarity='softmax' "
            f"without mutual, got {', '.join(bad)}; use kernel='exact' for these options"
        )


def _first_block_argmax(blocks: torch.Tensor, block_max: torch.Tensor, ramp: torch.Tensor,
                        work: torch.Tensor) -> torch.Tensor:
    """First index of each block's max, ``(..., n) -> (...)`` long, in three vectorised passes.

    ``block_max``: ``blocks.amax(-1, keepdim=True)``; ``ramp``: ``(n, n-1, ..., 1)`` in blocks' dtype; ``work``:
    a scratch tensor of blocks' shape and dtype. ``work = (blocks >= max) * ramp`` holds ``n - position`` at every
    maximum and 0 elsewhere, so its max is ``n`` minus the first maximum's position: the argmax of
    :func:`corrlab.probing.matcher.max_argmax` (ties resolve to the first index). On this CPU (AVX2) the three
    passes measured 60-80 % of ``max_pool1d`` with indices (which does not vectorise over a row).
    """
    n = blocks.shape[-1]
    torch.ge(blocks, block_max, out=work)
    first = work.mul_(ramp).amax(-1)
    return first.neg_().add_(n).long().clamp_(0, n - 1)  # clamp: a NaN row (no maximum found) stays in range


@torch.no_grad()
def fused_attention_matches(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int],
    *,
    scale: float,
    heads: str = "per_head",
    confidence: str = "global",
    threshold: float = 0.05,
    window_radius: int = 3,
    chunk_size: int = 256,
    strict: bool = False,
    similarity: str = "softmax",
    mutual: bool = False,
    workspace: Workspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention output of one batch entry and the native matches of every ordered image pair.

    Args:
        q, k, v: ``(heads, V*N, d)`` one batch entry's kernel tensors, image tokens only, view-major
            (token ``v*N + t``), ``N = h*w``.
        grid: ``(h, w)`` token grid of every image.
        scale: the kernel's softmax scale.
        heads, confidence, threshold, window_radius, chunk_size, strict: matching options (see
            :mod:`corrlab.probing.matcher`); ``similarity`` / ``mutual`` must be their one-pass values.
            ``chunk_size`` bounds the logits that exist at once to ``chunk_size x V*N`` (all heads of
            ``chunk_size // heads`` query rows per block).
        workspace: scratch buffers reused across calls (a probe keeps one); None = fresh ones.

    Returns:
        ``out (heads, V*N, d)`` in q's dtype, and ``index``, ``confidence`` (float32), ``kept``, each
        ``(H', V, V, N)``: source image, target image, source token (the diagonal ``[:, i, i]`` is the
        image against itself, not a match; callers drop it). ``H'`` = heads, or 1 for ``heads="mean"``.
    """
    check_fused_options({"similarity": similarity, "mutual": mutual})
    if q.ndim != 3 or k.shape != q.shape or v.ndim != 3 or v.shape[:2] != q.shape[:2]:
        raise ShapeError(f"q, k, v: expected (heads, V*N, d) self-attention tensors, got {describe(q)}, "
                         f"{describe(k)}, {describe(v)}")
    H, L, d = q.shape
    h, w = int(grid[0]), int(grid[1])
    n = h * w
    if n < 1 or L % n:
        raise ShapeError(f"grid: expected h*w to divide the {L} tokens, got {grid!r}")
    V = L // n
    dev = q.device
    dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    ws = workspace if workspace is not None else Workspace()
    qs = q.to(dtype) * float(scale)
    k_t = k.to(dtype).transpose(-1, -2)  # (H, d, L): a view, the matmul reads it transposed
    vv = v.to(dtype)
    mean = heads == "mean"
    hp = 1 if mean else H
    dv = v.shape[-1]
    per_head_global = not mean and confidence == "global"
    compiled = per_head_global and dtype == torch.float32 and dev.type == "cpu" and load_match_kernel() is not None
    sdpa = None
    if compiled:  # one C call: logits, matches and output, a few query rows at a time (see match_kernel)
        out, index, conf = attention_matches(qs, k.to(dtype), vv, V, UNDERFLOW_GAP)
    else:  # torch: the flash kernel plus the logits again (per_head / global), else the general path
        sdpa = _sdpa_with_block_masses(qs, k.to(dtype), vv, n, 1.0) if per_head_global else None
        out = torch.empty((H, L, dv), dtype=dtype, device=dev)
        index = torch.empty((hp, L, V), dtype=torch.long, device=dev)  # (head, source token, target image)
        conf = torch.empty((hp, L, V), dtype=dtype, device=dev)
        ramp = torch.arange(n, 0, -1, dtype=dtype, device=dev)
        rows = max(1, min(L, int(chunk_size) // H))  # all heads of `rows` query rows: chunk_size x L logits
    if sdpa is not None:
        # output, block masses Z_b / Z and log Z from torch's kernel; the logits again (in blocks) for the
        # argmax, which no kernel returns: confidence of block b = exp(m_b - log Z) / (Z_b / Z)
        out, mass, lse = sdpa
        for r0 in range(0, L, rows):
            r1 = min(r0 + rows, L)
            C = r1 - r0
            S = torch.matmul(qs[:, r0:r1], k_t, out=ws.get("fused_logits", (H, C, L), dtype, dev))
            blocks = S.view(H, C, V, n)
            block_max = blocks.amax(-1, keepdim=True)  # (H, C, V, 1)
            work = ws.get("fused_work", (H, C, V, n), dtype, dev)
            index[:, r0:r1] = _first_block_argmax(blocks, block_max, ramp, work)
            bm = block_max.squeeze(-1)
            c = torch.sub(bm, lse[:, r0:r1, None]).exp_().div_(mass[:, r0:r1]).clamp_(max=1.0)
            low = (bm - bm.amax(-1, keepdim=True)) < -UNDERFLOW_GAP
            if bool(low.any()):  # a block far below the row max: its mass lost precision; from the logits
                c = torch.where(low, torch.sub(blocks, block_max, out=work).exp_().sum(-1).reciprocal_(), c)
            conf[:, r0:r1] = c
    elif not compiled:
        for r0 in range(0, L, rows):
            r1 = min(r0 + rows, L)
            C = r1 - r0
            S = torch.matmul(qs[:, r0:r1], k_t, out=ws.get("fused_logits", (H, C, L), dtype, dev))  # (H, C, L)
            src = torch.mean(S, 0, keepdim=True, out=ws.get("fused_mean", (1, C, L), dtype, dev)) if mean else S
            blocks = src.view(hp, C, V, n)
            block_max = blocks.amax(-1, keepdim=True)  # (H', C, V, 1)
            work = ws.get("fused_work", (hp, C, V, n), dtype, dev)
            idx = _first_block_argmax(blocks, block_max, ramp, work)  # (H', C, V)
            index[:, r0:r1] = idx
            if confidence == "window":
                conf[:, r0:r1] = _window_centre_probability(blocks, idx, (h, w), window_radius)
            elif mean:  # the head-averaged logits are not the output's: their own exponentials
                conf[:, r0:r1] = torch.sub(blocks, block_max, out=work).exp_().sum(-1).reciprocal_()
            # the output: softmax over all V*N keys (torch's fused kernel: max, exp, sum, scale), then P @ v
            P = torch.ops.aten._softmax.out(S, -1, False, out=ws.get("fused_probs", (H, C, L), dtype, dev))
            out[:, r0:r1] = torch.matmul(P, vv, out=ws.get("fused_out", (H, C, dv), dtype, dev))
            if not mean and confidence == "global":
                # confidence of block b from the same exponentials: P at its argmax over P's sum over the block
                pb = P.view(H, C, V, n)
                c = pb.gather(-1, idx.unsqueeze(-1)).squeeze(-1).div_(pb.sum(-1))
                gap = block_max.squeeze(-1)
                gap = gap - gap.amax(-1, keepdim=True)  # block max - row max, <= 0
                low = gap < -UNDERFLOW_GAP
                if bool(low.any()):  # those blocks' exponentials lost precision: normalisers from fresh logits
                    fresh = torch.matmul(qs[:, r0:r1], k_t).view(H, C, V, n)
                    exact = torch.sub(fresh, block_max).exp_().sum(-1).reciprocal_()
                    c = torch.where(low, exact, c)
                conf[:, r0:r1] = c
    index = index.view(hp, V, n, V).permute(0, 1, 3, 2)  # (H', source image, target image, N)
    conf = conf.view(hp, V, n, V).permute(0, 1, 3, 2)
    threshold_t = torch.tensor(float(threshold), dtype=dtype, device=dev)
    kept = conf > threshold_t if strict else conf >= threshold_t
    return out.to(q.dtype), index, conf.to(torch.float32), kept


def _sdpa_with_block_masses(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int, scale: float):
    """torch's CPU flash-attention kernel on ``(H, L, d)`` tensors, with ``V = L // n`` one-hot columns appended to v.

    Returns ``(out (H, L, d), mass (H, L, V), lse (H, L))``: the attention output, each row's attention mass
    on every image block (``sum_{l in b} softmax(S)_l = Z_b / Z``) and the row's log-sum-exp ``log Z``, all
    from the kernel's one pass over the logits. q and k get V zero columns (dot products unchanged) so the
    three share a head size, as the kernel requires. None when the kernel is not available here.
    """
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or q.device.type != "cpu" or q.dtype != torch.float32 or v.shape[-1] != q.shape[-1]:
        return None
    H, L, d = q.shape
    V = L // n
    onehot = torch.zeros((L, V), dtype=q.dtype)
    onehot.view(V, n, V).diagonal(dim1=0, dim2=2).fill_(1.0)  # token t of image b: column b
    qp = torch.nn.functional.pad(q, (0, V))[None]
    kp = torch.nn.functional.pad(k, (0, V))[None]
    vp = torch.cat([v, onehot.expand(H, L, V)], dim=-1)[None]
    out, lse = op(qp, kp, vp, scale=float(scale))[:2]
    return out[0, :, :, :d], out[0, :, :, d:], lse[0].view(H, L)
