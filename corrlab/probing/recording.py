"""``probe(...)``: record native correspondences while a model runs its ordinary generation call.

>>> with corrlab.probe(pipe, layers=["blocks.7.attn"], steps=[5, 10]) as rec:     # doctest: +SKIP
...     mvs = pipe("red striped box", seed=0)
>>> rec.ds          # xarray Dataset (layer, step, src, tgt, head, row, col)     # doctest: +SKIP
>>> rec.cameras     # the set's cameras, recorded by the probe                  # doctest: +SKIP
>>> corrlab.probe(pipe, matching=MatchingOptions(heads="mean", threshold=0.2))  # doctest: +SKIP

The probe taps the layers through :class:`corrlab.probing.taps.AttentionTaps` (in the default exact mode
it observes only: the model's outputs stay bit-identical; see "Kernel modes" below), and everything is
detached on exit, also on exceptions. Calls in the thread that entered the ``with`` are recorded. On each call of a
selected layer at a selected step it matches, for every ordered image pair (i != j), the queries of
image i against the keys of image j with :func:`corrlab.probing.matcher.match_views` (chunked, so the
extra memory per call is ``O(chunk_size x h*w)``; no second forward pass) and stores, per source token,
the matched token, its confidence and the kept flag. The record grows by a few bytes per (layer, step,
pair, head, token), independent of anything else.

Steps: the taps' step clock (:class:`corrlab.probing.taps.StepClock`): a step is a run of denoiser calls
with the same ``timestep`` value, counted from 0 in call order (a call without a timestep is a step of its
own). Within a step only the first call of a layer is recorded (e.g. the positive-prompt call of a true-CFG pipeline that calls the denoiser twice).

Row-wise layers (MV-Adapter's row-wise multi-view attention, ``call.layout.row_wise``): a token's
candidates are the tokens of the same row of each other image, so matching runs row by row
(:func:`corrlab.probing.matcher.match_layout`) and the record lists the layer in its ``row_wise_layers``
attribute (the row constraint is exact epipolar geometry only for orthographic views at elevation 0).

Kernel modes: ``kernel="exact"`` (the default) lets the model's own kernel (SDPA) compute every output
and computes the cross-image logits a second time for matching, with its own softmax normalisers: the
generation is bit-identical to an unprobed one. ``kernel="fused"`` computes the recorded batch entry's
attention output of a recorded call and its matches from the same logits (:mod:`corrlab.probing.fused_attention`:
by default one compiled C call, :mod:`corrlab.probing.match_kernel`; the other batch entries and unrecorded calls
still run the model's kernel): outputs then equal SDPA's up to float32 rounding (a different summation order),
so a probed generation is no longer bit-identical to an unprobed one, and over many steps such differences can
grow (about 1e-5 in pixels after 20 steps of the embedded model). Exact stays the default because corrlab's
contract is that a probe observes: the record describes the very images the same seed gives without a probe,
and sweeps, CorrAdapter comparisons and tests rely on that. Use fused where the probe's cost matters (long
sweeps, every layer at every step: it costs about as much as an unprobed run, exact about 1.5x on the embedded
model, see the README); it supports ``similarity="softmax"`` without ``mutual`` or ``history`` (one pass over the
logits), and falls back to the exact path on calls it cannot fuse (row-wise layouts, layers with text tokens,
extended attention, masked kernels). The record states the mode in its ``kernel`` attribute (see ``matching``).

Batch: with classifier-free guidance a pipeline batches the conditional and unconditional branches.
``batch_index=None`` picks the conditional one: index 0 for corrlab's pipeline (``[cond, uncond]``), and
for a diffusers pipeline whose ``do_classifier_free_guidance`` is true the first element of the second
half (``[uncond, cond]``); otherwise 0. Pass an int to choose.
"""
from __future__ import annotations

import json
import warnings
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator, Sequence


import torch

from ..errors import CorrlabError, ValueRangeError, check_choice, describe
from .attention_cache import check_steps, conditional_batch_entry, is_corrlab_model
from .fused_attention import check_fused_options, fused_attention_matches
from .matcher import DEFAULT_CHUNK_SIZE, HistoryMax, MatchingOptions, Workspace, match_layout
from .record import ProbeRecord, RecordBuilder
from .taps import AttentionCall, AttentionTaps, list_layers

__all__ = ["probe", "ProbeRecorder"]


class ProbeRecorder:
    """The ``on_call`` of the taps: derives steps, selects the batch entry, matches, stores."""

    def __init__(self, model_or_pipeline: Any, builder: RecordBuilder, steps: Sequence[int] | None,
                 batch_index: int | None, matching: MatchingOptions, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 kernel: str = "exact"):
        self.target = model_or_pipeline
        self.builder = builder
        self.steps = None if steps is None else set(steps)
        self.batch_index = batch_index
        self.matching = matching
        self._matcher_kwargs = {**matching.matcher_kwargs(), "chunk_size": chunk_size}
        self.history = HistoryMax(matching.history) if matching.history is not None else None
        self.workspace = Workspace()  # block buffers reused across calls: O(chunk_size x h*w) memory
        self.corrlab_model = is_corrlab_model(model_or_pipeline)
        self._done: set[tuple[str, int]] = set()
        # the taps call fused_kernel (when not None) instead of the model's kernel on eligible calls
        self.fused_kernel = self._fused_kernel if kernel == "fused" else None
        self.kernel_calls = {"fused": 0, "exact": 0}  # recorded layer calls per path

    def _batch_entry(self, batch: int) -> int:
        return conditional_batch_entry(self.target, batch, self.batch_index, self.corrlab_model)

    def __call__(self, call: AttentionCall) -> None:
        step = call.step  # the taps' step clock
        key = (call.layer, step)
        wanted = (self.steps is None or step in self.steps) and key not in self._done
        if not wanted and self.history is None:
            return None
        b = self._batch_entry(call.q.shape[0])
        q, k = call.q[b], call.k[b]  # (V, heads, N, d)
        if self.history is not None:
            q, k = self.history.update(call.layer, q, k)
        if not wanted:
            return None
        self._done.add(key)
        self.kernel_calls["exact"] += 1
        layout = call.layout
        num_images, num_heads = q.shape[0], q.shape[1]
        hp = num_heads if self.matching.heads == "per_head" else 1
        self.builder.add_layer(call.layer, layout.grid, hp, layout.token_centres(), layout.image_size,
                               row_wise=layout.row_wise)
        k_heads = k.transpose(0, 1)  # (heads, V, N, d)
        for i in range(num_images):
            tgts = [j for j in range(num_images) if j != i]
            m = match_layout(q[i], k_heads[:, tgts], layout.grid, row_wise=layout.row_wise, scale=call.scale,
                             workspace=self.workspace, **self._matcher_kwargs)
            self.builder.add(call.layer, step, call.timestep, i, tgts, m.index, m.confidence, m.kept, num_images)
        return None

    def _fused_kernel(self, call: AttentionCall, q, k, v, kernel) -> torch.Tensor | None:
        """Fused mode: the kernel output of a recorded call, computed from the logits the matching reads.

        ``q, k, v``: the kernel's ``(B, heads, V*N, d)``; ``kernel(q', k', v')`` runs the model's kernel
        (used for the other batch entries). Returns None (the taps then run the kernel and ``__call__``)
        for calls that are not recorded.
        """
        step = call.step  # the taps' step clock
        key = (call.layer, step)
        if (self.steps is not None and step not in self.steps) or key in self._done or call.layout.row_wise:
            return None
        self._done.add(key)
        self.kernel_calls["fused"] += 1
        B = q.shape[0]
        b = self._batch_entry(B)
        layout = call.layout
        out_b, index, conf, kept = fused_attention_matches(q[b], k[b], v[b], layout.grid, scale=call.scale,
                                                            workspace=self.workspace, **self._matcher_kwargs)
        if call.layer not in self.builder.layers:
            self.builder.add_layer(call.layer, layout.grid, index.shape[0], layout.token_centres(), layout.image_size,
                                   row_wise=layout.row_wise)
        self.builder.add_all(call.layer, step, call.timestep, index, conf, kept)
        parts = []
        if b > 0:
            parts.append(kernel(q[:b], k[:b], v[:b]))
        parts.append(out_b.unsqueeze(0))
        if b < B - 1:
            parts.append(kernel(q[b + 1:], k[b + 1:], v[b + 1:]))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


@contextmanager
def probe(
    model_or_pipeline: Any,
    layers: Sequence[str] | None = None,
    steps: Sequence[int] | None = None,
    *,
    matching: MatchingOptions | None = None,
    batch_index: int | None = None,
    image_scale: float | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    kernel: str = "exact",
    **options,
) -> Iterator[ProbeRecord]:
    """Record native correspondences of ``model_or_pipeline`` during the calls inside the ``with``.

    Args:
        model_or_pipeline: corrlab's ``CorrlabPipeline`` / ``MultiViewDiT`` or a supported diffusers model
            or pipeline (see :mod:`corrlab.probing.taps`).
        layers: layer names (see ``probe.layers(model)``); None = all multi-image attention layers.
        steps: step indices to record (None = every step); see the module docstring for what a step is.
        matching: the :class:`~corrlab.probing.matcher.MatchingOptions` (None = the defaults, the paper's).
        batch_index: which batch entry to record (None = the conditional branch, see the module docstring).
        image_scale: pixels of the generated images per latent pixel (default: from the pipeline).
        chunk_size: source tokens per matcher block (memory bound ``O(chunk_size x h*w)``; results do not
            depend on it).
        **options: fields of :class:`~corrlab.probing.matcher.MatchingOptions` replacing those of ``matching``
            (``probe(pipe, threshold=0.2, history=11)``).
        kernel: ``"exact"`` (default) or ``"fused"``; see "Kernel modes" in the module docstring.

    Yields:
        A :class:`ProbeRecord`, filled while the block runs (``rec.ds`` can be read at any time). A
        ``CorrlabPipeline`` called inside the block hands the set it returns to the record: its prompt, seed
        and cameras are recorded with no further call (the first set; a later call that returns a set with
        other cameras, prompt or seed raises a warning). For a bare model or a diffusers pipeline, whose
        outputs carry no cameras, attach them with ``rec.set_meta(...)``.
    """
    opts = MatchingOptions.build(matching, **options)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueRangeError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    step_list = check_steps(steps)
    if batch_index is not None and (isinstance(batch_index, bool) or not isinstance(batch_index, int)):
        raise ValueRangeError(f"batch_index: expected None or an int, got {batch_index!r}")
    check_choice("kernel", kernel, ("exact", "fused"))
    if kernel == "fused":
        check_fused_options(opts.as_dict())
        if opts.history is not None:
            raise CorrlabError(
                f"kernel: 'fused' matches the logits the layer computes now; history={opts.history} matches the max "
                f"of q and k over earlier calls, use kernel='exact'"
            )
    recorded = {**opts.as_dict(), "chunk_size": chunk_size, "steps": step_list, "kernel": kernel}
    builder = RecordBuilder(recorded, batch_index="auto" if batch_index is None else batch_index)
    rec = ProbeRecord(builder=builder)
    recorder = ProbeRecorder(model_or_pipeline, builder, step_list, batch_index, opts, chunk_size, kernel)
    with ExitStack() as stack:
        stack.enter_context(AttentionTaps(model_or_pipeline, layers, recorder, image_scale=image_scale))
        observe = getattr(model_or_pipeline, "observe_outputs", None)
        if is_corrlab_model(model_or_pipeline) and observe is not None:
            stack.enter_context(observe(_SetCapture(rec, batch_index)))
        yield rec


class _SetCapture:
    """Observer of a ``CorrlabPipeline``'s outputs: records the first returned set's prompt, seed and cameras."""

    def __init__(self, rec: ProbeRecord, batch_index: int | None):
        self.rec = rec
        self.batch_index = batch_index
        self.seen: tuple | None = None

    def __call__(self, result: Any) -> None:
        from ..sets import MultiViewSet

        sets = [result] if isinstance(result, MultiViewSet) else list(result)
        if not sets or not all(isinstance(m, MultiViewSet) for m in sets):
            return
        b = self.batch_index if self.batch_index is not None else 0
        mvs = sets[b] if -len(sets) <= b < len(sets) else sets[0]
        key = (mvs.prompt, int(mvs.seed), tuple(json.dumps(c.to_dict(), sort_keys=True) for c in mvs.cameras))
        if self.seen is None:
            self.seen = key
            self.rec.set_meta(prompt=mvs.prompt, seed=mvs.seed, cameras=mvs.cameras)
        elif key != self.seen:
            warnings.warn("probe: the pipeline was called again inside the probe with another prompt, seed or "
                          "cameras; the record keeps the first set's (and holds the steps of every call)", stacklevel=3)


probe.layers = list_layers
