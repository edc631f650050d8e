"""The q / k / v projections and the output projection of a diffusers ``Attention``, split per head: the parts
corrlab's own multi-view self-attention processors (:mod:`corrlab.model.prope`, :mod:`corrlab.model.ray_bias`)
share around the kernel call they change."""
from __future__ import annotations

import torch

from ..errors import ShapeError

__all__ = ["require_self_attention", "project_heads", "merge_heads"]


def require_self_attention(processor: str, encoder_hidden_states, attention_mask) -> None:
    """Refuse cross-attention and masks, which ``processor`` (a class name, for the message) does not support."""
    if encoder_hidden_states is not None or attention_mask is not None:
        raise ShapeError(f"{processor}: self-attention only (no encoder_hidden_states / attention_mask)")


def project_heads(attn, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``hidden_states (B, S, C)`` -> ``q, k, v`` of ``attn`` (its ``to_q`` / ``to_k`` / ``to_v``), each
    ``(B, heads, S, d)``."""
    B = hidden_states.shape[0]
    heads = attn.heads

    def per_head(x: torch.Tensor) -> torch.Tensor:
        return x.view(B, -1, heads, x.shape[-1] // heads).transpose(1, 2)

    return per_head(attn.to_q(hidden_states)), per_head(attn.to_k(hidden_states)), per_head(attn.to_v(hidden_states))


def merge_heads(attn, out: torch.Tensor) -> torch.Tensor:
    """The kernel's ``(B, heads, S, d)`` output -> ``attn``'s output projection ``(B, S, C)``."""
    B, heads, _, d = out.shape
    return attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(B, -1, heads * d)))
