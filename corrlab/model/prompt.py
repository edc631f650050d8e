"""Prompt encoder of the embedded model: one learned vector per vocabulary word, mean-pooled.

The pooled embedding is linear in the word embeddings, so prompt embeddings interpolate linearly
(segment transport mixes conditions ``c = (1 - a) c_a + a c_b``). The empty prompt ``""`` and
classifier-free guidance's unconditional branch use a separate learned null embedding.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import CorrlabError, describe

__all__ = ["PromptEncoder", "tokenize"]


def tokenize(prompt: str, vocabulary: Sequence[str]) -> list[int]:
    """Word indices of ``prompt`` (lower-cased, split on whitespace) in ``vocabulary``.

    Raises :class:`CorrlabError` naming the unknown word and listing the vocabulary.
    """
    if not isinstance(prompt, str):
        raise CorrlabError(f"prompt: expected a string, got {describe(prompt)}")
    index = {w: i for i, w in enumerate(vocabulary)}
    ids = []
    for word in prompt.lower().split():
        if word not in index:
            raise CorrlabError(
                f"prompt: unknown word {word!r} in {prompt!r}; expected words from the vocabulary {list(vocabulary)}"
            )
        ids.append(index[word])
    return ids


class PromptEncoder(nn.Module):
    """Mean of learned word embeddings; ``""`` maps to the learned null embedding.

    ``forward(prompts: list[str]) -> (B, D)``.
    """

    def __init__(self, vocabulary: Sequence[str], dim: int):
        super().__init__()
        self.vocabulary = list(vocabulary)
        self.word_embeddings = nn.Embedding(len(self.vocabulary), dim)
        self.null_embedding = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.word_embeddings.weight, std=1.0)
        nn.init.normal_(self.null_embedding, std=1.0)

    def word_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        return [tokenize(p, self.vocabulary) for p in prompts]

    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        """``B`` prompts -> ``(B, D)`` pooled embeddings."""
        rows = []
        for ids in self.word_ids(prompts):
            if ids:
                idx = torch.tensor(ids, dtype=torch.long, device=self.null_embedding.device)
                rows.append(self.word_embeddings(idx).mean(dim=0))
            else:
                rows.append(self.null_embedding)
        return torch.stack(rows)

    def null(self, batch: int) -> torch.Tensor:
        """``(B, D)`` copies of the null (unconditional) embedding."""
        return self.null_embedding[None].expand(batch, -1)
