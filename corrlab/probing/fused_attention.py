"""Fused probe kernel: one multi-image attention call and its native matches from the same logits.

The probe's exact mode lets the model's own kernel (SDPA) compute the attention output and then
computes the cross-image logits ``scale * q_i . k_j`` a second time for matching (SDPA returns no
weights). The fused mode computes, for the recorded batch entry, the attention output itself from the
logits the matching reads:

for each block of ``C = chunk_size`` query rows of one head (``heads="mean"``: ``chunk_size // heads`` rows
of all heads), so at most ``chunk_size x V*N`` logits exist at once, never the full ``V*N x V*N`` map:

1. ``S = (scale q) k^T`` over all ``V*N`` keys (one matmul; the only pass that reads q and k);
2. per target image block: max and first argmax (``max_pool1d`` with indices: one pass, the argmax of
   :func:`corrlab.probing.matcher.match_views`, whose ties also resolve to the first index);
3. ``M`` = the row max (the largest block max), ``E = exp(S - M)`` in place, block sums ``Z_b``;
4. the attention output ``(E @ v) / sum_b Z_b`` (what SDPA computes, up to float rounding);
5. the matching confidence of block b, ``max_l softmax_l(S_b) = exp(m_b - M) / Z_b`` (the same number
   as the matcher's ``1 / sum_l exp(S_l - m_b)``, from the shared exponentials). Where a block's max lies
   more than :data:`UNDERFLOW_GAP` below the row max its exponentials lose precision, and that block's
   confidence is recomputed from fresh logits (rare: a row that ignores a whole image).

Supported matching options: ``similarity="softmax"``, ``heads`` ``"per_head"`` or ``"mean"`` (the
head-averaged logits ``mean_h S_h``, then the same scores), ``confidence`` ``"global"`` or ``"window"``
(read from ``S`` before step 3), ``threshold`` / ``strict``. ``dual_softmax`` and ``mutual`` need a
second pass over all source rows (their column statistics) and are left to the exact mode.

Tolerance: the output differs from SDPA's only by float32 rounding of a different summation order
(``|out - sdpa| <= 1e-5 + 1e-4 |sdpa|``, see tests/test_interception.py); matches equal the exact
mode's except where two logits of a row are within rounding of each other (a tie that may flip).
"""
from __future__ import annotations

import torch

from ..errors import CorrlabError, ShapeError, describe
from .matcher import _window_centre_probability, max_argmax

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


def _block_max(x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Max and first argmax over consecutive blocks of ``n`` along the last dim: ``(..., B*n) -> (..., B)``."""
    return max_argmax(x.unflatten(-1, (x.shape[-1] // n, n)))


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention output of one batch entry and the native matches of every ordered image pair.

    Args:
        q, k, v: ``(heads, V*N, d)`` one batch entry's kernel tensors, image tokens only, view-major
            (token ``v*N + t``), ``N = h*w``.
        grid: ``(h, w)`` token grid of every image.
        scale: the kernel's softmax scale.
        heads, confidence, threshold, window_radius, chunk_size, strict: matching options (see
            :mod:`corrlab.probing.matcher`); ``similarity`` / ``mutual`` must be their one-pass values.

    Returns:
        ``out (heads, V*N, d)`` in q's dtype, and ``index``, ``confidence`` (float32), ``kept``, each
        ``(H', V, V, N)``: source image, target image, source token (the diagonal ``[:, i, i]`` is the
        image against itself, not a match; callers drop it). ``H'`` = heads, or 1 for ``heads="mean"``.
    """
    check_fused_options({"similarity": similarity, "mutual": mutual})
    if q.ndim != 3 or k.shape != q.shape or v.shape[:2] != q.shape[:2]:
        raise ShapeError(f"q, k, v: expected (heads, V*N, d) self-attention tensors, got {describe(q)}, "
                         f"{describe(k)}, {describe(v)}")
    H, L, d = q.shape
    h, w = int(grid[0]), int(grid[1])
    n = h * w
    if n < 1 or L % n:
        raise ShapeError(f"grid: expected h*w to divide the {L} tokens, got {grid!r}")
    V = L // n
    dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qs = q.to(dtype) * float(scale)
    k_t = k.to(dtype).transpose(-1, -2).contiguous()  # (H, d, L)
    vv = v.to(dtype).contiguous()
    hp = H if heads == "per_head" else 1
    out = torch.empty((H, L, v.shape[-1]), dtype=dtype, device=q.device)
    index = torch.empty((hp, V, V, n), dtype=torch.long, device=q.device)
    conf = torch.empty((hp, V, V, n), dtype=dtype, device=q.device)
    # per_head: one head at a time (2-D matmuls, a C x L block stays in cache), C = chunk_size rows;
    # mean: all heads of C = chunk_size // heads rows at once (the head average needs them together)
    group = 1 if heads == "per_head" else H
    rows = max(1, int(chunk_size) // group)
    buf = torch.empty(group * min(rows, n) * L, dtype=dtype, device=q.device)  # reused by every block

    for h0 in range(0, H, group):
        hs = slice(h0, h0 + group)
        for i in range(V):
            for s0 in range(0, n, rows):
                s1 = min(s0 + rows, n)
                C, r0, r1 = s1 - s0, i * n + s0, i * n + s1
                S = torch.matmul(qs[hs, r0:r1], k_t[hs], out=buf[: group * C * L].view(group, C, L))  # (G, C, L)
                blocks = S.view(group, C, V, n)
                vals, idx = _block_max(S, n)  # (G, C, V): per-head block max and first argmax
                row_max = vals.amax(-1, keepdim=True)  # (G, C, 1)
                target = (slice(None) if heads == "mean" else hs, i, slice(None), slice(s0, s1))
                if heads == "mean":
                    mean = S.mean(0, keepdim=True)  # (1, C, L): the head-averaged logits
                    m_vals, m_idx = _block_max(mean, n)
                    mb = mean.view(1, C, V, n)
                    if confidence == "window":
                        c = _window_centre_probability(mb.transpose(1, 2), m_idx.transpose(1, 2), (h, w), window_radius)
                    else:
                        c = 1.0 / (mb - m_vals.unsqueeze(-1)).exp_().sum(-1).transpose(1, 2)
                    index[target] = m_idx.transpose(1, 2)
                    conf[target] = c
                elif confidence == "window":
                    index[target] = idx.transpose(1, 2)
                    conf[target] = _window_centre_probability(blocks.transpose(1, 2), idx.transpose(1, 2), (h, w),
                                                              window_radius)
                S.sub_(row_max).exp_()
                z_blocks = blocks.sum(-1)  # (G, C, V)
                o = out[hs, r0:r1]
                torch.matmul(S, vv[hs], out=o)
                o.div_(z_blocks.sum(-1, keepdim=True))
                if heads == "per_head" and confidence == "global":
                    gap = vals - row_max
                    c = gap.exp().div_(z_blocks)
                    low = gap < -UNDERFLOW_GAP
                    if bool(low.any()):  # recompute those blocks' normalisers from fresh logits
                        fresh = torch.matmul(qs[hs, r0:r1], k_t[hs]).view(group, C, V, n)
                        exact = 1.0 / (fresh - vals.unsqueeze(-1)).exp_().sum(-1)
                        c = torch.where(low, exact, c)
                    index[target] = idx.transpose(1, 2)
                    conf[target] = c.transpose(1, 2)
    threshold_t = torch.tensor(float(threshold), dtype=dtype, device=q.device)
    kept = conf > threshold_t if strict else conf >= threshold_t
    return out.to(q.dtype), index, conf.to(torch.float32), kept
