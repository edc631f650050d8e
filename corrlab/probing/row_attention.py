"""Row-wise multi-view self-attention (MV-Adapter's design), as a diffusers attention processor.

MV-Adapter (Huang et al. 2024) makes an SDXL UNet multi-view by adding, beside each self-attention, a
multi-view attention that is *row-wise*: for orthographic views at elevation 0 the epipolar lines are
image rows, so a query of view i's row y attends only to row y of all V views. One kernel call covers
every (set, view, row):

    q   (B*V*h, heads, w, d)          view i's row y          (query length w)
    k,v (B*V*h, heads, V*w, d)        row y of views 0..V-1   (key length V*w)

:class:`RowWiseMultiViewAttnProcessor` is that attention written from the paper's description (no
third-party code), as a drop-in ``attn1`` processor of a ``UNet2DConditionModel`` whose views are
consecutive batch entries (``(B*V, h*w, C)`` hidden states). It calls ``F.scaled_dot_product_attention``
with the shapes above, so corrlab's taps see an MV-Adapter-style kernel call: they recognise it by its
shapes (key length = V x query length) and give probes and CorrAdapter a ``row_wise``
:class:`~corrlab.probing.layouts.TokenLayout`.

Install on some layers only (MV-Adapter: the decoder) with :func:`row_wise_attention_processors`.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..errors import CorrlabError, ShapeError, ValueRangeError, describe
from .layouts import grid_from_token_count

__all__ = ["RowWiseMultiViewAttnProcessor", "row_wise_attention_processors"]


class RowWiseMultiViewAttnProcessor:
    """``attn1`` processor: each view's row y attends to row y of every view of its group of ``num_views``.

    Args:
        num_views: V, views per set (consecutive batch entries).
        latent_size: ``(H, W)`` of the UNet's input latents, to know each level's token grid; None = square
            grids (``h = w = sqrt(tokens)``).

    Not an ``nn.Module``: nothing lands in ``state_dict``. Same projections, scale and output path as
    diffusers' ``AttnProcessor2_0``; only the kernel's token grouping differs.
    """

    def __init__(self, num_views: int, latent_size: tuple[int, int] | None = None):
        if isinstance(num_views, bool) or not isinstance(num_views, int) or num_views < 1:
            raise ValueRangeError(f"num_views: expected a positive int, got {num_views!r}")
        self.num_views = num_views
        self.latent_size = None if latent_size is None else (int(latent_size[0]), int(latent_size[1]))

    def grid(self, tokens: int) -> tuple[int, int]:
        """The ``(h, w)`` token grid of a layer holding ``tokens`` tokens per view."""
        if self.latent_size is not None:
            return grid_from_token_count(tokens, self.latent_size)
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ShapeError(
                f"hidden_states: expected a square token grid (or pass latent_size), got {tokens} tokens per view"
            )
        return side, side

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise CorrlabError(
                f"encoder_hidden_states, attention_mask: RowWiseMultiViewAttnProcessor is for unmasked self-attention "
                f"(attn1), got {describe(encoder_hidden_states)}, {describe(attention_mask)}"
            )
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        if hidden_states.ndim != 3:
            raise ShapeError(f"hidden_states: expected (B*V, h*w, C), got {describe(hidden_states)}")
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        BV, S, _ = hidden_states.shape
        V = self.num_views
        if BV % V:
            raise ShapeError(f"hidden_states: expected a batch of B*{V} views, got {describe(hidden_states)}")
        B = BV // V
        h, w = self.grid(S)
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        heads = attn.heads
        d = key.shape[-1] // heads

        def per_head(x: torch.Tensor) -> torch.Tensor:  # (B*V, h*w, heads*d) -> (B*V, heads, h*w, d)
            return x.view(BV, S, heads, d).transpose(1, 2)

        query, key, value = per_head(query), per_head(key), per_head(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        def query_rows(x: torch.Tensor) -> torch.Tensor:  # -> (B*V*h, heads, w, d): entry (b, i, y)
            return x.view(B, V, heads, h, w, d).permute(0, 1, 3, 2, 4, 5).reshape(B * V * h, heads, w, d)

        def key_rows(x: torch.Tensor) -> torch.Tensor:  # -> (B*V*h, heads, V*w, d): row y of all views
            rows = x.view(B, V, heads, h, w, d).permute(0, 3, 2, 1, 4, 5).reshape(B, 1, h, heads, V * w, d)
            return rows.expand(B, V, h, heads, V * w, d).reshape(B * V * h, heads, V * w, d)

        out = F.scaled_dot_product_attention(query_rows(query), key_rows(key), key_rows(value))
        out = out.view(B, V, h, heads, w, d).permute(0, 1, 2, 4, 3, 5).reshape(BV, S, heads * d).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def row_wise_attention_processors(
    unet: Any, num_views: int, blocks: Sequence[str] = ("up_blocks",), latent_size: tuple[int, int] | None = None
) -> dict[str, Any]:
    """A processor dict for ``unet.set_attn_processor``: ``attn1`` layers under ``blocks`` (name prefixes,
    default the decoder ``up_blocks`` as in MV-Adapter) get one shared :class:`RowWiseMultiViewAttnProcessor`,
    every other layer keeps its processor."""
    from diffusers import UNet2DConditionModel

    if not isinstance(unet, UNet2DConditionModel):
        raise CorrlabError(f"unet: expected a UNet2DConditionModel, got {type(unet).__name__}")
    processor = RowWiseMultiViewAttnProcessor(num_views, latent_size)
    chosen = {
        name + ".processor"
        for name, m in unet.named_modules()
        if name.endswith(".attn1") and not m.is_cross_attention and any(name.startswith(b) for b in blocks)
    }
    if not chosen:
        raise CorrlabError(f"blocks: expected prefixes of self-attention layers of the UNet, got {list(blocks)}")
    return {key: (processor if key in chosen else p) for key, p in unet.attn_processors.items()}
