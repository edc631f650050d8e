"""Velocity functions for :func:`~corrlab.interventions.transport.segment_transport`.

A velocity function is ``velocity_fn(x (K, *S), t: float, cond (K, *C)) -> v (K, *S)`` in corrlab's
rectified-flow convention (``x_t = (1 - t) x_0 + t eps``, ``v = eps - x_0``, ``t = 1`` noise). Each
adapter turns one model into such a function with a condition that can be interpolated linearly, and
makes exactly ONE batched model call per evaluation (two conditions for classifier-free guidance are
stacked in the same call).

* :func:`embedded_velocity_fn`: corrlab's :class:`~corrlab.model.CorrlabPipeline`; ``x`` is a multi-view
  set ``(K, V, 3, H, W)`` in the model's [-1, 1] scale (or ``(K, P, V, 3, H, W)`` for ``P`` pairs at once),
  ``cond`` the pooled prompt embeddings ``(K, D)`` (``(K, P, D)``); :mod:`corrlab.interventions.pair_generation`
  runs the whole pair generation with it.
* :class:`FluxVelocity`: a diffusers ``FluxTransformer2DModel`` over unpacked latents ``(K, C, H, W)``;
  ``cond = (prompt_embeds (K, L, D_joint), pooled_prompt_embeds (K, D_pooled))``. The transformer gets
  ``timestep = t`` (it multiplies by 1000, as the Flux pipeline's ``timestep / 1000`` undoes), packed 2x2
  latents, ``img_ids``/``txt_ids``, and the guidance embedding when the model has one.
* :class:`WanVelocity`: a diffusers ``WanTransformer3DModel`` over latents ``(K, C, F, H, W)``;
  ``cond = encoder_hidden_states (K, L, D_text)``; the transformer gets ``timestep = 1000 t``.
"""
from __future__ import annotations

import torch

from ..errors import CorrlabError, ShapeError, describe
from ..model.pipeline import check_guidance_scale

__all__ = [
    "embedded_velocity_fn",
    "pack_latents",
    "unpack_latents",
    "flux_latent_ids",
    "FluxVelocity",
    "WanVelocity",
]


# --------------------------------------------------------------------------- the embedded model
def embedded_velocity_fn(pipe, cameras, guidance_scale: float | None = None, size: int | None = None):
    """Velocity function of a :class:`~corrlab.model.CorrlabPipeline` for fixed cameras.

    Args:
        pipe: the pipeline (``pipe.velocity`` does classifier-free guidance in one batched call).
        cameras: ``V`` cameras shared by every point, or a list of ``P`` camera lists (one per pair, all of
            length ``V``) for pair-batched inputs.
        guidance_scale: CFG scale (default: the pipeline's ``DEFAULT_GUIDANCE``).
        size: image side (default: the model's ``sample_size``).

    Returns:
        ``fn(x (K, V, 3, H, W), t, cond (K, D)) -> v (K, V, 3, H, W)``; with per-pair cameras
        ``fn(x (K, P, V, 3, H, W), t, cond (K, P, D)) -> v (K, P, V, 3, H, W)``.
    """
    from ..geometry import Camera
    from ..model.pipeline import DEFAULT_GUIDANCE

    g = DEFAULT_GUIDANCE if guidance_scale is None else guidance_scale
    if not isinstance(cameras, (list, tuple)) or not cameras:
        raise CorrlabError(f"cameras: expected a list of Camera or a list of camera lists, got {describe(cameras)}")
    per_pair = not isinstance(cameras[0], Camera)
    groups = [list(c) for c in cameras] if per_pair else [list(cameras)]
    if len({len(c) for c in groups}) != 1:
        raise CorrlabError(f"cameras: expected the same number of views in every pair, got {[len(c) for c in groups]}")
    rays = torch.stack([pipe.ray_embeds(c, size) for c in groups])  # (P, V, 6, h, w)
    n_lead = 2 if per_pair else 1

    def velocity(x: torch.Tensor, t: float, cond: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 + n_lead:
            want = "(K, P, V, 3, H, W)" if per_pair else "(K, V, 3, H, W)"
            raise ShapeError(f"x: expected shape {want}, got {describe(x)}")
        lead = tuple(x.shape[:n_lead])
        if tuple(cond.shape[:n_lead]) != lead or cond.dim() != n_lead + 1:
            raise ShapeError(f"cond: expected shape {(*lead, 'D')}, got {describe(cond)}")
        if per_pair and lead[1] != rays.shape[0]:
            raise ShapeError(f"x: expected {rays.shape[0]} pairs (one per camera list), got {describe(x)}")
        B = x[..., 0, 0, 0, 0].numel()
        r = rays.expand(lead[0], *rays.shape) if per_pair else rays.expand(lead[0], *rays.shape[1:])
        v = pipe.velocity(
            x.reshape(B, *x.shape[n_lead:]).to(pipe.device), float(t), cond.reshape(B, -1).to(pipe.device),
            r.reshape(B, *rays.shape[1:]), g,
        )
        return v.reshape(x.shape).to(device=x.device, dtype=x.dtype)

    return velocity


# --------------------------------------------------------------------------- diffusers: Flux
def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """Flux's 2x2 packing: ``(B, C, H, W) -> (B, H/2 * W/2, 4 C)`` (channel-major within a patch)."""
    if latents.dim() != 4 or latents.shape[2] % 2 or latents.shape[3] % 2:
        raise ShapeError(f"latents: expected shape (B, C, H, W) with even H and W, got {describe(latents)}")
    B, C, H, W = latents.shape
    x = latents.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // 2) * (W // 2), C * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: ``(B, H/2 * W/2, 4 C) -> (B, C, H, W)``."""
    B, N, C4 = packed.shape
    if N != (height // 2) * (width // 2) or C4 % 4:
        raise ShapeError(f"packed: expected shape (B, {(height // 2) * (width // 2)}, 4 C), got {describe(packed)}")
    x = packed.reshape(B, height // 2, width // 2, C4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, C4 // 4, height, width)


def flux_latent_ids(height: int, width: int) -> torch.Tensor:
    """``(H/2 * W/2, 3)`` Flux image position ids ``(0, row, col)`` of the packed latents (row-major)."""
    rows, cols = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()


class FluxVelocity:
    """Velocity function of a diffusers ``FluxTransformer2DModel`` over unpacked latents.

    ``self(x (K, C, H, W), t, (prompt_embeds (K, L, D_joint), pooled (K, D_pooled))) -> v (K, C, H, W)``.

    Args:
        transformer: the Flux transformer (any dtype/device; inputs are cast to it, outputs back to ``x``'s).
        guidance: value of the distilled guidance embedding (Flux-dev: 3.5); required iff the model has
            ``guidance_embeds``.
        negative: optional ``(prompt_embeds (L, D_joint), pooled (D_pooled))`` for true CFG: the negative
            condition is fixed (not interpolated) and stacked into the same call as the K points.
        true_cfg_scale: ``v = v_neg + s (v_pos - v_neg)`` when ``negative`` is given and ``s != 1``.
    """

    def __init__(self, transformer, guidance: float | None = None, negative=None, true_cfg_scale: float = 1.0):
        self.transformer = transformer
        has_g = bool(getattr(transformer.config, "guidance_embeds", False))
        if has_g and guidance is None:
            raise CorrlabError("guidance: expected a guidance value for a guidance-distilled Flux model, got None")
        if not has_g and guidance is not None:
            raise CorrlabError(f"guidance: this Flux model has no guidance embedding; expected None, got {guidance!r}")
        if negative is not None and not (isinstance(negative, (tuple, list)) and len(negative) == 2):
            raise CorrlabError(f"negative: expected (prompt_embeds (L, D), pooled (D_pooled,)), got {describe(negative)}")
        self.guidance = guidance
        self.negative = tuple(negative) if negative is not None else None
        self.true_cfg_scale = float(true_cfg_scale)

    def __call__(self, x: torch.Tensor, t: float, cond) -> torch.Tensor:
        if x.dim() != 4:
            raise ShapeError(f"x: expected latents of shape (K, C, H, W), got {describe(x)}")
        if not (isinstance(cond, (tuple, list)) and len(cond) == 2):
            raise CorrlabError(f"cond: expected (prompt_embeds (K, L, D), pooled (K, D_pooled)), got {describe(cond)}")
        K, C, H, W = x.shape
        pe, pooled = cond
        if pe.dim() != 3 or pooled.dim() != 2 or pe.shape[0] != K or pooled.shape[0] != K:
            raise ShapeError(f"cond: expected ({K}, L, D) and ({K}, D_pooled), got {describe(pe)} and {describe(pooled)}")
        cfg = self.negative is not None and self.true_cfg_scale != 1.0
        if cfg:
            npe, npool = self.negative
            pe = torch.cat([pe, npe.to(pe).expand(K, *npe.shape)])
            pooled = torch.cat([pooled, npool.to(pooled).expand(K, *npool.shape)])
            x_in = torch.cat([x, x])
        else:
            x_in = x
        tr = self.transformer
        dt, dev = tr.dtype, tr.device
        B = x_in.shape[0]
        kwargs = {}
        if self.guidance is not None:
            kwargs["guidance"] = torch.full((B,), float(self.guidance), dtype=torch.float32, device=dev)
        out = tr(
            hidden_states=pack_latents(x_in).to(dev, dt),
            encoder_hidden_states=pe.to(dev, dt),
            pooled_projections=pooled.to(dev, dt),
            timestep=torch.full((B,), float(t), dtype=dt, device=dev),
            img_ids=flux_latent_ids(H, W).to(dev, dt),
            txt_ids=torch.zeros(pe.shape[1], 3, dtype=dt, device=dev),
            return_dict=False,
            **kwargs,
        )[0]
        v = unpack_latents(out, H, W).to(device=x.device, dtype=x.dtype)
        if cfg:
            v_pos, v_neg = v.chunk(2)
            v = v_neg + self.true_cfg_scale * (v_pos - v_neg)
        return v


# --------------------------------------------------------------------------- diffusers: Wan
class WanVelocity:
    """Velocity function of a diffusers ``WanTransformer3DModel`` over latents ``(K, C, F, H, W)``.

    ``self(x (K, C, F, H, W), t, encoder_hidden_states (K, L, D_text)) -> v (K, C, F, H, W)``; the
    transformer gets ``timestep = 1000 t`` (the Wan pipeline passes the scheduler's timesteps, sigma * 1000).

    Args:
        transformer: the Wan transformer.
        negative: optional ``(L, D_text)`` negative prompt embeddings (fixed, not interpolated) for CFG.
        guidance_scale: ``v = v_neg + g (v_pos - v_neg)`` when ``negative`` is given and ``g != 1``; both
            halves run in the same call.
    """

    def __init__(self, transformer, negative: torch.Tensor | None = None, guidance_scale: float = 1.0):
        if negative is not None and (not isinstance(negative, torch.Tensor) or negative.dim() != 2):
            raise ShapeError(f"negative: expected negative prompt embeddings of shape (L, D_text), got {describe(negative)}")
        check_guidance_scale(guidance_scale)
        self.transformer = transformer
        self.negative = negative
        self.guidance_scale = float(guidance_scale)

    def __call__(self, x: torch.Tensor, t: float, cond: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ShapeError(f"x: expected latents of shape (K, C, F, H, W), got {describe(x)}")
        K = x.shape[0]
        if not isinstance(cond, torch.Tensor) or cond.dim() != 3 or cond.shape[0] != K:
            raise ShapeError(f"cond: expected encoder_hidden_states of shape ({K}, L, D_text), got {describe(cond)}")
        cfg = self.negative is not None and self.guidance_scale != 1.0
        if cfg:
            neg = self.negative.to(cond)
            if neg.shape[-1] != cond.shape[-1]:
                raise ShapeError(f"negative: expected last dimension {cond.shape[-1]}, got {describe(self.negative)}")
            if neg.shape[0] != cond.shape[1]:  # pad/crop to the positive length so both halves stack
                raise ShapeError(f"negative: expected {cond.shape[1]} tokens (the length of cond), got {describe(self.negative)}")
            cond = torch.cat([cond, neg.expand(K, *neg.shape)])
            x_in = torch.cat([x, x])
        else:
            x_in = x
        tr = self.transformer
        dt, dev = tr.dtype, tr.device
        B = x_in.shape[0]
        out = tr(
            hidden_states=x_in.to(dev, dt),
            timestep=torch.full((B,), 1000.0 * float(t), dtype=torch.float32, device=dev),
            encoder_hidden_states=cond.to(dev, dt),
            return_dict=False,
        )[0]
        v = out.to(device=x.device, dtype=x.dtype)
        if cfg:
            v_pos, v_neg = v.chunk(2)
            v = v_neg + self.guidance_scale * (v_pos - v_neg)
        return v
