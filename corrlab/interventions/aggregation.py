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
>>> with corr_adapter(pipe, eta=0.1, window_radius=3) as handle:              # doctest: +SKIP
...     mvs = pipe("red striped box", seed=0)
>>> handle = CorrAdapterHandle(pipe, eta=0.5).enable()                       # doctest: +SKIP
>>> handle.update(eta=0.8); handle.disable()                                 # doctest: +SKIP

What is a step: the taps' step clock (:class:`corrlab.probing.taps.StepClock`); consecutive calls with the same timestep (for
example a pipeline's two classifier-free-guidance calls) are one step, and a timestep larger than the
previous one starts a new generation (step 0, cached matches and history cleared). Models called without
a single timestep count one step per forward call: call :meth:`CorrAdapterHandle.reset` between
generations there.

Batches: every batch entry is adapted with its own matches, so under classifier-free guidance both the
conditional and the unconditional halves are (the pipelines batch them in one call); the SyncDreamer
preset shares one cache between them instead (``shared_guidance_cache``, a release quirk).

Released settings: :meth:`CorrAdapterConfig.preset` (``"syncdreamer"``, ``"mvadapter"``) reproduces each
released integration exactly (methods.md section 6; golden tests against loop references in
``tests/test_corr_adapter_release.py``); every point where they differ is an option of
:class:`CorrAdapterConfig`. When the adapter acts by default (steps, refresh) is :func:`paper_schedule`;
where (layers) is :func:`default_adapter_layers`.

Layouts: images in one sequence, images as batch entries, and row-wise multi-view attention (MV-Adapter:
``TokenLayout.row_wise``, matching per row and a 1-D row window); attention modules outside diffusers
are adapted once registered (:mod:`corrlab.probing.custom`).

Kernels of the windowed attention: float32 on the CPU (windows of at most :data:`COMPILED_WINDOW_MAX_ENTRIES`
entries), one compiled C call per layer call
(:func:`corrlab.probing.match_kernel.window_attention`: per kept match the window's logits 8 keys at a time, their
softmax and the weighted values, blended into the output rows in place; about ``(2r+1)^2 (d + dv)`` multiply-adds a
match, where a dense block computes every key); elsewhere (float64, CUDA, no C compiler, ``CORRLAB_MATCH_KERNEL=0``)
torch: dense logit blocks for images of at most :data:`DENSE_WINDOW_MAX_TOKENS` tokens, gathered windows above.
The three agree to float rounding (``tests/test_corr_adapter.py``).

Memory beyond the kernel's own: the matcher's blocks (``chunk_size`` source tokens x one image's tokens x
heads x other images), the aggregation's blocks (``chunk_size`` kept matches x window x head size, for
keys and values; for images of at most :data:`DENSE_WINDOW_MAX_TOKENS` tokens, blocks of query rows' logits
against one image's keys, at most 4 MiB or that bound; the compiled kernel: a transposed copy of the keys and a
few hundred floats a thread), the list of kept matches (a few longs each), the cached matches (one long per token,
head and other image, per adapted layer) and, with ``matching.history``, that many copies of q and k
per layer. The blend is written into the kernel's output in place (the taps then copy it into the layer's
output, their one output-size copy), so no output-size buffer of the adapter's own is needed; an outer
observer tapping the same layer sees the adapted output in ``call.out``.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from ..errors import CorrlabError, ShapeError, ValueRangeError, check_choice, describe, is_positive_number
from ..probing.fused_attention import fused_attention_matches
from ..probing.match_kernel import load_match_kernel, load_window_kernel, window_attention
from ..probing.matcher import HistoryMax, MatchingOptions, match_layout, window_offsets
from ..probing.taps import AttentionCall, AttentionTaps, list_layers

__all__ = [
    "AggregationOptions",
    "MatchedAttention",
    "CorrAdapterConfig",
    "CorrAdapter",
    "CorrAdapterHandle",
    "corr_adapter",
    "default_adapter_layers",
    "is_decoder_layer",
    "paper_schedule",
    "window_token_indices",
    "windowed_aggregation",
    "blend_aggregated",
    "corr_adapted_output",
    "other_images",
]


def paper_schedule(*, image_conditioned: bool = False, video: bool = False, row_wise: bool = False) -> tuple[int | None, int]:
    """When CorrAdapter acts, by the paper's rule: ``(active_steps, refresh_every)``.

    This is the one place the rule lives (``active_steps="auto"`` and ``refresh_every="auto"`` in
    :class:`CorrAdapterConfig` resolve through it):

    * **active steps**: every step (``None``) when reference images condition the generation
      (image-to-multi-view: both released integrations, SyncDreamer and MV-Adapter, run all 50 steps);
      when only text conditions it, the first 10 steps for multi-view generation and the first 15 for
      video, to keep the diversity of the early layout (paper, text-to-multi-view and video settings).
      corrlab's embedded pipeline is text-conditioned (``image_conditioned=False``, the default); a caller
      that conditions on reference images passes ``image_conditioned=True``.
    * **refresh**: matches are recomputed every call on row-wise layouts (MV-Adapter release: the row
      softmax is cheap and there is no cache) and every 5 steps otherwise (the released "about every 5
      steps", SyncDreamer).

    Where: the layers default to :func:`default_adapter_layers` (finest decoder level).
    """
    active = None if image_conditioned else (15 if video else 10)
    return active, (1 if row_wise else 5)


# keyword form (fields of CorrAdapterConfig and of MatchingOptions), built by CorrAdapterConfig.build
_PRESETS: dict[str, dict] = {
    "syncdreamer": dict(
        eta=0.1, window_radius=3, threshold=0.05, confidence="window", similarity="dual_softmax", heads="per_head",
        mutual=False, strict=False, active_steps=None, refresh_every=5, refresh_last_step=True,
        num_steps=50, history=11, history_for_aggregation=True,
        shared_guidance_cache=True, window="square", window_border="mask", unmatched="original",
        image_conditioned=True,
    ),
    "mvadapter": dict(
        eta=0.1, window_radius=3, threshold=0.05, confidence="global", similarity="softmax", heads="per_head",
        mutual=False, strict=True, active_steps=None, refresh_every=1, refresh_last_step=False,
        history=None, history_for_aggregation=False, shared_guidance_cache=False, window="row",
        window_border="clamp", unmatched="scaled", image_conditioned=True,
    ),
}


@dataclass(frozen=True)
class AggregationOptions:
    """How one layer's kept matches are aggregated and blended (:func:`windowed_aggregation`,
    :func:`corr_adapted_output`); :meth:`CorrAdapterConfig.aggregation` resolves them per layer.

    Attributes:
        radius: r of the ``(2r+1) x (2r+1)`` window (2r+1 tokens for ``window="row"``).
        eta: weight of the original output, ``out = eta * original + (1 - eta) * aggregated`` (1 = off).
        window: ``"square"`` or ``"row"``; border: ``"mask"`` or ``"clamp"`` (see :func:`window_token_indices`).
        unmatched: ``"original"`` (tokens with no kept match keep their output) or ``"scaled"`` (they
            become ``eta * original``, the MVAdapter release).
        chunk_size: kept matches per block (memory ``chunk_size x K x (d + dv)`` values).
    """

    radius: int = MatchingOptions.window_radius
    eta: float = 0.1
    window: str = "square"
    border: str = "mask"
    unmatched: str = "original"
    chunk_size: int = 64

    def __post_init__(self) -> None:
        r = self.radius
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueRangeError(f"radius: expected a non-negative int, got {r!r}")
        e = self.eta
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not 0.0 <= float(e) <= 1.0:
            raise ValueRangeError(f"eta: expected a number in [0, 1] (1 = adapter off), got {e!r}")
        object.__setattr__(self, "eta", float(e))
        check_choice("window", self.window, ("square", "row"))
        check_choice("border", self.border, ("mask", "clamp"))
        check_choice("unmatched", self.unmatched, ("original", "scaled"))
        c = self.chunk_size
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueRangeError(f"chunk_size: expected a positive int, got {c!r}")


@dataclass(frozen=True)
class CorrAdapterConfig:
    """Parameters of CorrAdapter (validated on construction; change them with :meth:`CorrAdapterHandle.update`).

    The defaults are corrlab's clean reading of the paper (methods.md section 2).
    :meth:`preset` gives the exact settings of a released integration (methods.md section 6), including the
    release quirks marked "(quirk)" below, which look like bugs and are off by default.

    Build one from keywords with :meth:`build` (``CorrAdapterConfig.build(eta=0.5, threshold=0.1)``: fields
    of this class and of :class:`~corrlab.probing.matcher.MatchingOptions`), which is also what
    ``corr_adapter(pipe, **params)`` and :meth:`CorrAdapterHandle.update` do.

    Attributes:
        eta: weight of the original attention output, ``out = eta * original + (1 - eta) * aggregated``
            (default 0.1, the released code's value; 1 = adapter off, the paper uses 0.8 for text-to-multi-view).
        matching: the :class:`~corrlab.probing.matcher.MatchingOptions` of the adapter's native
            correspondences (default: the paper's, as the probe's; both releases match per head with
            ``mutual=False``). CorrAdapter has one window radius r: ``matching.window_radius`` is the
            ``(2r+1) x (2r+1)`` aggregation window (2r+1 tokens for row windows) and the window of
            ``confidence="window"`` (default 3, the paper's; also :attr:`radius`). ``matching.strict`` is the
            MVAdapter release's ``>`` threshold; ``matching.history`` (None, or SyncDreamer's 11) matches with
            the element-wise max of q and k over the last ``history`` adapted calls of each layer.
        layers: names of the layers to adapt; None (default) = :func:`default_adapter_layers`: the finest-level
            multi-image layers of the decoder (a UNet's ``up_blocks`` at the highest resolution: SyncDreamer's
            output blocks 9-11, MV-Adapter's ``up_blocks.1``), and where every layer shares one grid
            (the v1 embedded DiT, Wan, Flux) the last of them (``blocks.5.attn`` of the 6-block DiT). The embedded
            UNet ``corrlab-mvunet-s`` names no decoder, so both its 16 x 16 layers: ``blocks.0.attn``, ``blocks.4.attn``.
        active_steps: adapt only the first K steps; None = every step; ``"auto"`` (default) = the paper's rule,
            :func:`paper_schedule` (every step when image-conditioned, else 10, or 15 for video).
        refresh_every: recompute the matches every n steps (steps 0, n, 2n, ...) and reuse them in between;
            ``"auto"`` (default) = :func:`paper_schedule` (every call on row-wise layouts, else 5).
        refresh_last_step: also recompute at the last step ``num_steps - 1`` (SyncDreamer release, quirk:
            an extra refresh off the 5-step grid; default False). Needs ``num_steps``.
        num_steps: the generation's number of steps (only read by ``refresh_last_step``; the SyncDreamer
            preset says 50, its DDIM setting: pass your own).
        history_for_aggregation: (quirk, SyncDreamer release) the history-max q and k also replace the
            layer's q and k in the windowed aggregation (values stay the current ones); needs
            ``matching.history``; default False: the history only chooses the matches.
        shared_guidance_cache: (quirk, SyncDreamer release) one cache of matches per layer and view pair for
            the whole batch: at a refresh every batch entry matches on its own, and the cache keeps the last
            entry's matches, which every entry then reuses until the next refresh; under classifier-free
            guidance batched ``[cond, uncond]`` the conditional half reuses the unconditional half's matches
            (corrlab's pipeline with image guidance batches the branches in use of ``[cond, text-null,
            reference-null]``: every branch then reuses the reference-null branch's matches, the last entry's).
            Default False: one cache per batch entry.
        window: ``"square"`` ``(2r+1)^2`` window, ``"row"`` 1-D window of 2r+1 tokens along the row (for
            row-wise multi-view attention), ``"auto"`` (default): row where the layer's layout is ``row_wise``,
            else square.
        window_border: ``"mask"`` (default; SyncDreamer): window entries outside the image are left out of the
            softmax; ``"clamp"`` (quirk, MVAdapter release): indices are clamped into the image, so border keys
            are counted several times.
        unmatched: ``"original"`` (default; SyncDreamer): tokens with no kept match keep the original output;
            ``"scaled"`` (quirk, MVAdapter release): every token is blended, so tokens with no kept match
            become ``eta x original`` (0.1 x original with the release's eta).
        image_conditioned: reference images condition the generation (image-to-multi-view); read by the
            ``"auto"`` step rule (default False: text-conditioned, corrlab's embedded pipeline).
        video: the model generates video (15 active steps by the auto rule); None (default) = from the model
            (Wan transformers are video models).
        fused_refresh: at a step that recomputes the matches, compute the layer's attention output and its matches
            from one pass over the logits (the probe's compiled fused kernel,
            :func:`corrlab.probing.fused_attention.fused_attention_matches`) instead of running the model's kernel
            and then the matcher over the same logits a second time (default True). Used where that kernel
            applies: the matching's defaults (``similarity="softmax"``, ``heads="per_head"``,
            ``confidence="global"``, no ``mutual``, no ``history``), float32 on the CPU, images in one sequence,
            no ``shared_guidance_cache``, ``eta < 1``; elsewhere, and with False, the model's kernel runs and the
            matcher after it. The attention output at those steps then differs from the model kernel's by float
            rounding (``|out - sdpa| <= 1e-5 + 1e-4 |sdpa|``) and a match can differ where two logits tie within
            rounding; ``eta = 1`` always takes the model's kernel (the bit-exact "adapter off").
        chunk_size: source tokens per matcher block and kept matches per aggregation block (default 64:
            small temporaries, see the module docstring; the dense kernel for small images takes blocks of
            up to 4 MiB of logits when that is more).
    """

    eta: float = AggregationOptions.eta
    matching: MatchingOptions = field(default_factory=MatchingOptions)
    layers: tuple[str, ...] | None = None
    active_steps: int | None | str = "auto"
    refresh_every: int | str = "auto"
    window: str = "auto"
    chunk_size: int = AggregationOptions.chunk_size
    history_for_aggregation: bool = False
    shared_guidance_cache: bool = False
    refresh_last_step: bool = False
    num_steps: int | None = None
    window_border: str = AggregationOptions.border
    unmatched: str = AggregationOptions.unmatched
    image_conditioned: bool = False
    video: bool | None = None
    fused_refresh: bool = True

    @classmethod
    def build(cls, base: "CorrAdapterConfig | None" = None, **params: Any) -> "CorrAdapterConfig":
        """``base`` (default: the defaults) with ``params`` replaced: fields of this class, and fields of
        :class:`~corrlab.probing.matcher.MatchingOptions` (replacing those of ``base.matching``, or of a
        ``matching`` given in ``params``). Unknown names raise, naming the accepted ones."""
        if base is not None and not isinstance(base, cls):
            raise CorrlabError(f"config: expected None or a CorrAdapterConfig, got {describe(base)}")
        own = {f.name for f in dataclasses.fields(cls)}
        matching_names = set(MatchingOptions.fields())
        unknown = sorted(set(params) - own - matching_names)
        if unknown:
            raise CorrlabError(f"params: unknown CorrAdapter parameters {unknown}; expected some of "
                               f"{sorted(own - {'matching'})} or the MatchingOptions fields {sorted(matching_names)}")
        mine = {k: v for k, v in params.items() if k in own}
        options = {k: v for k, v in params.items() if k in matching_names}
        if options:
            start = mine.get("matching", base.matching if base is not None else None)
            mine["matching"] = MatchingOptions.build(start, **options)
        return dataclasses.replace(base, **mine) if base is not None else cls(**mine)

    @property
    def radius(self) -> int:
        """The adapter's window radius r (``matching.window_radius``): aggregation and window confidence."""
        return self.matching.window_radius

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "CorrAdapterConfig":
        """The exact settings of a released integration (methods.md section 6), with ``overrides``.

        * ``"syncdreamer"``: dual softmax per head, window confidence (7x7, ``>=`` 0.05), matching AND (quirk)
          aggregation with the element-wise max of q and k over the last 11 calls, refresh at steps 0, 5, ...
          and (quirk) the last step (``num_steps``, 50 in the release: pass yours), (quirk) one cache shared by
          the guidance halves, masked 7x7 window, 0.1 / 0.9 blend where a match was kept, every step.
        * ``"mvadapter"``: row softmax per head over the same row of each other view (row-wise layouts),
          ``>`` 0.05 on the max probability, refreshed every call, (quirk) clamped 7-token row window,
          (quirk) unmatched tokens scaled to 0.1 x original, every step.

        Both leave ``layers`` to :func:`default_adapter_layers` (the finest decoder level, as released).
        """
        check_choice("name", name, tuple(_PRESETS))
        return cls.build(**{**_PRESETS[name], **overrides})

    @staticmethod
    def preset_names() -> tuple[str, ...]:
        """Names accepted by :meth:`preset`."""
        return tuple(_PRESETS)

    def __post_init__(self) -> None:
        if not isinstance(self.matching, MatchingOptions):
            raise CorrlabError(f"matching: expected a corrlab.probing.MatchingOptions, got {describe(self.matching)}")
        check_choice("window", self.window, ("auto", "square", "row"))
        check_choice("window_border", self.window_border, ("mask", "clamp"))
        self.aggregation("square")  # validates eta, unmatched, chunk_size (named as here)
        object.__setattr__(self, "eta", float(self.eta))
        r = self.refresh_every
        if r != "auto" and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
            raise ValueRangeError(f"refresh_every: expected 'auto' or a positive int, got {r!r}")
        a = self.active_steps
        if a != "auto" and a is not None and (isinstance(a, bool) or not isinstance(a, int) or a < 1):
            raise ValueRangeError(
                f"active_steps: expected 'auto' (the paper's rule), None (every step) or a positive int K (first K "
                f"steps), got {a!r}"
            )
        n = self.num_steps
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueRangeError(f"num_steps: expected None or a positive int, got {n!r}")
        for name in ("history_for_aggregation", "shared_guidance_cache", "refresh_last_step", "image_conditioned",
                     "fused_refresh"):
            if not isinstance(getattr(self, name), bool):
                raise CorrlabError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        if self.video is not None and not isinstance(self.video, bool):
            raise CorrlabError(f"video: expected None (from the model) or a bool, got {self.video!r}")
        if self.history_for_aggregation and self.matching.history is None:
            raise CorrlabError("history_for_aggregation: expected together with matching.history (e.g. 11), "
                               "got matching.history=None")
        if self.refresh_last_step and self.num_steps is None:
            raise CorrlabError("num_steps: refresh_last_step=True needs the generation's number of steps, got None")
        if self.layers is not None:
            if isinstance(self.layers, str) or not all(isinstance(n, str) for n in self.layers) or not self.layers:
                raise CorrlabError(f"layers: expected None or a non-empty list of layer names, got {describe(self.layers)}")
            object.__setattr__(self, "layers", tuple(self.layers))

    def aggregation(self, window: str) -> AggregationOptions:
        """The :class:`AggregationOptions` of a layer whose window shape (``"square"`` / ``"row"``) is ``window``."""
        return AggregationOptions(radius=self.radius, eta=self.eta, window=window, border=self.window_border,
                                  unmatched=self.unmatched, chunk_size=self.chunk_size)

    def schedule(self, *, row_wise: bool = False, video: bool = False) -> tuple[int | None, int]:
        """``(active_steps, refresh_every)`` for a layer: the given values, ``"auto"`` through :func:`paper_schedule`."""
        active, refresh = paper_schedule(
            image_conditioned=self.image_conditioned, video=self.video if self.video is not None else video,
            row_wise=row_wise,
        )
        return (active if self.active_steps == "auto" else self.active_steps,
                refresh if self.refresh_every == "auto" else self.refresh_every)

    def matcher_kwargs(self) -> dict:
        """Keyword arguments of :func:`corrlab.probing.matcher.match_layout` (``matching`` plus ``chunk_size``)."""
        return {**self.matching.matcher_kwargs(), "chunk_size": self.chunk_size}


# a change of any of these drops the cached matches
_MATCHING_FIELDS = ("matching", "history_for_aggregation", "shared_guidance_cache")


_DECODER_CONTAINERS = ("up_blocks", "output_blocks", "decoder")  # diffusers UNets, ldm UNets, generic


def is_decoder_layer(name: str) -> bool:
    """Whether a layer name lies in a UNet decoder (``up_blocks`` (diffusers), ``output_blocks`` (ldm),
    ``decoder``), after any denoiser prefix."""
    return any(part in _DECODER_CONTAINERS for part in name.split("."))


def default_adapter_layers(model_or_pipeline: Any) -> list[str]:
    """The layers CorrAdapter adapts by default (see :attr:`CorrAdapterConfig.layers`).

    The paper injects only into the highest-resolution multi-image layers, and both releases do so in the
    decoder only (SyncDreamer: output blocks 9-11; MV-Adapter: ``up_blocks.1``). So: where the layers'
    token grids differ (a UNet), the layers with the most tokens per image among the decoder's layers
    (all layers if none is a decoder layer); where every layer shares one grid, or no grid is known from
    the config (transformers), only the last of them in forward order.
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
        decoder = [(i, s) for i, s in zip(infos, sizes) if s is not None and is_decoder_layer(i.name)]
        pool = decoder or [(i, s) for i, s in zip(infos, sizes) if s is not None]
        top = max(s for _, s in pool)
        return [i.name for i, s in pool if s == top]
    return [infos[-1].name]


def other_images(num_images: int) -> torch.Tensor:
    """``(V, V-1)`` long: row i lists the other images ``j != i`` in increasing order (the target order)."""
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 2:
        raise ValueRangeError(f"num_images: expected an int >= 2 (CorrAdapter needs other images), got {num_images!r}")
    t = torch.arange(num_images - 1)
    i = torch.arange(num_images)[:, None]
    return t[None] + (t[None] >= i).long()


def window_token_indices(
    centre: torch.Tensor, grid: tuple[int, int], radius: int, shape: str = "square", border: str = "mask"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens of the window around each centre token.

    Args:
        centre: ``(...)`` long, row-major token indices on ``grid``.
        grid: ``(h, w)``.
        radius: r; the window is ``(2r+1)^2`` tokens (``shape="square"``) or 2r+1 tokens of the same row
            (``shape="row"``), row-major, centre in the middle.
        border: ``"mask"`` (``inside`` says which entries lie in the image) or ``"clamp"`` (every entry
            counts: outside entries are the clamped border tokens, ``inside`` is all True; MVAdapter release).

    Returns:
        ``(index (..., K), inside (..., K))``: token indices (clamped into the grid where outside) and whether
        each window entry is used.
    """
    check_choice("shape", shape, ("square", "row"))
    check_choice("border", border, ("mask", "clamp"))
    h, w = int(grid[0]), int(grid[1])
    if shape == "square":
        dr, dc = window_offsets((h, w), radius, device=centre.device)
    else:
        dc = torch.arange(-radius, radius + 1, device=centre.device)
        dr = torch.zeros_like(dc)
    row = (centre // w).unsqueeze(-1) + dr
    col = (centre % w).unsqueeze(-1) + dc
    inside = (row >= 0) & (row < h) & (col >= 0) & (col < w)
    if border == "clamp":
        inside = torch.ones_like(inside)
    return row.clamp(0, h - 1) * w + col.clamp(0, w - 1), inside


@dataclass(frozen=True, eq=False)
class MatchedAttention:
    """One adapted layer call: its q, k, v and its native matches, validated on construction.

    Attributes:
        q, k: ``(B, V, heads, N, d)`` the layer's queries and keys of the image tokens.
        v: ``(B, V, heads, N, dv)`` its values.
        index: ``(B, V, H', V-1, N)`` long, matched token in the t-th other image (order of
            :func:`other_images`) for each source token; ``H'`` = heads, or 1 (one match for every head).
        kept: ``(B, V, H', V-1, N)`` bool, which matches to use.
        grid: ``(h, w)`` token grid of every image, ``h * w = N``.
        scale: the layer's softmax scale.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    index: torch.Tensor
    kept: torch.Tensor
    grid: tuple[int, int]
    scale: float

    def __post_init__(self) -> None:
        q, k, v, index, kept, grid = self.q, self.k, self.v, self.index, self.kept, self.grid
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
        if index.numel():
            lo, hi = int(index.min()), int(index.max())
            if lo < 0 or hi >= N:
                raise ValueRangeError(f"index: expected token indices in [0, {N}), got values in [{lo}, {hi}]")
        try:
            h, w = int(grid[0]), int(grid[1])
        except (TypeError, ValueError, IndexError):
            raise ShapeError(f"grid: expected a (rows, cols) pair, got {grid!r}") from None
        if h * w != N:
            raise ShapeError(f"grid: expected rows * cols = N = {N}, got {grid!r}")
        object.__setattr__(self, "grid", (h, w))
        sc = self.scale
        if not is_positive_number(sc):
            raise ValueRangeError(f"scale: expected a positive finite float, got {sc!r}")


def _check_options(options) -> AggregationOptions:
    if not isinstance(options, AggregationOptions):
        raise CorrlabError(f"options: expected an AggregationOptions, got {describe(options)}")
    return options


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


#: Images of at most this many tokens take the dense-logits kernel (:func:`_dense_window_attention`), larger
#: ones the gathered-window kernel (:func:`_gathered_window_attention`). ``benchmarks/window_kernels.py`` on this
#: CPU (1 thread, 2 x 4 views, 4 heads, head size 32, r = 3, 2/3 of the slots kept; time of gathered / dense):
#: 3.1x at 256 tokens, 1.8x at 1024, 0.96x at 2025, 0.35x at 4096, where dense work (every key, not 49) outgrows
#: the gathers' cost.
DENSE_WINDOW_MAX_TOKENS = 1024


def _kept_window_attention(
    att: MatchedAttention, options: AggregationOptions, dtype
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Windowed attention of every kept match, block by block.

    Yields ``((b, i, h, p), agg (C, dv))``: batch entry, source image, head and source token of each match
    (``(C,)`` long each) and the softmax over its window's keys applied to the values (dtype ``dtype``).
    Each (b, i, h, p) comes once per kept other image, in the order of :func:`other_images` for every
    row. Two torch kernels compute it, the same numbers up to float rounding: dense logits for images of at
    most :data:`DENSE_WINDOW_MAX_TOKENS` tokens, gathered windows above (float32 on the CPU takes the compiled
    kernel instead, :func:`_compiled_window_blend`, where it could be built).
    """
    if att.q.shape[3] <= DENSE_WINDOW_MAX_TOKENS:
        return _dense_window_attention(att, options, dtype)
    return _gathered_window_attention(att, options, dtype)


def _dense_window_attention(
    att: MatchedAttention, options: AggregationOptions, dtype
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`_kept_window_attention` from full logit blocks: per batch entry, source image and other image,
    a block of query rows' logits against all that image's keys (one matmul), the window entries gathered
    from it, their softmax scattered back into a weight block and applied to the values (a second matmul).
    The logits and weight blocks hold at most ``max(chunk_size x K x (d + dv), 2^20, 2 x heads x N)`` values
    together (the gathered kernel's bound, or 4 MiB of float32 if that is larger: one block for small images).
    """
    q, k, v, index, kept, grid, scale = att.q, att.k, att.v, att.index, att.kept, att.grid, att.scale
    B, V, H, N, d = q.shape
    radius, window, border = options.radius, options.window, options.border
    n_win = (2 * radius + 1) ** 2 if window == "square" else 2 * radius + 1
    rows = max(1, max(options.chunk_size * n_win * (d + v.shape[-1]), 2**20) // (2 * H * N))
    index, kept = index.expand(B, V, H, V - 1, N), kept.expand(B, V, H, V - 1, N)
    # the window of every possible centre token, once: (N, K) token indices and whether each entry is used
    window_of, inside_of = window_token_indices(torch.arange(N, device=q.device), grid, radius, window, border)
    targets = other_images(V).tolist()
    for b in range(B):
        for i in range(V):
            if not kept[b, i].any():
                continue
            for t, j in enumerate(targets[i]):
                kt, vt = k[b, j].to(dtype).transpose(-1, -2), v[b, j].to(dtype)  # (H, d, N), (H, N, dv)
                for s in range(0, N, rows):
                    keep = kept[b, i, :, t, s:s + rows]  # (H, R)
                    hs, ps = keep.nonzero(as_tuple=True)
                    if hs.numel() == 0:
                        continue
                    logits = torch.matmul(q[b, i, :, s:s + rows].to(dtype), kt).mul_(scale)  # (H, R, N)
                    centre = index[b, i, :, t, s:s + rows]  # (H, R)
                    tok, inside = window_of[centre], inside_of[centre]  # (H, R, K)
                    win = logits.gather(-1, tok).masked_fill_(~inside, float("-inf"))  # (H, R, K)
                    weights = logits.zero_().scatter_add_(-1, tok, torch.softmax(win, dim=-1))
                    agg = torch.matmul(weights, vt)[hs, ps]  # (C, dv)
                    n = hs.numel()
                    yield (torch.full((n,), b, device=hs.device), torch.full((n,), i, device=hs.device), hs, ps + s), agg


def _gathered_window_attention(
    att: MatchedAttention, options: AggregationOptions, dtype
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`_kept_window_attention` by gathering each kept match's window of keys and values:
    ``chunk_size`` matches per block (memory ``chunk_size x K x (d + dv)`` values)."""
    q, k, v, index, kept, grid, scale = att.q, att.k, att.v, att.index, att.kept, att.grid, att.scale
    B, V, H, N, _ = q.shape
    radius, window, border, chunk_size = options.radius, options.window, options.border, options.chunk_size
    bs, src, hs, ts, ps = kept.expand(B, V, H, V - 1, N).nonzero(as_tuple=True)  # M kept matches
    centre = index.expand(B, V, H, V - 1, N)[bs, src, hs, ts, ps]
    tgt = other_images(V).to(q.device)[src, ts]
    del ts
    q_rows, (qb, qv, qh, qn), q_off = _row_view(q)
    k_rows, (kb, kv, kh, kn), k_off = _row_view(k)
    v_rows, (vb, vv, vh, vn), v_off = _row_view(v)
    window_of, inside_of = window_token_indices(torch.arange(N, device=q.device), grid, radius, window, border)
    for s in range(0, bs.numel(), chunk_size):
        b, i, h, j, p = (x[s:s + chunk_size] for x in (bs, src, hs, tgt, ps))
        c = centre[s:s + chunk_size]
        tok, inside = window_of[c], inside_of[c]  # (C, K)
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


#: The compiled kernel takes windows of at most this many entries (r <= 15 for a square window); larger ones go to
#: torch's kernels. Its float32 sums lose more precision than torch's reductions over very long windows (a 41 x 41
#: clamped window: 2e-5 against float64, torch 7e-6; 121 x 121: 2e-4 against 8e-5), and such windows are rare.
COMPILED_WINDOW_MAX_ENTRIES = 1024


def _compiled_window_blend(att: MatchedAttention, options: AggregationOptions, out_rows: torch.Tensor,
                           out_strides: tuple[int, ...], eta: float, scale_out: bool) -> bool:
    """The windowed aggregation blended into ``out_rows`` (rows of ``(B, V, heads, N)``, strides ``(offset, b, image,
    head, token)`` in rows) by the compiled kernel (:func:`corrlab.probing.match_kernel.window_attention`):
    float32 CPU tensors, where the kernel could be built. Returns False (nothing written) where it does not apply."""
    tensors = (att.q, att.k, att.v, out_rows)
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors) or load_window_kernel() is None:
        return False
    wr = options.radius if options.window == "square" else 0
    if (2 * wr + 1) * (2 * options.radius + 1) > COMPILED_WINDOW_MAX_ENTRIES:
        return False
    views = [_row_view(t) for t in tensors[:3]]
    window_attention(
        (*(rows for rows, _, _ in views), out_rows), (*((off, *st) for _, st, off in views), tuple(out_strides)),
        att.q.shape[2], att.index, att.kept, att.grid, (wr, options.radius),
        clamp=options.border == "clamp", scale=att.scale, eta=eta, scale_out=scale_out,
    )
    return True


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.no_grad()
def windowed_aggregation(att: MatchedAttention, options: AggregationOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention restricted to the window around each kept match, averaged over the kept other images.

    Args:
        att: the layer's q, k, v (``(B, V, heads, N, d)``), matches and grid (:class:`MatchedAttention`).
        options: the window (``radius``, ``window``, ``border``) and ``chunk_size`` (``eta`` and ``unmatched``
            are the blend's, not read here).

    Returns:
        ``(aggregated (B, V, heads, N, dv), count (B, V, heads, N))``: the mean over the kept other images of
        the windowed attention output (float32, or float64 for float64 inputs; 0 where nothing was kept)
        and the number of kept other images.
    """
    _check_options(options)
    B, V, H, N, _ = att.q.shape
    dtype = _compute_dtype(att.q)
    total = torch.zeros((B * V * H * N, att.v.shape[-1]), dtype=dtype, device=att.q.device)
    if _compiled_window_blend(att, options, total, (0, V * H * N, H * N, N, 1), eta=0.0, scale_out=True):
        count = att.kept.expand(B, V, H, V - 1, N).sum(dim=3, dtype=dtype)
        return total.view(B, V, H, N, -1), count
    count = torch.zeros((B * V * H * N,), dtype=dtype, device=att.q.device)
    for (b, i, hd, p), agg in _kept_window_attention(att, options, dtype):
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
    original: torch.Tensor, att: MatchedAttention, options: AggregationOptions, *, inplace: bool = False
) -> torch.Tensor:
    """CorrAdapter's output in one pass: :func:`blend_aggregated` of :func:`windowed_aggregation`.

    Same arguments as :func:`windowed_aggregation` plus ``original (B, V, heads, N, dv)`` (the layer's
    attention output); the blend uses ``options.eta`` and ``options.unmatched``: ``"original"`` (tokens with
    no kept match are left as they are) or ``"scaled"`` (every token is blended: those with no kept match
    become ``eta * original``, the MVAdapter release). The blend is written row by row (no full-size aggregate): into a copy of
    ``original`` (returned), or with ``inplace=True`` into ``original`` itself (returned; no copy at all when
    its rows are contiguous, as an attention kernel's output is). With ``eta = 1`` the result equals
    ``original`` exactly.
    """
    _check_options(options)
    B, V, H, N, _ = att.q.shape
    if not isinstance(original, torch.Tensor) or original.shape != att.v.shape:
        raise ShapeError(f"original: expected shape {tuple(att.v.shape)} (the values'), got {describe(original)}")
    eta, unmatched = options.eta, options.unmatched
    target = original if inplace else original.clone(memory_format=torch.contiguous_format)
    if unmatched == "scaled":
        target.mul_(eta)  # every token's original gets weight eta; the kept ones get their aggregate below
    if not att.kept.any():
        return target
    rows, (sb, sv, sh, sn), offset = _row_view(target)
    copied = rows.untyped_storage().data_ptr() != target.untyped_storage().data_ptr()
    if not _compiled_window_blend(att, options, rows, (offset, sb, sv, sh, sn), float(eta), unmatched == "original"):
        n_kept = att.kept.expand(B, V, H, V - 1, N).sum(dim=3)  # (B, V, H, N) kept other images per output row
        tb, ti, th, tp = n_kept.nonzero(as_tuple=True)
        if unmatched == "original":
            rows[offset + tb * sb + ti * sv + th * sh + tp * sn] *= eta
        dtype = _compute_dtype(att.q)
        share = (1.0 - float(eta)) / n_kept.clamp(min=1).to(dtype)
        for (b, i, hd, p), agg in _kept_window_attention(att, options, dtype):
            agg.mul_(share[b, i, hd, p].unsqueeze(-1))
            rows.index_add_(0, offset + b * sb + i * sv + hd * sh + p * sn, agg.to(rows.dtype))
    if copied:  # rows of a contiguous copy: write it back
        target.copy_(rows[offset:offset + B * V * H * N].view(target.shape))
    return target


@dataclass
class _CachedMatches:
    step: int
    shape: tuple
    index: torch.Tensor  # (B, V, H', V-1, N), or (1, ...) for a guidance-shared cache
    kept: torch.Tensor


class CorrAdapter:
    """The ``on_call`` of :class:`~corrlab.probing.taps.AttentionTaps` that applies CorrAdapter.

    Holds the per-layer state (step counter, cached matches, q/k history). ``stats`` counts calls:
    ``calls`` (tapped calls), ``adapted_calls``, ``matcher_refreshes`` (layer calls that recomputed
    matches), ``fused_refreshes`` (those of them whose matches came from the attention's own pass,
    ``fused_refresh``), ``kept`` and ``total`` (kept and all match slots, summed over adapted calls).

    Refresh rule: a layer's matches are recomputed at steps ``0, n, 2n, ...`` (``n`` = the resolved
    ``refresh_every``), at the last step with ``refresh_last_step``, and whenever nothing usable is cached
    (first call, changed shape, changed matching option); in between the cached matches are reused. With
    one cache per batch entry (default), a step with several denoiser calls (a pipeline calling the
    conditional and unconditional branches separately) keeps one cache per call position in the step.

    ``video`` tells the ``"auto"`` step rule that the model generates video (set by the handle from the
    model family; ``config.video`` overrides it).
    """

    def __init__(self, config: CorrAdapterConfig, video: bool = False):
        self.config = config
        self.video = bool(video)
        self.stats: dict[str, int] = {}
        self.reset()

    def reset(self) -> None:
        """Forget steps, cached matches, history and stats (the next call starts a generation at step 0)."""
        self._origin: tuple[int, int] | None = None  # (generation, step) of the taps' clock at this adapter's step 0
        self._slot = 0
        self._new_generation()
        self.stats = {"calls": 0, "adapted_calls": 0, "matcher_refreshes": 0, "fused_refreshes": 0, "kept": 0, "total": 0}

    def _new_generation(self) -> None:
        self._cache: dict[tuple, _CachedMatches] = {}
        h = self.config.matching.history
        self._history = HistoryMax(h) if h is not None else None

    def set_config(self, config: CorrAdapterConfig) -> None:
        """Use ``config`` from the next call on; cached matches are dropped if a matching option changed."""
        old, self.config = self.config, config
        if any(getattr(old, f) != getattr(config, f) for f in _MATCHING_FIELDS):
            self._cache.clear()
            h = config.matching.history
            self._history = HistoryMax(h) if h is not None else None

    def _step_of(self, call: AttentionCall) -> int:
        """The step within the current generation, read off the taps' step clock (counted from the last
        reset or the clock's last new generation)."""
        origin = self._origin
        if origin is None or call.generation != origin[0]:
            if origin is not None:
                self._new_generation()
            self._origin = origin = (call.generation, call.step)
        self._slot = call.slot  # call position within the step (e.g. the other guidance branch)
        return call.step - origin[1]

    def _refresh_due(self, step: int, refresh_every: int) -> bool:
        cfg = self.config
        return step % refresh_every == 0 or (cfg.refresh_last_step and step == cfg.num_steps - 1)

    def _match(self, q: torch.Tensor, k: torch.Tensor, layout, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Matches of every batch entry: ``(index, kept)``, each ``(B, V, H', V-1, N)``."""
        cfg = self.config
        B, V, H, N, _ = q.shape
        targets = other_images(V).tolist()
        options = cfg.matcher_kwargs()
        hp = H if cfg.matching.heads == "per_head" else 1
        index = torch.empty((B, V, hp, V - 1, N), dtype=torch.long, device=q.device)
        kept = torch.empty((B, V, hp, V - 1, N), dtype=torch.bool, device=q.device)
        for b in range(B):
            k_heads = k[b].transpose(0, 1)  # (heads, V, N, d)
            for i in range(V):
                m = match_layout(q[b, i], k_heads[:, targets[i]], layout.grid, row_wise=layout.row_wise,
                                 scale=scale, **options)
                index[b, i], kept[b, i] = m.index, m.kept
        return index, kept

    def _cache_key(self, call: AttentionCall) -> tuple:
        return (call.layer,) if self.config.shared_guidance_cache else (call.layer, self._slot)

    def _refresh_now(self, call: AttentionCall, step: int, refresh_every: int) -> bool:
        """Whether this call recomputes its layer's matches: nothing usable cached, or a refresh step."""
        cached = self._cache.get(self._cache_key(call))
        usable = cached is not None and cached.shape == tuple(call.q.shape) and cached.step <= step
        return not usable or self._refresh_due(step, refresh_every)

    def _matches(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, step: int, refresh_every: int):
        key, shape = self._cache_key(call), tuple(call.q.shape)
        if not self._refresh_now(call, step, refresh_every):
            cached, B = self._cache[key], shape[0]
            return cached.index.expand(B, *cached.index.shape[1:]), cached.kept.expand(B, *cached.kept.shape[1:])
        index, kept = self._match(q, k, call.layout, call.scale)
        if self.config.shared_guidance_cache:  # the cache keeps the last batch entry's matches (release quirk)
            self._cache[key] = _CachedMatches(step, shape, index[-1:].clone(), kept[-1:].clone())
        else:
            self._cache[key] = _CachedMatches(step, shape, index, kept)
        self.stats["matcher_refreshes"] += 1
        return index, kept

    def _fusable(self, call: AttentionCall, q: torch.Tensor) -> bool:
        cfg, m = self.config, self.config.matching
        return (cfg.fused_refresh and cfg.eta < 1.0 and not cfg.shared_guidance_cache and m.history is None
                and m.similarity == "softmax" and m.heads == "per_head" and m.confidence == "global" and not m.mutual
                and not call.layout.row_wise and call.layout.num_images >= 2 and q.dtype == torch.float32
                and q.device.type == "cpu" and load_match_kernel() is not None)

    @torch.no_grad()
    def fused_kernel(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel) -> torch.Tensor | None:
        """The taps' fused hook (:class:`~corrlab.probing.taps.AttentionTaps`): at a step that recomputes the matches,
        the layer's attention output and its matches from one pass (``fused_refresh``), then the adapter's blend.

        ``q, k, v``: the kernel's ``(B, heads, V*N, d)`` (images in one sequence, no other tokens); ``call``: their
        image-token views, ``out=None``. Returns the adapted kernel output, or None where this does not apply (the
        taps then run the model's kernel and :meth:`__call__`).
        """
        if not self._fusable(call, q):
            return None
        step = self._step_of(call)
        cfg = self.config
        active_steps, refresh_every = cfg.schedule(row_wise=False, video=self.video)
        if (active_steps is not None and step >= active_steps) or not self._refresh_now(call, step, refresh_every):
            return None
        B, H, L, _ = q.shape
        V, N = call.layout.num_images, L // call.layout.num_images
        targets = other_images(V)
        options = cfg.matching.matcher_kwargs()
        outs, index, kept = [], [], []
        for b in range(B):
            out_b, idx, _, kp = fused_attention_matches(q[b], k[b], v[b], call.layout.grid, scale=call.scale,
                                                        chunk_size=cfg.chunk_size, **options)
            outs.append(out_b)  # idx, kp: (H, source image, target image, N) -> (V, H, V-1, N), other_images order
            rows = torch.arange(V)[:, None]
            index.append(idx[:, rows, targets].transpose(0, 1))
            kept.append(kp[:, rows, targets].transpose(0, 1))
        out, index, kept = torch.stack(outs), torch.stack(index), torch.stack(kept)
        self._cache[self._cache_key(call)] = _CachedMatches(step, tuple(call.q.shape), index, kept)
        self.stats["matcher_refreshes"] += 1
        self.stats["fused_refreshes"] += 1
        self.stats["calls"] += 1
        att = MatchedAttention(call.q, call.k, call.v, index, kept, call.layout.grid, call.scale)
        out5 = out.view(B, H, V, N, out.shape[-1]).transpose(1, 2)  # (B, V, heads, N, dv): call.out's layout
        corr_adapted_output(out5, att, cfg.aggregation(self._window_shape(call)), inplace=True)
        self._count(kept, H)
        return out

    def _count(self, kept: torch.Tensor, heads: int) -> None:
        self.stats["adapted_calls"] += 1
        self.stats["kept"] += int(kept.sum()) * (heads // kept.shape[2])
        self.stats["total"] += kept.numel() * (heads // kept.shape[2])

    def _window_shape(self, call: AttentionCall) -> str:
        if self.config.window != "auto":
            return self.config.window
        return "row" if call.layout.row_wise else "square"

    @torch.no_grad()
    def __call__(self, call: AttentionCall) -> torch.Tensor | None:
        self.stats["calls"] += 1
        step = self._step_of(call)
        cfg = self.config
        active_steps, refresh_every = cfg.schedule(row_wise=call.layout.row_wise, video=self.video)
        if active_steps is not None and step >= active_steps:
            return None
        if call.layout.num_images < 2:
            return None
        q, k = call.q, call.k
        if self._history is not None:
            q, k = self._history.update(call.layer, q, k)
        index, kept = self._matches(call, q, k, step, refresh_every)
        if not cfg.history_for_aggregation:
            q, k = call.q, call.k
        att = MatchedAttention(q, k, call.v, index, kept, call.layout.grid, call.scale)
        out = corr_adapted_output(call.out, att, cfg.aggregation(self._window_shape(call)), inplace=True)
        self._count(kept, call.q.shape[2])
        return out


def _is_video_model(model_or_pipeline: Any) -> bool:
    """Whether the model generates video (its first denoiser is a Wan transformer): the auto step rule's 15 steps."""
    from ..probing.layouts import find_denoisers

    try:
        return find_denoisers(model_or_pipeline)[0].family.name == "wan_self"
    except CorrlabError:
        return False


def _config(config: CorrAdapterConfig | None, params: dict) -> CorrAdapterConfig:
    return CorrAdapterConfig.build(config, **params)


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
        self.adapter = CorrAdapter(_config(config, params), video=_is_video_model(model_or_pipeline))
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
            self._taps = AttentionTaps(self.target, self._layers, self.adapter).attach()
        return self

    def disable(self) -> "CorrAdapterHandle":
        """Detach the adapter (a no-op when disabled); the model computes exactly what it did before."""
        taps, self._taps = self._taps, None
        if taps is not None:
            taps.remove()
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
