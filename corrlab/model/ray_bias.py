"""An epipolar attention bias from Plücker rays, carried in the queries and keys (for :class:`MultiViewUNet`).

Two rays ``r_i = (d_i, m_i)`` and ``r_j = (d_j, m_j)`` (unit direction, moment ``m = o x d``) meet, or are
parallel, exactly when their reciprocal product ``d_i . m_j + m_i . d_j`` is zero: token ``j`` of another view
lies on token ``i``'s epipolar line. Tokens of the same view share a centre, so their product is always zero.
The bias subtracts ``lambda_h * (d_i . m_j + m_i . d_j)^2`` from every attention logit of head ``h``, a soft
epipolar constraint whose strength ``lambda_h = scale * gain_h`` each head learns (``gain`` starts at zero: a model
with the option and zero gains computes the same function as without it, up to float rounding; ``scale`` is
:class:`~corrlab.model.MultiViewUNet`'s ``epipolar_gain_scale``).

Magnitudes (renderer's "train" layout, 16 x 16 tokens at 64 px, ``scene_scale`` 1): the product is about 0.03
between a token and its true match, 0.1 one token off it and 0.5 for an arbitrary token of the other view, so a
head separates the match from its neighbours only once ``lambda`` is in the hundreds.

The square of a bilinear form is bilinear in outer products, ``(a . b)^2 = sum_{k<=l} w_kl (a_k a_l)(b_k b_l)``
(``w`` 1 on the diagonal, 2 off it: the 21 distinct entries of the symmetric ``a a^T``), so the bias travels as
21 extra channels of q and k: ``q' = [q, -lambda_h sqrt(d) w * sym(r_i r_i^T)]``, ``k' = [k, sym(r~_j r~_j^T)]``
with ``r~ = (m, d)``, and the kernel is called with ``scale = 1 / sqrt(d)``. Its logits are then
``q.k / sqrt(d) - lambda_h (d_i . m_j + m_i . d_j)^2`` exactly, and corrlab's probes, which intercept the kernel,
read the attention the model really computes. ``v`` gets 21 zero channels, dropped from the output: torch's
fused CPU kernel needs equal head sizes for q, k and v and otherwise falls back to an unfused path about twice
as slow as this.

The product is proportional to the baseline between the two cameras (``p = (o_i - o_j) . (d_i x d_j)``), so the
penalty fades as two views come together: under 15 degrees apart it is about 1/50 of its size where the renderer's
'train' layout puts views (``benchmarks/epipolar_bias_scale.py``). ``MultiViewUNet(epipolar_normalise=True)``
divides it, per token and other view, by ``|b x d_i|`` (:func:`baseline_normalisers`; 21 channels per view
instead of 21), which leaves ``|sin phi|``, the angle of ray ``j`` from token ``i``'s epipolar plane.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import ShapeError, describe
from .attention_heads import merge_heads, project_heads, require_self_attention

__all__ = ["unit_rays", "reciprocal_product", "baseline_normalisers", "EpipolarBiasAttnProcessor"]



def unit_rays(rays: torch.Tensor) -> torch.Tensor:
    """``(..., 6)`` Plücker rays ``(d, m)`` with any ``|d| > 0`` -> the same rays with unit ``d``.

    Dividing both parts by ``|d|`` keeps ``m = o x d``; an average of one camera's rays is such a ray
    (the moment is linear in the direction).
    """
    if rays.shape[-1] != 6:
        raise ShapeError(f"rays: expected (..., 6) Plücker rays, got {describe(rays)}")
    return rays / rays[..., :3].norm(dim=-1, keepdim=True).clamp_min(1e-12)


def reciprocal_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(..., N, 6)``, ``(..., M, 6)`` rays -> ``(..., N, M)`` reciprocal products ``d_a . m_b + m_a . d_b``."""
    return a[..., :3] @ b[..., 3:].transpose(-1, -2) + a[..., 3:] @ b[..., :3].transpose(-1, -2)


_ROWS, _COLS = torch.triu_indices(6, 6)
_WEIGHTS = torch.where(_ROWS == _COLS, 1.0, 2.0)


def _sym_outer(r: torch.Tensor, weighted: bool = False) -> torch.Tensor:
    """``(..., 6)`` -> ``(..., 21)`` the upper triangle of ``r r^T`` (off-diagonal entries doubled if ``weighted``)."""
    out = r[..., _ROWS] * r[..., _COLS]
    return out * _WEIGHTS.to(out) if weighted else out


def view_one_hot(tokens: int, views: int, device=None) -> torch.Tensor:
    """``(tokens, views)`` bool: which view each of ``tokens = views * T`` view-major tokens belongs to."""
    return (torch.arange(tokens, device=device) // (tokens // views))[:, None] == torch.arange(views, device=device)


def baseline_normalisers(rays: torch.Tensor, centres: torch.Tensor, reference: float) -> torch.Tensor:
    """Per token and view, the factor that turns ``p^2`` into ``(reference * sin phi)^2``.

    ``p = (o_i - o_j) . (d_i x d_j) = -|b x d_i| (d_j . n_i)``, ``b = o_u - o_i`` the baseline to view ``u`` of token
    ``j`` and ``n_i`` the unit normal of token ``i``'s epipolar plane, so ``|p| / |b x d_i| = |sin phi|``, ``phi`` the
    angle of ray ``j`` from that plane: the distance from the epipolar line as an angle, whatever the baseline.

    Args:
        rays: ``(B, S, 6)`` unit rays of ``S = V * T`` tokens, view-major; centres: ``(B, V, 3)`` camera centres.
        reference: the ``|b x d_i|`` at which the factor is 1 (a typical value of the training layout, so that a
            model trained without the normalisation sees about the same bias there).

    Returns:
        ``(B, S, V)``: ``(reference / max(|b x d_i|, reference / 10))^2`` for the other views, 0 for the token's own
        view (whose tokens share its centre: ``p = 0``). The floor bounds the factor where ray ``i`` points at the
        other camera (its epipolar plane is undefined there, and ``p`` is 0 for every ``j``).
    """
    S, V = rays.shape[1], centres.shape[1]
    own = view_one_hot(S, V, rays.device)  # (S, V)
    base = centres[:, None, :, :] - centres[:, own.nonzero()[:, 1]][:, :, None, :]  # (B, S, V, 3): o_u - o_i
    n = torch.linalg.cross(base, rays[..., None, :3].expand_as(base), dim=-1).norm(dim=-1)
    w = (reference / n.clamp_min(reference / 10)) ** 2
    return w.masked_fill(own, 0.0)


class EpipolarBiasAttnProcessor:
    """Self-attention with the Plücker epipolar bias; called as ``attn(x, rays=(B, S, 6), strength=(heads,))``,
    ``strength`` the per-head ``lambda_h``.

    With ``centres=(B, V, 3)`` (the views' camera centres, tokens view-major) and ``reference`` the bias is
    normalised per token and other view (:func:`baseline_normalisers`): ``lambda_h (reference sin phi)^2``, which does
    not fade as two views come together. It travels as 21 channels of q and k per view (those of view ``u`` carry
    token ``i``'s factor for ``u`` in q, and are non-zero in k only for tokens of view ``u``), so the kernel stays
    one fused call with ``21 V`` extra channels instead of 21.
    """

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 temb=None, rays: torch.Tensor | None = None, strength: torch.Tensor | None = None,
                 centres: torch.Tensor | None = None, reference: float | None = None) -> torch.Tensor:
        require_self_attention("EpipolarBiasAttnProcessor", encoder_hidden_states, attention_mask)
        B, S, _ = hidden_states.shape
        heads = attn.heads
        if rays is None or tuple(rays.shape) != (B, S, 6):
            raise ShapeError(f"rays: expected ({B}, {S}, 6) unit Plücker rays of the tokens, got {describe(rays)}")
        if strength is None or tuple(strength.shape) != (heads,):
            raise ShapeError(f"strength: expected ({heads},) per-head strengths, got {describe(strength)}")
        if centres is not None and (centres.ndim != 3 or centres.shape[0] != B or centres.shape[2] != 3
                                    or centres.shape[1] < 1 or S % centres.shape[1] or reference is None):
            raise ShapeError(f"centres: expected ({B}, V, 3) camera centres with V dividing {S} tokens and a reference, "
                             f"got {describe(centres)} and reference={reference!r}")
        query, key, value = project_heads(attn, hidden_states)
        head_dim = query.shape[-1]
        r = rays.to(query.dtype)
        swapped = torch.cat([r[..., 3:], r[..., :3]], dim=-1)
        lam = strength.to(query.dtype)[None, :, None, None]
        q_extra, k_extra = _sym_outer(r, weighted=True), _sym_outer(swapped)  # (B, S, 21)
        if centres is not None:
            V = centres.shape[1]
            w = baseline_normalisers(r, centres.to(query.dtype), float(reference))  # (B, S, V)
            q_extra = (q_extra[:, :, None, :] * w[..., None]).reshape(B, S, -1)
            own = view_one_hot(S, V, r.device).to(query.dtype)  # k: non-zero only in the block of the token's view
            k_extra = (k_extra[:, :, None, :] * own[None, :, :, None]).reshape(B, S, -1)
        extra = q_extra.shape[-1]
        query = torch.cat([query, -lam * math.sqrt(head_dim) * q_extra[:, None].expand(B, heads, S, extra)], dim=-1)
        key = torch.cat([key, k_extra[:, None].expand(B, heads, S, extra)], dim=-1)
        value = torch.cat([value, value.new_zeros(B, heads, S, extra)], dim=-1)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False,
                                             scale=1.0 / math.sqrt(head_dim))
        return merge_heads(attn, out[..., :head_dim])
