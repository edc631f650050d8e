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
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import ShapeError, describe
from .attention_heads import merge_heads, project_heads, require_self_attention

__all__ = ["unit_rays", "reciprocal_product", "EpipolarBiasAttnProcessor"]



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


class EpipolarBiasAttnProcessor:
    """Self-attention with the Plücker epipolar bias; called as ``attn(x, rays=(B, S, 6), strength=(heads,))``,
``strength`` the per-head ``lambda_h``."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 temb=None, rays: torch.Tensor | None = None, strength: torch.Tensor | None = None) -> torch.Tensor:
        require_self_attention("EpipolarBiasAttnProcessor", encoder_hidden_states, attention_mask)
        B, S, _ = hidden_states.shape
        heads = attn.heads
        if rays is None or tuple(rays.shape) != (B, S, 6):
            raise ShapeError(f"rays: expected ({B}, {S}, 6) unit Plücker rays of the tokens, got {describe(rays)}")
        if strength is None or tuple(strength.shape) != (heads,):
            raise ShapeError(f"strength: expected ({heads},) per-head strengths, got {describe(strength)}")
        query, key, value = project_heads(attn, hidden_states)
        head_dim = query.shape[-1]
        r = rays.to(query.dtype)
        swapped = torch.cat([r[..., 3:], r[..., :3]], dim=-1)
        lam = strength.to(query.dtype)[None, :, None, None]
        extra = _ROWS.numel()
        query = torch.cat([query, -lam * math.sqrt(head_dim) * _sym_outer(r, weighted=True)[:, None].expand(B, heads, S, extra)], dim=-1)
        key = torch.cat([key, _sym_outer(swapped)[:, None].expand(B, heads, S, extra)], dim=-1)
        value = torch.cat([value, value.new_zeros(B, heads, S, extra)], dim=-1)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False,
                                             scale=1.0 / math.sqrt(head_dim))
        return merge_heads(attn, out[..., :head_dim])
