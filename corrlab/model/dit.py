"""``MultiViewDiT``: a small pixel-space multi-view rectified-flow transformer (diffusers model).

Every block runs self-attention jointly over the tokens of all views (``blocks.{i}.attn``, a diffusers
:class:`~diffusers.models.attention_processor.Attention` with processor ``AttnProcessor2_0``), sequence
``(B, V*h*w, C)`` ordered view-major then row-major. Blocks are conditioned by adaLN-zero on the timestep
plus the pooled prompt embedding. Position reaches a token only through its own camera ray: a Fourier
MLP of the token's Plücker coordinates is added to its patch embedding; there is no 2D position
embedding shared across views, and the model accepts any number of views ``V``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..errors import ShapeError, check_shape, describe
from .prompt import PromptEncoder

__all__ = ["MultiViewDiT", "scene_vocabulary"]

def scene_vocabulary() -> list[str]:
    """The renderer's prompt words: colours, then patterns, then shapes."""
    from ..scenes import VOCABULARY

    return [w for key in ("colour", "pattern", "shape") for w in VOCABULARY[key]]


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal features of ``t`` (B,) in [0, 1] (scaled by 1000) -> ``(B, dim)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def timestep_vector(timestep: torch.Tensor | float, batch: int, device) -> torch.Tensor:
    """A float or ``(B,)`` timestep in [0, 1] -> ``(B,)`` float32 on ``device``; anything else raises ShapeError."""
    t = torch.as_tensor(timestep, dtype=torch.float32, device=device)
    if t.ndim == 0:
        t = t.expand(batch)
    check_shape("timestep", t, (batch,))
    return t


def ray_fourier_features(rays: torch.Tensor, num_freqs: int) -> torch.Tensor:
    """``(..., 6)`` Plücker vectors -> ``(..., 6 + 12 * num_freqs)`` raw + sin/cos at ``pi * 2^k``."""
    freqs = math.pi * (2.0 ** torch.arange(num_freqs, dtype=rays.dtype, device=rays.device))
    args = rays[..., None] * freqs  # (..., 6, F)
    return torch.cat([rays, torch.sin(args).flatten(-2), torch.cos(args).flatten(-2)], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x (B, N, C)`` times ``1 + scale (B, C)`` plus ``shift (B, C)``."""
    return x * (1 + scale[:, None]) + shift[:, None]


class MultiViewBlock(nn.Module):
    """Pre-norm transformer block: joint multi-view self-attention + MLP, adaLN-zero modulated."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(
            query_dim=dim, heads=num_heads, dim_head=dim // num_heads, bias=True, out_bias=True,
            processor=AttnProcessor2_0(),
        )
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``x (B, N, C)``, ``cond (B, C)`` -> ``(B, N, C)``."""
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(cond).chunk(6, dim=1)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), sh1, sc1))
        x = x + g2[:, None] * self.mlp(modulate(self.norm2(x), sh2, sc2))
        return x


class MultiViewDiT(ModelMixin, ConfigMixin, AttentionMixin):
    """Multi-view pixel-space DiT predicting the rectified-flow velocity ``eps - x0``.

    ``forward(sample (B, V, 3, H, W) in [-1, 1] scale, timestep (B,) in [0, 1] (1 = noise),
    prompt_embeds (B, D), ray_embeds (B, V, 6, H/p, W/p)) -> velocity (B, V, 3, H, W)``.

    Config: ``sample_size`` (default image side), ``patch_size`` p, ``hidden_size`` C, ``num_layers``,
    ``num_heads``, ``mlp_ratio``, ``prompt_dim`` D, ``ray_freqs`` (Fourier frequencies of the ray MLP),
    ``scene_scale`` (world length normalising Plücker moments), ``vocabulary`` (prompt words),
    ``reference_conditioning`` (a learned flag for clean reference views, see ``given``).
    ``attn_processors`` / ``set_attn_processor`` come from diffusers' ``AttentionMixin``.
    """

    corrlab_embedded = True  # corrlab's own model: CFG batched [cond, uncond] (see probing.attention_cache)

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,
        patch_size: int = 4,
        in_channels: int = 3,
        hidden_size: int = 192,
        num_layers: int = 8,
        num_heads: int = 6,
        mlp_ratio: float = 3.0,
        prompt_dim: int = 64,
        ray_freqs: int = 6,
        scene_scale: float = 1.0,
        vocabulary: Sequence[str] | None = None,
        reference_conditioning: bool = False,
    ):
        super().__init__()
        if vocabulary is None:
            vocabulary = scene_vocabulary()
        self.register_to_config(vocabulary=list(vocabulary))
        self.prompt_encoder = PromptEncoder(list(vocabulary), prompt_dim)
        C, p = hidden_size, patch_size
        self.patch_embed = nn.Linear(in_channels * p * p, C)
        self.ray_embed = nn.Sequential(
            nn.Linear(6 + 12 * ray_freqs, C), nn.SiLU(), nn.Linear(C, C)
        )
        self.time_embed = nn.Sequential(nn.Linear(C, C), nn.SiLU(), nn.Linear(C, C))
        self.prompt_proj = nn.Sequential(nn.Linear(prompt_dim, C), nn.SiLU(), nn.Linear(C, C))
        self.blocks = nn.ModuleList([MultiViewBlock(C, num_heads, mlp_ratio) for _ in range(num_layers)])
        self.norm_out = nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))
        self.proj_out = nn.Linear(C, in_channels * p * p)
        for m in (self.ada_out[1], self.proj_out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        # learned "given" flag of reference views (clean input), added to every token of the view
        self.given_embed = nn.Parameter(torch.zeros(2, C)) if reference_conditioning else None

    # ---------------------------------------------------------------- helpers
    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """``B`` prompts -> ``(B, D)`` (mean of word embeddings; linear in them)."""
        return self.prompt_encoder(prompts)

    def null_prompt_embeds(self, batch: int) -> torch.Tensor:
        """``(B, D)`` unconditional embeddings for classifier-free guidance."""
        return self.prompt_encoder.null(batch)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, V, c, H, W)`` -> ``(B, V*h*w, c*p*p)`` tokens, view-major then row-major."""
        B, V, c, H, W = x.shape
        p = self.config.patch_size
        x = x.reshape(B, V, c, H // p, p, W // p, p).permute(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(B, V * (H // p) * (W // p), c * p * p)

    def unpatchify(self, tokens: torch.Tensor, V: int, H: int, W: int) -> torch.Tensor:
        """``(B, V*h*w, c*p*p)`` -> ``(B, V, c, H, W)``."""
        B = tokens.shape[0]
        p = self.config.patch_size
        c = self.config.in_channels
        x = tokens.reshape(B, V, H // p, W // p, c, p, p).permute(0, 1, 4, 2, 5, 3, 6)
        return x.reshape(B, V, c, H, W)

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        prompt_embeds: torch.Tensor,
        ray_embeds: torch.Tensor,
        given: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity ``(B, V, 3, H, W)``; see the class docstring for the arguments.

        ``given (B, V)`` bool marks clean reference views (only with ``reference_conditioning=True``).
        """
        p = self.config.patch_size
        if sample.ndim != 5 or sample.shape[2] != self.config.in_channels:
            raise ShapeError(f"sample: expected shape (B, V, {self.config.in_channels}, H, W), got {describe(sample)}")
        B, V, _, H, W = sample.shape
        if H % p or W % p:
            raise ShapeError(f"sample: expected H and W divisible by patch size {p}, got {describe(sample)}")
        check_shape("ray_embeds", ray_embeds, (B, V, 6, H // p, W // p))
        check_shape("prompt_embeds", prompt_embeds, (B, self.config.prompt_dim))
        t = timestep_vector(timestep, B, sample.device)
        dtype = self.patch_embed.weight.dtype

        x = self.patch_embed(self.patchify(sample.to(dtype)))
        rays = ray_embeds.to(dtype).permute(0, 1, 3, 4, 2).reshape(B, V * (H // p) * (W // p), 6)
        x = x + self.ray_embed(ray_fourier_features(rays, self.config.ray_freqs))
        if given is not None:
            check_shape("given", given, (B, V))
            if self.given_embed is not None:
                n = (H // p) * (W // p)
                x = x + self.given_embed[given.long()].repeat_interleave(n, dim=1).to(dtype)
            elif bool(given.any()):
                raise ShapeError(
                    "given: this MultiViewDiT was built with reference_conditioning=False and takes no reference views"
                )
        cond = self.time_embed(timestep_features(t, self.config.hidden_size).to(dtype))
        cond = cond + self.prompt_proj(prompt_embeds.to(dtype))
        for block in self.blocks:
            x = block(x, cond)
        shift, scale = self.ada_out(cond).chunk(2, dim=1)
        x = self.proj_out(modulate(self.norm_out(x), shift, scale))
        return self.unpatchify(x, V, H, W).to(sample.dtype)
