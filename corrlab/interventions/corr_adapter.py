"""CorrAdapter, training-free: aggregate values only inside windows around native correspondences.

methods.md section 2 (the paper's "Aligned Area Aggregator"). In every adapted multi-image attention
layer, per head, the layer's own q and k give native correspondences (the probing matcher,
:func:`corrlab.probing.matcher.match_views`): for token p of image i and each other image j a match
``c_ij[p]`` and whether it was kept (confidence >= threshold). Then, for every kept (i, j, p),

    agg_ij[p] = softmax_l(scale * q_i[p] . k_j[l]) v_j[l]        l in the (2r+1) x (2r+1) window around c_ij[p]

(window entries outside image j are masked out; a 1-D window of 2r+1 tokens along the row for row-wise
layouts), averaged over the kept j, and the layer's attention output (before its output projection) becomes

    out = eta * original + (1 - eta) * mean_j agg_ij                only where at least one j was kept

(elsewhere the original output). ``eta = 1`` is "adapter off" and reproduces the plain model bit for bit.

>>> from corrlab.interventions import corr_adapter
>>> with corr_adapter(pipe, eta=0.1, radius=3) as handle:                     # doctest: +SKIP
...     mvs = pipe("red striped box", seed=0)
>>> handle = CorrAdapterHandle(pipe, eta=0.5).enable()                       # doctest: +SKIP
>>> handle.update(eta=0.8); handle.disable()                                 # doctest: +SKIP

What is a step: the handle counts denoiser forward calls; consecutive calls with the same timestep (for
example a pipeline's two classifier-free-guidance calls) are one step, and a timestep larger than the
previous one starts a new generation (step 0, cached matches and history cleared). Models called without
a single timestep count one step per forward call: call :meth:`CorrAdapterHandle.reset` between
generations there.

Batches: every batch entry is adapted with its own matches, so under classifier-free guidance both the
conditional and the unconditional halves are (the pipelines batch them in one call).

Memory beyond the kernel's own: the matcher's blocks (``chunk_size`` source tokens x one image's tokens x
heads x other images), the aggregation's blocks (``chunk_size`` kept matches x window x head size, for
keys and values), the list of kept matches (a few longs each), the cached matches (one long per token,
head and other image, per adapted layer) and, with ``history_max``, ``history_length`` copies of q and k
per layer. The blend is written into the kernel's output in place (the taps then copy it into the layer's
output, their one output-size copy), so no output-size buffer of the adapter's own is needed; an outer
observer tapping the same layer sees the adapted output in ``call.out``.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from ..errors import CorrlabError, ShapeError, ValueRangeError, check_choice, describe
from ..probing.matcher import HistoryMax, match_views, window_offsets
from ..probing.taps import AttentionCall, AttentionTaps, list_layers

__all__ = [
    "CorrAdapterConfig",
    "CorrAdapter",
    "CorrAdapterHandle",
    "corr_adapter",
    "default_adapter_layers",
    "window_token_indices",
    "windowed_aggregation",
    "blend_aggregated",
    "corr_adapted_output",
    "other_images",
]


@dataclass(frozen=True)
class CorrAdapterConfig:
    """Parameters of CorrAdapter (validated on construction; change them with :meth:`CorrAdapterHandle.update`).

    Attributes:
        eta: weight of the original attention output, ``out = eta * original + (1 - eta) * aggregated``
            (default 0.1, the released code's value; 1 = adapter off, the paper uses 0.8 for text-to-multi-view).
        radius: r of the ``(2r+1) x (2r+1)`` aggregation window (default 3, the paper's).
        threshold: keep a match when its confidence is ``>= threshold`` (default 0.05, the paper's).
        confidence: ``"global"`` (default, max softmax probability) or ``"window"`` (probability of the
            window centre in a softmax over the ``(2r+1)^2`` window, with the same r); see the matcher.
        similarity: ``"softmax"`` (default) or ``"dual_softmax"``.
        heads: ``"per_head"`` (default, both releases: every head matches and aggregates on its own) or
            ``"mean"`` (one match from head-averaged similarities, used by every head).
        mutual: keep only mutual nearest neighbours (default False, as in both releases).
        layers: names of the layers to adapt; None (default) = :func:`default_adapter_layers`: the
            multi-image layers at the highest token resolution (a UNet's highest-resolution level), and where
            every layer shares one grid (the embedded model, Wan, Flux) the last of them (``blocks.5.attn`` of
            the 6-block embedded model: the paper injects into "the" highest-resolution multi-image block,
            the last layer holds the embedded model's best native correspondences, and one layer keeps the
            cost within 1.10x).
        active_steps: adapt only the first K steps (default 10, the paper's choice for text-to-multi-view,
            which the embedded model is: half of its default 20 steps; None = every step, the paper's choice
            for image-conditioned generation).
        refresh_every: recompute the matches every n active steps and reuse them in between (default 5,
            the released code's "about every 5 steps"; 1 = every step).
        history_max: match with the element-wise max of q and k over the last ``history_length`` adapted
            calls of each layer (SyncDreamer release; default False).
        history_length: calls kept for ``history_max`` (default 11).
        window: ``"square"`` ``(2r+1)^2`` window, ``"row"`` 1-D window of 2r+1 tokens along the row (for
            row-wise multi-view attention), ``"auto"`` (default): row where the layer's layout says
            ``row_wise``, else square.
        chunk_size: source tokens per matcher block and kept matches per aggregation block (default 64:
            small temporaries, see the module docstring).
    """

    eta: float = 0.1
    radius: int = 3
    threshold: float = 0.05
    confidence: str = "global"
    similarity: str = "softmax"
    heads: str = "per_head"
    mutual: bool = False
    layers: tuple[str, ...] | None = None
    active_steps: int | None = 10
    refresh_every: int = 5
    history_max: bool = False
    history_length: int = 11
    window: str = "auto"
    chunk_size: int = 64

    def __post_init__(self) -> None:
        if isinstance(self.eta, bool) or not isinstance(self.eta, (int, float)) or not 0.0 <= float(self.eta) <= 1.0:
            raise ValueRangeError(f"eta: expected a number in [0, 1] (1 = adapter off), got {self.eta!r}")
        object.__setattr__(self, "eta", float(self.eta))
        for name in ("radius",):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueRangeError(f"{name}: expected a non-negative int, got {value!r}")
        for name in ("refresh_every", "history_length", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueRangeError(f"{name}: expected a positive int, got {value!r}")
        a = self.active_steps
        if a is not None and (isinstance(a, bool) or not isinstance(a, int) or a < 1):
            raise ValueRangeError(f"active_steps: expected None (every step) or a positive int K (first K steps), got {a!r}")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= float(t) <= 1.0:
            raise ValueRangeError(f"threshold: expected a probability in [0, 1], got {t!r}")
        object.__setattr__(self, "threshold", float(t))
        check_choice("confidence", self.confidence, ("global", "window"))
        check_choice("similarity", self.similarity, ("softmax", "dual_softmax"))
        check_choice("heads", self.heads, ("per_head", "mean"))
        check_choice("window", self.window, ("auto", "square", "row"))
        for name in ("mutual", "history_max"):
            if not isinstance(getattr(self, name), bool):
                raise CorrlabError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        if self.layers is not None:
            if isinstance(self.layers, str) or not all(isinstance(n, str) for n in self.layers) or not self.layers:
                raise CorrlabError(f"layers: expected None or a non-empty list of layer names, got {describe(self.layers)}")
            object.__setattr__(self, "layers", tuple(self.layers))

    def matching_options(self) -> dict:
        """Keyword arguments of :func:`corrlab.probing.matcher.match_views` (window radius = ``radius``)."""
        return {
            "similarity": self.similarity,
            "heads": self.heads,
            "confidence": self.confidence,
            "threshold": self.threshold,
            "window_radius": self.radius,
            "mutual": self.mutual,
            "chunk_size": self.chunk_size,
        }


_MATCHING_FIELDS = ("radius", "threshold", "confidence", "similarity", "heads", "mutual", "history_max", "history_length")


def default_adapter_layers(model_or_pipeline: Any) -> list[str]:
    """The layers CorrAdapter adapts by default (see :attr:`CorrAdapterConfig.layers`).

    The multi-image layers with the most tokens per image (a UNet's highest-resolution level); where that
    is every layer (all share one grid, or no grid is known from the config: transformers), only the
    last of them in forward order.
    """
    infos: list = []
    seen: set[str] = set()
    for info in list_layers(model_or_pipeline):
        if info.name not in seen:
            seen.add(info.name)
            infos.append(info)
    if not infos:
        raise CorrlabError(f"model_or_pipeline: expected a model with multi-image attention layers, got {describe(model_or_pipeline)}")
    sizes = [None if i.grid is None else i.grid[0] * i.grid[1] for i in infos]
    known = [s for s in sizes if s is not None]
    if known and len(set(known)) > 1:
        top = max(known)
        return [i.name for i, s in zip(infos, sizes) if s == top]
    return [infos[-1].name]


def other_images(num_images: int) -> torch.Tensor:
    """``(V, V-1)`` long: row i lists the other images ``j != i`` in increasing order (the target order)."""
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 2:
        raise ValueRangeError(f"num_images: expected an int >= 2 (CorrAdapter needs other images), got {num_images!r}")
    t = torch.arange(num_images - 1)
    i = torch.arange(num_images)[:, None]
    return t[None] + (t[None] >= i).long()


def window_token_indices(
    centre: torch.Tensor, grid: tuple[int, int], radius: int, shape: str = "square"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens of the window around each centre token.

    Args:
        centre: ``(...)`` long, row-major token indices on ``grid``.
        grid: ``(h, w)``.
        radius: r; the window is ``(2r+1)^2`` tokens (``shape="square"``) or 2r+1 tokens of the same row
            (``shape="row"``), row-major, centre in the middle.

    Returns:
        ``(index (..., K), inside (..., K))``: token indices (clamped into the grid where outside) and whether
        each window entry lies inside the image.
    """
    check_choice("shape", shape, ("square", "row"))
    h, w = int(grid[0]), int(grid[1])
    if shape == "square":
        dr, dc = window_offsets((h, w), radius, device=centre.device)
    else:
        dc = torch.arange(-radius, radius + 1, device=centre.device)
        dr = torch.zeros_like(dc)
    row = (centre // w).unsqueeze(-1) + dr
    col = (centre % w).unsqueeze(-1) + dc
    inside = (row >= 0) & (row < h) & (col >= 0) & (col < w)
    return row.clamp(0, h - 1) * w + col.clamp(0, w - 1), inside


def _check_inputs(q, k, v, index, kept, grid, chunk_size) -> tuple[int, int]:
    if not isinstance(q, torch.Tensor) or q.ndim != 5:
        raise ShapeError(f"q: expected a tensor of shape (B, V, heads, N, d), got {describe(q)}")
    for name, x in (("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.ndim != 5 or x.shape[:4] != q.shape[:4]:
            raise ShapeError(f"{name}: expected shape {tuple(q.shape[:4])} + (d,) matching q, got {describe(x)}")
    if k.shape[-1] != q.shape[-1]:
        raise ShapeError(f"k: expected head size {q.shape[-1]} matching q, got {describe(k)}")
    B, V, H, N, _ = q.shape
    if V < 2:
        raise ShapeError(f"q: expected at least 2 images (V >= 2), got {describe(q)}")
    ok = isinstance(index, torch.Tensor) and index.ndim == 5 and index.shape[:2] == (B, V)
    if not ok or index.shape[2] not in (1, H) or index.shape[3:] != (V - 1, N) or index.dtype != torch.long:
        raise ShapeError(f"index: expected a long tensor of shape ({B}, {V}, {H} or 1, {V - 1}, {N}), got {describe(index)}")
    if not isinstance(kept, torch.Tensor) or kept.shape != index.shape or kept.dtype != torch.bool:
        raise ShapeError(f"kept: expected a bool tensor of shape {tuple(index.shape)}, got {describe(kept)}")
    try:
        h, w = int(grid[0]), int(grid[1])
    except (TypeError, ValueError, IndexError):
        raise ShapeError(f"grid: expected a (rows, cols) pair, got {grid!r}") from None
    if h * w != N:
        raise ShapeError(f"grid: expected rows * cols = N = {N}, got {grid!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueRangeError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    return h, w


def _row_view(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], int]:
    """``x (B, V, H, N, d)`` as rows of its storage: ``(rows (R, d), strides of B, V, H, N in rows, offset in rows)``.

    Zero-copy when every length-d row of ``x`` is contiguous and row-aligned in its storage (the attention
    processors' q / k / v / out are); otherwise rows of a contiguous copy.
    """
    d = x.shape[-1]
    if x.stride(-1) != 1 or any(s % d for s in x.stride()[:-1]) or x.storage_offset() % d:
        x = x.contiguous()
    n_rows = x.untyped_storage().nbytes() // x.element_size() // d
    rows = x.as_strided((n_rows, d), (d, 1), 0)
    return rows, tuple(s // d for s in x.stride()[:-1]), x.storage_offset() // d


def _kept_window_attention(
    q, k, v, index, kept, grid, scale, radius, window, chunk_size, dtype
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Windowed attention of every kept match, block by block.

    Yields ``((b, i, h, p), agg (C, dv))``: batch entry, source image, head and source token of each match
    (``(C,)`` long each) and the softmax over its window's keys applied to the values (dtype ``dtype``).
    """
    B, V, H, N, _ = q.shape
    bs, src, hs, ts, ps = kept.expand(B, V, H, V - 1, N).nonzero(as_tuple=True)  # M kept matches
    centre = index.expand(B, V, H, V - 1, N)[bs, src, hs, ts, ps]
    tgt = other_images(V).to(q.device)[src, ts]
    del ts
    q_rows, (qb, qv, qh, qn), q_off = _row_view(q)
    k_rows, (kb, kv, kh, kn), k_off = _row_view(k)
    v_rows, (vb, vv, vh, vn), v_off = _row_view(v)
    for s in range(0, bs.numel(), chunk_size):
        b, i, h, j, p = (x[s:s + chunk_size] for x in (bs, src, hs, tgt, ps))
        tok, inside = window_token_indices(centre[s:s + chunk_size], grid, radius, window)  # (C, K)
        n_c, n_k = tok.shape
        query = q_rows.index_select(0, q_off + b * qb + i * qv + h * qh + p * qn).to(dtype)  # (C, d)
        keys = k_rows.index_select(0, (k_off + b * kb + j * kv + h * kh)[:, None].add(tok * kn).view(-1))
        logits = torch.bmm(keys.view(n_c, n_k, -1).to(dtype), query.unsqueeze(-1)).squeeze(-1).mul_(scale)
        del keys
        logits.masked_fill_(~inside, float("-inf"))
        weights = torch.softmax(logits, dim=-1)
        vals = v_rows.index_select(0, (v_off + b * vb + j * vv + h * vh)[:, None].add(tok * vn).view(-1))
        agg = torch.bmm(weights.unsqueeze(1), vals.view(n_c, n_k, -1).to(dtype)).squeeze(1)  # (C, dv)
        yield (b, i, h, p), agg


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.no_grad()
def windowed_aggregation(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor,
    kept: torch.Tensor,
    grid: tuple[int, int],
    *,
    scale: float,
    radius: int,
    window: str = "square",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention restricted to the window around each kept match, averaged over the kept other images.

    Args:
        q, k: ``(B, V, heads, N, d)`` the layer's queries and keys of the image tokens.
        v: ``(B, V, heads, N, dv)`` its values.
        index: ``(B, V, H', V-1, N)`` long, matched token in the t-th other image (order of
            :func:`other_images`) for each source token; ``H'`` = heads, or 1 (one match for every head).
        kept: ``(B, V, H', V-1, N)`` bool, which matches to use.
        grid: ``(h, w)`` token grid of every image, ``h * w = N``.
        scale: the layer's softmax scale.
        radius: window radius r; ``window``: ``"square"`` or ``"row"`` (see :func:`window_token_indices`).
        chunk_size: kept matches processed together (memory ``chunk_size x K x (d + dv)`` values).

    Returns:
        ``(aggregated (B, V, heads, N, dv), count (B, V, heads, N))``: the mean over the kept other images of
        the windowed attention output (float32, or float64 for float64 inputs; 0 where nothing was kept)
        and the number of kept other images.
    """
    h, w = _check_inputs(q, k, v, index, kept, grid, chunk_size)
    B, V, H, N, _ = q.shape
    dtype = _compute_dtype(q)
    total = torch.zeros((B * V * H * N, v.shape[-1]), dtype=dtype, device=q.device)
    count = torch.zeros((B * V * H * N,), dtype=dtype, device=q.device)
    for (b, i, hd, p), agg in _kept_window_attention(q, k, v, index, kept, (h, w), scale, radius, window, chunk_size, dtype):
        row = ((b * V + i) * H + hd) * N + p
        total.index_add_(0, row, agg)
        count.index_add_(0, row, torch.ones_like(agg[:, 0]))
    total /= count.clamp(min=1.0).unsqueeze(-1)
    return total.view(B, V, H, N, -1), count.view(B, V, H, N)


def blend_aggregated(original: torch.Tensor, aggregated: torch.Tensor, count: torch.Tensor, eta: float) -> torch.Tensor:
    """``eta * original + (1 - eta) * aggregated`` where ``count > 0``, else ``original``.

    Args:
        original: ``(..., N, d)`` attention output; aggregated: same shape (any float dtype);
        count: ``(..., N)`` number of kept other images.

    Returns:
        A new tensor like ``original`` (its dtype). With ``eta = 1`` it equals ``original`` exactly.
    """
    if aggregated.shape != original.shape or count.shape != original.shape[:-1]:
        raise ShapeError(
            f"aggregated, count: expected shapes {tuple(original.shape)} and {tuple(original.shape[:-1])}, "
            f"got {describe(aggregated)} and {describe(count)}"
        )
    out = aggregated.to(original.dtype, copy=True)
    out.mul_(1.0 - eta).add_(original, alpha=eta)
    return torch.where((count > 0).unsqueeze(-1), out, original, out=out)


@torch.no_grad()
def corr_adapted_output(
    original: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor,
    kept: torch.Tensor,
    grid: tuple[int, int],
    *,
    scale: float,
    radius: int,
    eta: float,
    window: str = "square",
    chunk_size: int = 64,
    inplace: bool = False,
) -> torch.Tensor:
    """CorrAdapter's output in one pass: :func:`blend_aggregated` of :func:`windowed_aggregation`.

    Same arguments as :func:`windowed_aggregation` plus ``original (B, V, heads, N, dv)`` (the layer's
    attention output) and ``eta``. The blend is written row by row (no full-size aggregate): into a copy of
    ``original`` (returned), or with ``inplace=True`` into ``original`` itself (returned; no copy at all when
    its rows are contiguous, as an attention kernel's output is). With ``eta = 1`` the result equals
    ``original`` exactly.
    """
    h, w = _check_inputs(q, k, v, index, kept, grid, chunk_size)
    B, V, H, N, _ = q.shape
    if not isinstance(original, torch.Tensor) or original.shape != v.shape:
        raise ShapeError(f"original: expected shape {tuple(v.shape)} (the values'), got {describe(original)}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= float(eta) <= 1.0:
        raise ValueRangeError(f"eta: expected a number in [0, 1], got {eta!r}")
    target = original if inplace else original.clone(memory_format=torch.contiguous_format)
    rows, (sb, sv, sh, sn), offset = _row_view(target)
    copied = rows.untyped_storage().data_ptr() != target.untyped_storage().data_ptr()
    n_kept = kept.expand(B, V, H, V - 1, N).sum(dim=3)  # (B, V, H, N) kept other images per output row
    tb, ti, th, tp = n_kept.nonzero(as_tuple=True)
    if tb.numel() == 0:
        return target
    rows[offset + tb * sb + ti * sv + th * sh + tp * sn] *= eta
    dtype = _compute_dtype(q)
    share = (1.0 - float(eta)) / n_kept.clamp(min=1).to(dtype)
    for (b, i, hd, p), agg in _kept_window_attention(q, k, v, index, kept, (h, w), scale, radius, window, chunk_size, dtype):
        agg.mul_(share[b, i, hd, p].unsqueeze(-1))
        rows.index_add_(0, offset + b * sb + i * sv + hd * sh + p * sn, agg.to(rows.dtype))
    if copied:  # rows of a contiguous copy: write it back
        target.copy_(rows[offset:offset + B * V * H * N].view(target.shape))
    return target


@dataclass
class _CachedMatches:
    step: int
    shape: tuple
    index: torch.Tensor  # (B, V, H', V-1, N)
    kept: torch.Tensor


class CorrAdapter:
    """The ``on_call`` of :class:`~corrlab.probing.taps.AttentionTaps` that applies CorrAdapter.

    Holds the per-layer state (step counter, cached matches, q/k history). ``stats`` counts calls:
    ``calls`` (tapped calls), ``adapted_calls``, ``matcher_refreshes`` (layer calls that recomputed
    matches), ``kept`` and ``total`` (kept and all match slots, summed over adapted calls).
    """

    def __init__(self, config: CorrAdapterConfig):
        self.config = config
        self.stats: dict[str, int] = {}
        self.reset()

    def reset(self) -> None:
        """Forget steps, cached matches, history and stats (the next call starts a generation at step 0)."""
        self.step = -1
        self._last_call: int | None = None
        self._last_timestep: float | None = None
        self._new_generation()
        self.stats = {"calls": 0, "adapted_calls": 0, "matcher_refreshes": 0, "kept": 0, "total": 0}

    def _new_generation(self) -> None:
        self.step = -1
        self._cache: dict[str, _CachedMatches] = {}
        self._history = HistoryMax(self.config.history_length) if self.config.history_max else None

    def set_config(self, config: CorrAdapterConfig) -> None:
        """Use ``config`` from the next call on; cached matches are dropped if a matching option changed."""
        old, self.config = self.config, config
        if any(getattr(old, f) != getattr(config, f) for f in _MATCHING_FIELDS):
            self._cache.clear()
            self._history = HistoryMax(config.history_length) if config.history_max else None

    def _step_of(self, call: AttentionCall) -> int:
        if call.call_index != self._last_call:
            t, last = call.timestep, self._last_timestep
            if t is not None and last is not None and t > last:
                self._new_generation()
            if t is None or self._last_timestep is None or t != self._last_timestep:
                self.step += 1
            self._last_call, self._last_timestep = call.call_index, t
        return self.step

    def _matches(self, call: AttentionCall, step: int) -> _CachedMatches:
        cfg = self.config
        q, k = call.q, call.k
        if self._history is not None:
            q, k = self._history.update(call.layer, q, k)
        cached = self._cache.get(call.layer)
        shape = tuple(call.q.shape)
        if cached is not None and cached.shape == shape and step - cached.step < cfg.refresh_every:
            return cached
        B, V, H, N, _ = q.shape
        targets = other_images(V).tolist()
        options = cfg.matching_options()
        hp = H if cfg.heads == "per_head" else 1
        index = torch.empty((B, V, hp, V - 1, N), dtype=torch.long, device=q.device)
        kept = torch.empty((B, V, hp, V - 1, N), dtype=torch.bool, device=q.device)
        for b in range(B):
            k_heads = k[b].transpose(0, 1)  # (heads, V, N, d)
            for i in range(V):
                m = match_views(q[b, i], k_heads[:, targets[i]], call.layout.grid, scale=call.scale, **options)
                index[b, i], kept[b, i] = m.index, m.kept
        cached = _CachedMatches(step, shape, index, kept)
        self._cache[call.layer] = cached
        self.stats["matcher_refreshes"] += 1
        return cached

    def _window_shape(self, call: AttentionCall) -> str:
        if self.config.window != "auto":
            return self.config.window
        return "row" if bool(getattr(call.layout, "row_wise", False)) else "square"

    @torch.no_grad()
    def __call__(self, call: AttentionCall) -> torch.Tensor | None:
        self.stats["calls"] += 1
        step = self._step_of(call)
        cfg = self.config
        if cfg.active_steps is not None and step >= cfg.active_steps:
            return None
        if call.layout.num_images < 2:
            return None
        matches = self._matches(call, step)
        out = corr_adapted_output(
            call.out, call.q, call.k, call.v, matches.index, matches.kept, call.layout.grid, scale=call.scale,
            radius=cfg.radius, eta=cfg.eta, window=self._window_shape(call), chunk_size=cfg.chunk_size,
            inplace=True,
        )
        self.stats["adapted_calls"] += 1
        self.stats["kept"] += int(matches.kept.sum()) * (call.q.shape[2] // matches.kept.shape[2])
        self.stats["total"] += matches.kept.numel() * (call.q.shape[2] // matches.kept.shape[2])
        return out


def _config(config: CorrAdapterConfig | None, params: dict) -> CorrAdapterConfig:
    if config is not None and not isinstance(config, CorrAdapterConfig):
        raise CorrlabError(f"config: expected None or a CorrAdapterConfig, got {describe(config)}")
    names = {f.name for f in dataclasses.fields(CorrAdapterConfig)}
    unknown = sorted(set(params) - names)
    if unknown:
        raise CorrlabError(f"params: unknown CorrAdapter parameters {unknown}; expected some of {sorted(names)}")
    return dataclasses.replace(config or CorrAdapterConfig(), **params)


class CorrAdapterHandle:
    """CorrAdapter on a model or pipeline, switched on and off without reloading it.

    ``CorrAdapterHandle(model_or_pipeline, config=None, **params)`` (params: fields of
    :class:`CorrAdapterConfig`); :meth:`enable` attaches taps to the adapted layers, :meth:`disable`
    removes them (the model is then exactly as before), :meth:`update` changes parameters (while enabled
    too: taking effect at the next call). Also a context manager (enable on entry, disable on exit, also
    on exceptions).
    """

    def __init__(self, model_or_pipeline: Any, config: CorrAdapterConfig | None = None, **params: Any):
        self.target = model_or_pipeline
        self.adapter = CorrAdapter(_config(config, params))
        self._layers = self._resolve_layers(self.adapter.config)
        self._taps: AttentionTaps | None = None

    def _resolve_layers(self, config: CorrAdapterConfig) -> list[str]:
        layers = list(config.layers) if config.layers is not None else default_adapter_layers(self.target)
        AttentionTaps(self.target, layers, self.adapter)  # validates the names (attaches nothing)
        return layers

    @property
    def config(self) -> CorrAdapterConfig:
        return self.adapter.config

    @property
    def layers(self) -> list[str]:
        """The adapted layers."""
        return list(self._layers)

    @property
    def enabled(self) -> bool:
        return self._taps is not None

    @property
    def stats(self) -> dict[str, int]:
        """Counters since the last reset (see :class:`CorrAdapter`)."""
        return dict(self.adapter.stats)

    def enable(self) -> "CorrAdapterHandle":
        """Attach the adapter (a no-op when already enabled); starts counting steps from 0."""
        if self._taps is None:
            self.adapter.reset()
            taps = AttentionTaps(self.target, self._layers, self.adapter)
            taps.__enter__()
            self._taps = taps
        return self

    def disable(self) -> "CorrAdapterHandle":
        """Detach the adapter (a no-op when disabled); the model computes exactly what it did before."""
        taps, self._taps = self._taps, None
        if taps is not None:
            taps.__exit__(None, None, None)
        return self

    def reset(self) -> None:
        """Restart at step 0 with no cached matches (see the module docstring for when this is needed)."""
        self.adapter.reset()

    def update(self, **params: Any) -> CorrAdapterConfig:
        """Change parameters (fields of :class:`CorrAdapterConfig`); returns the new config.

        Matching options drop the cached matches; a change of ``layers`` re-attaches the taps.
        """
        config = _config(self.adapter.config, params)
        layers = self._resolve_layers(config) if "layers" in params else self._layers
        was_enabled = self.enabled
        if layers != self._layers and was_enabled:
            self.disable()
        self._layers = layers
        self.adapter.set_config(config)
        if was_enabled and not self.enabled:
            self.enable()
        return config

    def __enter__(self) -> "CorrAdapterHandle":
        return self.enable()

    def __exit__(self, *exc) -> bool:
        self.disable()
        return False

    def __repr__(self) -> str:
        state = "enabled" if self.enabled else "disabled"
        return f"CorrAdapterHandle({state}, layers={self._layers}, {self.config})"


@contextmanager
def corr_adapter(model_or_pipeline: Any, config: CorrAdapterConfig | None = None, **params: Any) -> Iterator[CorrAdapterHandle]:
    """``with corr_adapter(pipe, eta=0.1, radius=3) as handle:`` CorrAdapter on inside the block only.

    Params are fields of :class:`CorrAdapterConfig`. The model is restored on exit, also when the block
    raises; outputs afterwards are bit-identical to never having enabled it.
    """
    handle = CorrAdapterHandle(model_or_pipeline, config, **params)
    handle.enable()
    try:
        yield handle
    finally:
        handle.disable()
