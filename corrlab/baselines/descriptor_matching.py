"""Mutual nearest-neighbour matching of L2-normalised descriptors."""
from __future__ import annotations

import torch

from corrlab.errors import ShapeError, check_shape

__all__ = ["mutual_nearest_neighbours"]


def mutual_nearest_neighbours(desc0: torch.Tensor, desc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs ``(i, j)`` where ``j`` is the most similar descriptor to ``i`` and ``i`` the most similar to ``j``.

    Args:
        desc0: ``(N, D)`` descriptors of image 0 (L2-normalised, so the dot product is the cosine similarity).
        desc1: ``(M, D)`` descriptors of image 1.

    Returns:
        ``idx0 (K,)`` and ``idx1 (K,)`` long indices, sorted by ``idx0``, and their similarity ``(K,)``.
        Swapping the inputs swaps ``idx0`` and ``idx1`` (the relation is symmetric).
    """
    check_shape("desc0", desc0, (None, None), "(N, D)")
    check_shape("desc1", desc1, (None, desc0.shape[1]), f"(M, D) with D = {desc0.shape[1]} as in desc0")
    if desc0.shape[0] == 0 or desc1.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty.clone(), torch.zeros(0, dtype=desc0.dtype)
    if not desc0.is_floating_point():
        raise ShapeError(f"desc0: expected a floating tensor, got dtype {desc0.dtype}")
    similarity = desc0 @ desc1.T
    nn01 = similarity.argmax(dim=1)
    nn10 = similarity.argmax(dim=0)
    idx0 = torch.nonzero(nn10[nn01] == torch.arange(desc0.shape[0]), as_tuple=True)[0]
    idx1 = nn01[idx0]
    return idx0, idx1, similarity[idx0, idx1]
