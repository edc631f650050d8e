"""Native correspondences from one attention layer's own queries and keys (methods.md section 1).

For a source image i and a target image j of one multi-image attention layer, the similarity of
source token p and target token l is the layer's own scaled dot product

    S[p, l] = scale * q_i[p] . k_j[l]                      (per head; scale is usually 1/sqrt(d))

and the match of p is ``argmax_l`` of a score built from S (paper Eq. 8-9). Every choice the two
public releases make differently is a parameter:

* ``similarity``: ``"softmax"`` (default, paper Eq. 8): ``P = softmax_l(S)``, over the target image's
  keys only. ``"dual_softmax"`` (SyncDreamer release): ``P = softmax_l(S) * softmax_p(S)``, whose
  column normaliser runs over all source tokens.
* ``heads``: ``"per_head"`` (default; both releases): one match per head. ``"mean"``: one match from the
  head-averaged similarity ``mean_h S_h`` (logits averaged, then the same scores as above).
* ``confidence``: ``"global"`` (default; MVAdapter release): the confidence is ``max_l P[p, l]``.
  ``"window"`` (SyncDreamer release): a softmax over the raw similarities S of the ``(2r+1)^2`` target
  tokens around the argmax (tokens outside the image are masked out); the confidence is the probability
  of the window centre.
* ``threshold`` (default 0.05, the paper's value): a match is kept when ``confidence >= threshold``
  (SyncDreamer release), or ``confidence > threshold`` with ``strict=True`` (MVAdapter release).
* ``mutual`` (default False; neither release applies it): additionally keep a match only if the
  target token's best source under the same score P (``argmax_p P[p, l]``) is p again.

Memory stays bounded: source tokens are processed in blocks of ``chunk_size``; the largest temporary
holds ``H' x T x chunk_size x max(Nt, (2r+1)^2)`` values (H' heads matched together, T target images
matched together, Nt target tokens, the window for ``confidence="window"``), never the full ``Ns x Nt``
map. The dual softmax's column normaliser and
the mutual check's column argmax are accumulated block by block.
"""
from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..errors import CorrlabError, ShapeError, ValueRangeError, check_choice, describe

__all__ = [
    "TokenMatches",
    "MatchingOptions",
    "DEFAULT_CHUNK_SIZE",
    "match_tokens",
    "match_views",
    "match_layout",
    "similarity_map",
    "window_offsets",
    "HistoryMax",
    "Workspace",
]

Similarity = Literal["softmax", "dual_softmax"]
HeadMode = Literal["per_head", "mean"]
ConfidenceMode = Literal["global", "window"]

#: Source tokens per block of the matcher (a memory bound, not a matching option: results do not depend on it).
DEFAULT_CHUNK_SIZE = 256


@dataclass(frozen=True)
class MatchingOptions:
    """How native correspondences are read from a layer's q and k: the one definition of the defaults.

    The defaults are the paper's: plain softmax over the target keys, one match per head, the global max
    probability as confidence, kept at ``>= 0.05``. Validated on construction (a :class:`CorrlabError`
    naming the field, the value received and what was expected); frozen, so one object can be shared
    by a probe, a CorrAdapter and a sweep. ``dataclasses.replace(options, threshold=0.2)`` derives another.

    Attributes:
        similarity: ``"softmax"`` or ``"dual_softmax"`` (see the module docstring).
        heads: ``"per_head"`` or ``"mean"``.
        confidence: ``"global"`` or ``"window"``.
        threshold: keep a match when ``confidence >= threshold`` (``>`` with ``strict``); in [0, 1].
        window_radius: ``r`` of the ``(2r+1)^2`` window of ``confidence="window"`` (CorrAdapter: also its
            aggregation window).
        mutual: also require the target token's best source to be this token.
        strict: keep only ``confidence > threshold`` (MVAdapter release) instead of ``>=``.
        history: None, or match with the element-wise max of q and k over the last ``history`` calls of
            each layer (:class:`HistoryMax`; SyncDreamer release: 11).
    """

    similarity: Similarity = "softmax"
    heads: HeadMode = "per_head"
    confidence: ConfidenceMode = "global"
    threshold: float = 0.05
    window_radius: int = 3
    mutual: bool = False
    strict: bool = False
    history: int | None = None

    def __post_init__(self) -> None:
        check_choice("similarity", self.similarity, ("softmax", "dual_softmax"))
        check_choice("heads", self.heads, ("per_head", "mean"))
        check_choice("confidence", self.confidence, ("global", "window"))
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= float(t) <= 1.0:
            raise ValueRangeError(f"threshold: expected a probability in [0, 1], got {t!r}")
        object.__setattr__(self, "threshold", float(t))
        r = self.window_radius
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueRangeError(f"window_radius: expected a non-negative int, got {r!r}")
        if not isinstance(self.mutual, bool):
            raise CorrlabError(f"mutual: expected a bool, got {self.mutual!r}")
        if not isinstance(self.strict, bool):
            raise CorrlabError(f"strict: expected a bool (keep confidence > threshold instead of >=), got {self.strict!r}")
        h = self.history
        if h is not None and (isinstance(h, bool) or not isinstance(h, int) or h < 1):
            raise ValueRangeError(f"history: expected None or a positive int (calls kept per layer), got {h!r}")

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        """The option names, in order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def build(cls, base: "MatchingOptions | None" = None, **options) -> "MatchingOptions":
        """``base`` (default: the defaults) with the keyword ``options`` replaced; unknown names raise.

        The one path from keyword arguments (``probe(pipe, threshold=0.2)``, a sweep spec's ``[probe]``
        table, CLI flags) to options.
        """
        if base is not None and not isinstance(base, cls):
            raise CorrlabError(f"matching: expected None or a MatchingOptions, got {describe(base)}")
        unknown = sorted(set(options) - set(cls.fields()))
        if unknown:
            raise CorrlabError(f"matching: unknown options {unknown}; expected some of {list(cls.fields())}")
        return dataclasses.replace(base, **options) if base is not None else cls(**options)

    def as_dict(self) -> dict:
        """The options as a plain dict (the form stored in records and sweep items)."""
        return dataclasses.asdict(self)

    def matcher_kwargs(self) -> dict:
        """Keyword arguments of :func:`match_views` / :func:`match_layout` (``history`` is applied by the caller)."""
        return {k: v for k, v in self.as_dict().items() if k != "history"}


@dataclass(frozen=True)
class TokenMatches:
    """One match per source token and head.

    Attributes:
        index: ``(H', Ns)`` long, the matched target token (row-major index into the target grid).
        confidence: ``(H', Ns)`` float32 in [0, 1] (see the module docstring for its definition).
        kept: ``(H', Ns)`` bool, ``confidence >= threshold`` (and the mutual check, if asked for).

    ``H'`` is the number of heads for ``heads="per_head"`` and 1 for ``heads="mean"``.
    """

    index: torch.Tensor
    confidence: torch.Tensor
    kept: torch.Tensor


def max_argmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max and first argmax over the last dim, ``(..., n) -> (...), (...)``; ties resolve to the first index.

    Equal to ``(x.amax(-1), x.argmax(-1))`` for input without NaN, in one pass: ``max_pool1d`` with indices
    over the whole row (torch's CPU ``argmax`` over a long last dim costs about twice as much).
    """
    if x.ndim == 0 or x.shape[-1] == 0 or not x.is_floating_point():
        return x.max(dim=-1)
    n = x.shape[-1]
    vals, idx = F.max_pool1d(x.reshape(1, -1, n), n, return_indices=True)
    return vals.view(x.shape[:-1]), idx.view(x.shape[:-1])


def window_offsets(grid: tuple[int, int], radius: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column offsets of a ``(2r+1)^2`` window, row-major; centre at index ``(2r+1)^2 // 2``.

    Returns two ``(K,)`` long tensors with ``K = (2r+1)^2``.
    """
    r = torch.arange(-radius, radius + 1, device=device)
    dr, dc = torch.meshgrid(r, r, indexing="ij")
    return dr.reshape(-1), dc.reshape(-1)


def _window_centre_probability(
    sim: torch.Tensor, index: torch.Tensor, grid: tuple[int, int], radius: int
) -> torch.Tensor:
    """Probability of the centre in a softmax over the similarities of the window around ``index``.

    Args:
        sim: ``(..., C, Nt)`` similarities of a block of source tokens.
        index: ``(..., C)`` long, the centre target token of each window.
    Returns:
        ``(..., C)`` float32.
    """
    h, w = grid
    dr, dc = window_offsets(grid, radius, device=sim.device)
    row, col = (index // w).unsqueeze(-1), (index % w).unsqueeze(-1)
    rr, cc = row + dr, col + dc  # (..., C, K)
    inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
    flat = (rr.clamp(0, h - 1) * w + cc.clamp(0, w - 1))
    win = sim.gather(-1, flat)
    win = win.masked_fill(~inside, float("-inf"))
    centre = sim.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    return torch.exp(centre - torch.logsumexp(win, dim=-1))


def _check_qk(q_src: torch.Tensor, k_tgt: torch.Tensor, grid_tgt, scale) -> tuple[int, int]:
    if not isinstance(q_src, torch.Tensor) or q_src.ndim != 3:
        raise ShapeError(f"q_src: expected a tensor of shape (heads, Ns, d), got {describe(q_src)}")
    if not isinstance(k_tgt, torch.Tensor) or k_tgt.ndim != 4:
        raise ShapeError(f"k_tgt: expected a tensor of shape (heads, T, Nt, d), got {describe(k_tgt)}")
    if k_tgt.shape[0] != q_src.shape[0] or k_tgt.shape[-1] != q_src.shape[-1]:
        raise ShapeError(
            f"k_tgt: expected heads {q_src.shape[0]} and head dim {q_src.shape[-1]} matching q_src, got {describe(k_tgt)}"
        )
    if not q_src.is_floating_point() or not k_tgt.is_floating_point():
        raise ShapeError(f"q_src, k_tgt: expected floating point tensors, got {q_src.dtype} and {k_tgt.dtype}")
    try:
        h, w = (int(grid_tgt[0]), int(grid_tgt[1]))
    except (TypeError, ValueError, IndexError):
        raise ShapeError(f"grid_tgt: expected a (rows, cols) pair, got {grid_tgt!r}") from None
    if h * w != k_tgt.shape[2] or h < 1 or w < 1:
        raise ShapeError(f"grid_tgt: expected rows * cols = Nt = {k_tgt.shape[2]}, got {grid_tgt!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (float(scale) > 0 and float(scale) < float("inf")):
        raise ValueRangeError(f"scale: expected a positive finite float, got {scale!r}")
    return h, w


def _similarity_operands(q_src: torch.Tensor, k_tgt: torch.Tensor, scale: float, heads: str,
                         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q (H', Ns, D), k (H', T, Nt, D))`` whose products ``q @ k^T`` are the similarities S.

    Per head: ``scale * q_h . k_h``; ``heads="mean"``: ``mean_h (scale q_h . k_h)``, one dot product over the
    concatenated heads with scale / H (``H' = 1``).
    """
    n_heads, n_src, dim = q_src.shape
    if heads == "mean":
        q = q_src.permute(1, 0, 2).reshape(1, n_src, n_heads * dim).to(dtype) * (scale / n_heads)
        k = k_tgt.permute(1, 2, 0, 3).reshape(1, k_tgt.shape[1], k_tgt.shape[2], n_heads * dim).to(dtype)
        return q, k
    return q_src.to(dtype) * scale, k_tgt.to(dtype)


@torch.no_grad()
def similarity_map(
    q_src: torch.Tensor,
    k_tgt: torch.Tensor,
    *,
    scale: float,
    similarity: Similarity = "softmax",
    heads: HeadMode = "per_head",
) -> torch.Tensor:
    """The matcher's score ``P`` of every (source, target) token pair, materialised (for displays).

    Args:
        q_src: ``(heads, Ns, d)``; k_tgt: ``(heads, T, Nt, d)``; scale, similarity, heads: as in
            :func:`match_views` (the dual softmax's column normaliser runs over the ``Ns`` given sources).

    Returns:
        ``(H', T, Ns, Nt)`` in the compute dtype (float32 for half inputs): ``softmax_l(S)`` or
        ``softmax_l(S) * softmax_p(S)``; its argmax over the last axis is :func:`match_views`' ``index``.
        Holds ``H' T Ns Nt`` values: :func:`match_views` never builds it.
    """
    check_choice("similarity", similarity, ("softmax", "dual_softmax"))
    check_choice("heads", heads, ("per_head", "mean"))
    _check_qk(q_src, k_tgt, (1, k_tgt.shape[2]) if isinstance(k_tgt, torch.Tensor) and k_tgt.ndim == 4 else (1, 1), scale)
    dtype = torch.float32 if q_src.dtype in (torch.float16, torch.bfloat16) else q_src.dtype
    q, k = _similarity_operands(q_src, k_tgt, float(scale), heads, dtype)
    sim = torch.matmul(q[:, None], k.transpose(-1, -2))  # (H', T, Ns, Nt)
    p = torch.softmax(sim, dim=-1)
    return p * torch.softmax(sim, dim=-2) if similarity == "dual_softmax" else p


class Workspace:
    """Reusable scratch buffers, one flat buffer per name, grown on demand (never shrunk)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        """A contiguous ``shape`` view of buffer ``name`` (contents undefined)."""
        n = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != torch.device(device):
            buf = torch.empty(n, dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf[:n].view(shape)

    def clear(self) -> None:
        self._buffers.clear()


@torch.no_grad()
def match_views(
    q_src: torch.Tensor,
    k_tgt: torch.Tensor,
    grid_tgt: tuple[int, int],
    *,
    scale: float,
    similarity: Similarity = MatchingOptions.similarity,
    heads: HeadMode = MatchingOptions.heads,
    confidence: ConfidenceMode = MatchingOptions.confidence,
    threshold: float = MatchingOptions.threshold,
    window_radius: int = MatchingOptions.window_radius,
    mutual: bool = MatchingOptions.mutual,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    strict: bool = MatchingOptions.strict,
    workspace: "Workspace | None" = None,
) -> TokenMatches:
    """Match one source image's tokens against several target images at once (same layer, same grid).

    Args:
        q_src: ``(heads, Ns, d)`` queries of the source image.
        k_tgt: ``(heads, T, Nt, d)`` keys of T target images, each on the grid ``grid_tgt``.
        grid_tgt: ``(h, w)`` target token grid, ``h * w = Nt``.
        scale: the layer's attention scale (usually ``1 / sqrt(d)``).
        similarity, heads, confidence, threshold, window_radius, mutual, strict: see :class:`MatchingOptions`
            (defaults there); chunk_size: source tokens per block (memory bound).
        workspace: scratch buffers to reuse across calls (a probe keeps one: allocating a fresh block
            buffer per call costs more than the arithmetic on the CPU); None = fresh ones.

    Returns:
        :class:`TokenMatches` with fields of shape ``(H', T, Ns)``.
    """
    opts = MatchingOptions(similarity, heads, confidence, threshold, window_radius, mutual, strict)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueRangeError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    h, w = _check_qk(q_src, k_tgt, grid_tgt, scale)
    n_src = q_src.shape[1]
    n_tgt_views, n_tgt = k_tgt.shape[1], k_tgt.shape[2]
    device = q_src.device
    dtype = torch.float32 if q_src.dtype in (torch.float16, torch.bfloat16) else q_src.dtype
    scale = float(scale)

    q, k = _similarity_operands(q_src, k_tgt, scale, heads, dtype)
    hp = q.shape[0]
    k_t = k.transpose(-1, -2)  # (H', T, D, Nt)
    ws = workspace if workspace is not None else Workspace()

    def block_shape(start: int, stop: int) -> tuple[int, int, int, int]:
        return (hp, n_tgt_views, stop - start, n_tgt)

    def similarities(start: int, stop: int) -> torch.Tensor:
        # (H', 1, C, D) @ (H', T, D, Nt) -> (H', T, C, Nt), into a reused buffer
        out = ws.get("sim", block_shape(start, stop), dtype, device)
        return torch.matmul(q[:, None, start:stop], k_t, out=out)

    blocks = [(s, min(s + chunk_size, n_src)) for s in range(0, n_src, chunk_size)]
    col_lse = None
    if similarity == "dual_softmax":
        # column normaliser over ALL source tokens, accumulated block by block
        col_lse = torch.full((hp, n_tgt_views, n_tgt), float("-inf"), dtype=dtype, device=device)
        for start, stop in blocks:
            sim = similarities(start, stop)
            col_max = sim.amax(dim=-2, keepdim=True)
            tmp = torch.sub(sim, col_max, out=ws.get("tmp", block_shape(start, stop), dtype, device)).exp_()
            col_lse = torch.logaddexp(col_lse, tmp.sum(dim=-2).log_() + col_max.squeeze(-2))

    index = torch.empty((hp, n_tgt_views, n_src), dtype=torch.long, device=device)
    conf = torch.empty((hp, n_tgt_views, n_src), dtype=dtype, device=device)  # float32 when returned
    if mutual:
        col_best = torch.full((hp, n_tgt_views, n_tgt), float("-inf"), dtype=dtype, device=device)
        col_arg = torch.zeros((hp, n_tgt_views, n_tgt), dtype=torch.long, device=device)
    for start, stop in blocks:
        shape = block_shape(start, stop)
        sim = similarities(start, stop)
        # softmax normaliser over the target keys, written out (amax, exp, sum) into a reused buffer
        row_max = sim.amax(dim=-1, keepdim=True)
        row_sum = torch.sub(sim, row_max, out=ws.get("tmp", shape, dtype, device)).exp_().sum(dim=-1, keepdim=True)
        row_lse = row_max + row_sum.log()
        # score: log P up to the per-row constant -row_lse (the same argmax over targets)
        if col_lse is None:
            score = sim
        else:
            score = torch.mul(sim, 2.0, out=ws.get("score", shape, dtype, device)).sub_(col_lse.unsqueeze(-2))
        arg = max_argmax(score)[1]  # = score.argmax(dim=-1), first index on ties, in fewer passes
        index[..., start:stop] = arg
        if confidence == "window":
            conf[..., start:stop] = _window_centre_probability(sim, arg, (h, w), window_radius)
        elif col_lse is None:
            conf[..., start:stop] = 1.0 / row_sum.squeeze(-1)  # exp(max - lse)
        else:
            conf[..., start:stop] = torch.exp(score.amax(dim=-1) - row_lse.squeeze(-1))
        if mutual:
            log_p = torch.sub(score, row_lse, out=ws.get("tmp", shape, dtype, device))
            blk_best, blk_arg = log_p.max(dim=-2)  # best source in this block for each target token
            better = blk_best > col_best  # strict: the earliest block wins ties, like a full argmax
            col_best = torch.where(better, blk_best, col_best)
            col_arg = torch.where(better, blk_arg + start, col_arg)
    # decided in the compute dtype (float64 inputs: against the float64 threshold), stored as float32
    threshold_t = torch.tensor(opts.threshold, dtype=dtype, device=device)
    kept = conf > threshold_t if strict else conf >= threshold_t
    if mutual:
        back = col_arg.gather(-1, index)
        kept &= back == torch.arange(n_src, device=device)
    return TokenMatches(index=index, confidence=conf.to(torch.float32), kept=kept)


@torch.no_grad()
def match_layout(
    q_src: torch.Tensor,
    k_tgt: torch.Tensor,
    grid: tuple[int, int],
    *,
    row_wise: bool = False,
    **options,
) -> TokenMatches:
    """:func:`match_views` on a layer's token layout: whole images, or row by row for ``row_wise`` layouts.

    For a row-wise multi-view layer (a query of image i's row y attends only to row y of each image:
    MV-Adapter) the candidate matches of a token are the ``w`` tokens of the same row of each target image:
    every row is matched on its own (grid ``(1, w)``: the softmax, the dual softmax's column normaliser,
    the window confidence and the mutual check all stay inside the row). The returned indices are row-major
    indices into the full ``(h, w)`` grid, so matches always lie on the source token's row.

    Args:
        q_src: ``(heads, h*w, d)``; k_tgt: ``(heads, T, h*w, d)``; grid: ``(h, w)``; options: those of
            :func:`match_views`.

    Returns:
        :class:`TokenMatches` with fields of shape ``(H', T, h*w)``.
    """
    if not row_wise:
        return match_views(q_src, k_tgt, grid, **options)
    _check_qk(q_src, k_tgt, grid, options.get("scale", 1.0))
    h, w = int(grid[0]), int(grid[1])
    H, N, d = q_src.shape
    T = k_tgt.shape[1]
    opts = dict(options)
    opts.pop("workspace", None)
    if opts.get("heads", "per_head") == "per_head":
        # rows are independent: fold them into the head dimension, one call for all rows
        q_rows = q_src.reshape(H, h, w, d).reshape(H * h, w, d)
        k_rows = k_tgt.reshape(H, T, h, w, d).transpose(1, 2).reshape(H * h, T, w, d)
        m = match_views(q_rows, k_rows, (1, w), **opts)  # (H*h, T, w)

        def unfold(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(H, h, T, w).transpose(1, 2).reshape(H, T, N)

        offset = (torch.arange(h, device=q_src.device) * w).repeat_interleave(w)
        return TokenMatches(unfold(m.index) + offset, unfold(m.confidence), unfold(m.kept))
    parts = [
        match_views(q_src[:, y * w:(y + 1) * w], k_tgt[:, :, y * w:(y + 1) * w], (1, w), **opts) for y in range(h)
    ]
    return TokenMatches(
        torch.cat([p.index + y * w for y, p in enumerate(parts)], dim=-1),
        torch.cat([p.confidence for p in parts], dim=-1),
        torch.cat([p.kept for p in parts], dim=-1),
    )


def match_tokens(q_src: torch.Tensor, k_tgt: torch.Tensor, grid_tgt: tuple[int, int], *, scale: float,
                 **options) -> TokenMatches:
    """Match every source token of one image to a token of one other image (:func:`match_views` with one target).

    Args:
        q_src: ``(heads, Ns, d)`` the layer's queries of the source image's tokens.
        k_tgt: ``(heads, Nt, d)`` the layer's keys of the target image's tokens.
        grid_tgt: ``(h, w)`` the target token grid, ``h * w = Nt`` (row-major).
        scale: the layer's attention scale (``1 / sqrt(d)`` unless the layer says otherwise).
        **options: keyword options of :func:`match_views`: the :class:`MatchingOptions` fields but ``history``
            (defaults there) and ``chunk_size`` (source tokens per block; at most ``H' x chunk_size x Nt``
            similarities exist at once).

    Returns:
        :class:`TokenMatches` with ``index``, ``confidence``, ``kept`` of shape ``(H', Ns)``.
    """
    if not isinstance(k_tgt, torch.Tensor) or k_tgt.ndim != 3:
        raise ShapeError(f"k_tgt: expected a tensor of shape (heads, Nt, d), got {describe(k_tgt)}")
    allowed = set(MatchingOptions.fields()) - {"history"} | {"chunk_size"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise CorrlabError(f"options: unknown matching options {unknown}; expected some of {sorted(allowed)}")
    m = match_views(q_src, k_tgt[:, None], grid_tgt, scale=scale, **options)
    return TokenMatches(index=m.index[:, 0], confidence=m.confidence[:, 0], kept=m.kept[:, 0])


class HistoryMax:
    """Element-wise max of q and k over the last ``n`` calls of each layer (SyncDreamer release).

    ``update(layer, q, k)`` stores detached copies and returns ``(q_max, k_max)`` over the stored history
    (including this call). Memory: ``n`` copies of q and k per layer.
    """

    def __init__(self, n: int = 11):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueRangeError(f"n: expected a positive int (history length), got {n!r}")
        self.n = n
        self._q: dict[str, deque] = {}
        self._k: dict[str, deque] = {}

    def update(self, layer: str, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add one call's ``q``, ``k`` (any equal-per-layer shape); return their running element-wise max."""
        qs = self._q.setdefault(layer, deque(maxlen=self.n))
        ks = self._k.setdefault(layer, deque(maxlen=self.n))
        if qs and (qs[0].shape != q.shape or ks[0].shape != k.shape):
            raise ShapeError(
                f"q, k: expected the shapes of earlier calls of layer {layer!r} "
                f"{tuple(qs[0].shape)}, {tuple(ks[0].shape)}, got {tuple(q.shape)}, {tuple(k.shape)}"
            )
        qs.append(q.detach().clone())
        ks.append(k.detach().clone())
        q_max = qs[0]
        k_max = ks[0]
        for a, b in zip(list(qs)[1:], list(ks)[1:]):
            q_max = torch.maximum(q_max, a)
            k_max = torch.maximum(k_max, b)
        return q_max, k_max

    def clear(self) -> None:
        self._q.clear()
        self._k.clear()
