"""Float64 reference of the native matcher, and the margins that make an exact comparison with it valid.

The matcher works in float32 (chunked, batched over target images), the reference in float64 on the
full similarity matrix: two different computations, so their confidences agree only up to rounding.
Their argmax indices and kept flags are compared exactly, which is valid only when no near-tie
exists that rounding could flip. :func:`assert_unambiguous` checks that on the case at hand.
"""
from __future__ import annotations

import itertools

import torch

#: float32 unit roundoff.
U32 = 2.0 ** -24
#: The tolerance the tests use for float32 confidences against the float64 reference.
CONF_RTOL, CONF_ATOL = 1e-5, 1e-6


def logit_error_bound(q, k, scale, heads="per_head") -> float:
    """Worst-case float32 rounding of a gap between two matcher scores (log-probabilities).

    A float32 dot product of length D is off by at most ``D * u * sum_i |q_i k_i|`` (Higham's gamma_D
    bound, u = 2^-24). A gap involves two logits, and the dual softmax's normalisers add as much
    again: hence the factor 4. ``heads="mean"`` dots the concatenated heads (D = heads * d, scale / heads).
    """
    q, k = q.double().abs(), k.double().abs()
    abs_dot = scale * torch.einsum("hnd,hmd->hnm", q, k)
    dim = q.shape[-1]
    if heads == "mean":
        abs_dot, dim = abs_dot.mean(dim=0), dim * q.shape[0]
    return 4 * dim * U32 * float(abs_dot.max())


def naive_match(q, k, grid, scale, similarity, heads, confidence, threshold, window_radius, mutual):
    """Full (H', Ns, Nt) similarity matrix, written as directly as possible (float64)."""
    q, k = q.double(), k.double()
    sim = scale * torch.einsum("hnd,hmd->hnm", q, k)
    if heads == "mean":
        sim = sim.mean(dim=0, keepdim=True)
    p = torch.softmax(sim, dim=-1)
    if similarity == "dual_softmax":
        p = p * torch.softmax(sim, dim=-2)
    conf, index = p.max(dim=-1)
    if confidence == "window":
        h, w = grid
        conf = torch.empty_like(conf)
        for hh, n in itertools.product(range(sim.shape[0]), range(sim.shape[1])):
            row, col = divmod(int(index[hh, n]), w)
            grid_sim = sim[hh, n].reshape(h, w)
            win = grid_sim[max(row - window_radius, 0): row + window_radius + 1,
                           max(col - window_radius, 0): col + window_radius + 1]
            conf[hh, n] = torch.exp(grid_sim[row, col] - torch.logsumexp(win.reshape(-1), dim=0))
    kept = conf >= threshold
    if mutual:
        best_src = p.argmax(dim=-2)  # (H', Nt)
        kept &= best_src.gather(-1, index) == torch.arange(sim.shape[1])
    return index, conf, kept


def assert_unambiguous(q, k, grid, scale, similarity="softmax", heads="per_head", confidence="global",
                       threshold=0.05, window_radius=3, mutual=False):
    """Fail unless the exact index / kept comparison of a float32 matcher with :func:`naive_match` is valid.

    Checks, on the float64 reference of one ``(heads, Ns, d)`` x ``(heads, Nt, d)`` case: every row argmax
    (and, with ``mutual``, every column argmax) wins by more than :func:`logit_error_bound` in log-probability, and
    every confidence lies further from ``threshold`` than float32 rounding can move it.
    """
    bound = logit_error_bound(q, k, scale, heads)
    q, k = q.double(), k.double()
    sim = scale * torch.einsum("hnd,hmd->hnm", q, k)
    if heads == "mean":
        sim = sim.mean(dim=0, keepdim=True)
    log_p = sim - torch.logsumexp(sim, dim=-1, keepdim=True)
    if similarity == "dual_softmax":
        log_p = log_p + sim - torch.logsumexp(sim, dim=-2, keepdim=True)
    top = log_p.topk(2, dim=-1).values
    row_gap = float((top[..., 0] - top[..., 1]).min())
    assert row_gap > bound, f"near-tie in a row argmax (gap {row_gap:.2e} <= rounding bound {bound:.2e})"
    if mutual:
        col = log_p.topk(2, dim=-2).values
        col_gap = float((col[..., 0, :] - col[..., 1, :]).min())
        assert col_gap > bound, f"near-tie in a column argmax (gap {col_gap:.2e} <= rounding bound {bound:.2e})"
    _, conf, _ = naive_match(q, k, grid, scale, similarity, heads, confidence, threshold, window_radius, False)
    slack = CONF_ATOL + max(CONF_RTOL, bound) * conf.abs()  # conf = exp(score gap): relative error <= bound
    close = (conf - threshold).abs() <= slack
    assert not close.any(), f"{int(close.sum())} confidence(s) within rounding of threshold {threshold}"
