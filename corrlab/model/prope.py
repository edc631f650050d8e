"""Relative projective camera encoding inside attention (PRoPE, the GTA family) for :class:`MultiViewUNet`.

Every view ``i`` has a 4x4 projective matrix ``D_i = [[A_i, -A_i o_i], [0, 0, 0, 1]]`` taking homogeneous
world points to homogeneous normalised image points, ``A_i = N K_i R_i`` (``N`` maps the pixel centres to
``[-1, 1]``) and ``o_i`` the camera centre in scene units. Attention then sees only the *relative* cameras:
the first ``4 * blocks`` channels of every head are transformed in groups of 4,

    q_i' = D_i^T q_i,   k_j' = D_j^{-1} k_j,   v_j' = D_j^{-1} v_j,   out_i = D_i out_i',

so that ``q_i' . k_j' = q_i^T (D_i D_j^{-1}) k_j`` depends on the two cameras only through
``D_i D_j^{-1}`` (invariant to any change of world frame), and the value aggregated from view ``j`` is
carried into view ``i``'s frame. The other channels of each head are left alone: position inside a view
still reaches them through the PETR ray embedding of :class:`~corrlab.model.unet.MultiViewAttentionBlock`.

The model receives only per-pixel Plücker rays, so :func:`projective_matrices_from_rays` recovers ``D_i``
from the ray map exactly (a least-squares camera centre from the moments, a DLT for ``A_i`` from the
directions): no new input, and a ray map from any corrlab camera gives the same matrices as the camera.

:class:`PRoPEAttnProcessor` computes the transformed q / k / v and calls
``F.scaled_dot_product_attention`` on them, so corrlab's probes (which intercept that kernel) read the
attention the model really computes. The hook points ``hook_q`` / ``hook_k`` (outputs of ``to_q`` / ``to_k``)
see the untransformed projections.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ShapeError, describe
from .attention_heads import merge_heads, project_heads, require_self_attention
from .rays import token_centres

__all__ = ["camera_centres_from_rays", "projective_matrices_from_rays", "apply_projective", "PRoPEAttnProcessor"]


def normalisation_matrix(height: int, width: int, dtype=torch.float64) -> torch.Tensor:
    """``(3, 3)`` matrix ``N`` taking homogeneous pixels to the normalised coordinates of
    :func:`projective_matrices_from_rays`: pixel centres span ``[-1, 1]`` (``x_n = (2x + 1) / W - 1``, centre of
    the top-left pixel at ``(0, 0)``)."""
    return torch.tensor(
        [[2.0 / width, 0.0, 1.0 / width - 1.0], [0.0, 2.0 / height, 1.0 / height - 1.0], [0.0, 0.0, 1.0]], dtype=dtype
    )


@torch.no_grad()
def camera_centres_from_rays(rays: torch.Tensor) -> torch.Tensor:
    """Each view's camera centre from its per-pixel Plücker ray map: ``(N, 6, H, W)`` -> ``(N, 3)`` float64.

    Least squares over the pixels of ``m = o x d = -[d]x o`` (``d`` need not be unit length); exact for a pinhole
    camera. Rays that are all parallel (an orthographic camera) have no centre: the solve raises.
    """
    if rays.ndim != 4 or rays.shape[1] != 6:
        raise ShapeError(f"rays: expected (N, 6, H, W) Plücker ray maps, got {describe(rays)}")
    n = rays.shape[0]
    r = rays.detach().to(torch.float64).reshape(n, 6, -1).transpose(1, 2)  # (N, P, 6)
    d, m = r[..., :3], r[..., 3:]
    zero = torch.zeros_like(d[..., 0])
    dx = torch.stack(
        [
            torch.stack([zero, -d[..., 2], d[..., 1]], -1),
            torch.stack([d[..., 2], zero, -d[..., 0]], -1),
            torch.stack([-d[..., 1], d[..., 0], zero], -1),
        ],
        dim=-2,
    )  # (N, P, 3, 3) = [d]x
    lhs = torch.einsum("npji,npjk->nik", dx, dx)
    rhs = -torch.einsum("npji,npj->ni", dx, m)
    return torch.linalg.solve(lhs, rhs)


@torch.no_grad()
def projective_matrices_from_rays(rays: torch.Tensor) -> torch.Tensor:
    """Each view's projective matrix ``D`` from its per-pixel Plücker ray map.

    Args:
        rays: ``(N, 6, H, W)`` rays ``(d, m)`` through every pixel centre (``m = o x d``, in any length
            unit; ``d`` need not be unit length).

    Returns:
        ``(N, 4, 4)`` float64 ``D = [[A, -A o], [0, 0, 0, 1]]`` with ``A d ~ (x_n, y_n, 1)`` for every pixel,
        scaled so that ``A``'s last row has unit norm and positive depth (``A = N K R`` for a pinhole camera
        ``K [R | t]``; ``-A o = N K t``).
    """
    if rays.ndim != 4 or rays.shape[1] != 6:
        raise ShapeError(f"rays: expected (N, 6, H, W) Plücker ray maps, got {describe(rays)}")
    n, _, height, width = rays.shape
    d = rays.detach().to(torch.float64).reshape(n, 6, -1).transpose(1, 2)[..., :3]  # (N, P, 3)
    o = camera_centres_from_rays(rays)  # (N, 3)
    # A: u x (A d) = 0 for the normalised pixel u = (x, y, 1) -> smallest eigenvector of M^T M
    pix = token_centres(height, width, 1).to(rays.device)  # (P, 2) pixel centres, row-major
    u = torch.cat([pix, torch.ones_like(pix[:, :1])], dim=1) @ normalisation_matrix(height, width).to(rays.device).T
    x, y = u[:, 0][None, :, None], u[:, 1][None, :, None]
    z = torch.zeros_like(d)
    row1 = torch.cat([z, -d, y * d], dim=-1)  # y (a3.d) - (a2.d) = 0
    row2 = torch.cat([d, z, -x * d], dim=-1)  # (a1.d) - x (a3.d) = 0
    M = torch.cat([row1, row2], dim=1)  # (N, 2P, 9)
    _, vecs = torch.linalg.eigh(M.transpose(1, 2) @ M)
    A = vecs[..., 0].reshape(n, 3, 3)
    A = A / A[:, 2].norm(dim=-1)[:, None, None]
    depth = torch.einsum("nj,npj->np", A[:, 2], d).mean(dim=1)
    A = A * torch.sign(depth)[:, None, None]
    D = torch.zeros(n, 4, 4, dtype=torch.float64, device=rays.device)
    D[:, :3, :3] = A
    D[:, :3, 3] = -torch.einsum("nij,nj->ni", A, o)
    D[:, 3, 3] = 1.0
    return D


def apply_projective(x: torch.Tensor, mats: torch.Tensor, views: int, blocks: int) -> torch.Tensor:
    """Multiply the first ``4 * blocks`` channels of every head, in groups of 4, by each token's view matrix.

    Args:
        x: ``(B, heads, V*T, d)`` per-head queries / keys / values / outputs, tokens view-major.
        mats: ``(B, V, 4, 4)``: token of view ``v`` gets ``y = mats[b, v] @ x_group``.
        views: ``V``.
        blocks: number of 4-channel groups transformed (``4 * blocks <= d``).

    Returns:
        Same shape and dtype as ``x``.
    """
    B, H, S, d = x.shape
    c = 4 * blocks
    head, tail = x[..., :c], x[..., c:]
    g = head.reshape(B, H, views, S // views, blocks, 4)
    g = torch.einsum("bvij,bhvtkj->bhvtki", mats.to(x.dtype), g)
    return torch.cat([g.reshape(B, H, S, c), tail], dim=-1)


class PRoPEAttnProcessor:
    """``AttnProcessor2_0`` for joint multi-view self-attention with the relative projective encoding.

    Called as ``attn(hidden_states, cameras=D, views=V)`` with ``D (B, V, 4, 4)`` from
    :func:`projective_matrices_from_rays`; ``blocks`` 4-channel groups of every head are transformed.
    """

    def __init__(self, blocks: int):
        self.blocks = int(blocks)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 temb=None, cameras: torch.Tensor | None = None, views: int | None = None) -> torch.Tensor:
        require_self_attention("PRoPEAttnProcessor", encoder_hidden_states, attention_mask)
        if cameras is None or views is None:
            raise ShapeError("cameras: PRoPEAttnProcessor needs cameras=(B, V, 4, 4) and views=V, got None")
        B, S, _ = hidden_states.shape
        if cameras.shape != (B, views, 4, 4) or S % views:
            raise ShapeError(
                f"cameras: expected ({B}, {views}, 4, 4) for {S} tokens in {views} views, got {describe(cameras)}"
            )
        query, key, value = project_heads(attn, hidden_states)
        inv = torch.linalg.inv(cameras)
        query = apply_projective(query, cameras.transpose(-1, -2), views, self.blocks)
        key = apply_projective(key, inv, views, self.blocks)
        value = apply_projective(value, inv, views, self.blocks)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        return merge_heads(attn, apply_projective(out, cameras, views, self.blocks))
