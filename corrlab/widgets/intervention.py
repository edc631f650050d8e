"""Intervention panel: toggle CorrAdapter and segment transport, Run, compare before / after.

A thin ipywidgets 8 dashboard. "Run" regenerates with the chosen settings (a progress bar counts the
model's denoising calls), shows the plain generation and the intervened one side by side
(:func:`corrlab.plotting.image_rows_figure`), and updates the consistency (CorrAdapter: precision of
SIFT matches under the conditioning cameras at 1 and 2 px) or alignment (segment transport) figure.
The plain ("before") generation is cached per prompt / seed / size, so toggling only reruns the
intervened branch. The model is always restored after a run, also when it fails.

Image-conditioned runs (the paper's main setting for CorrAdapter): ``cameras=`` and ``reference=``
``{view: image}`` go to every CorrAdapter before / after generation, so the given views are the
reference images (bit-exact) and the others are generated under those cameras; ``truth=`` (the rendered
views of the same scene) adds PSNR / SSIM of the generated views against them. Segment transport stays
text-only (a pair of prompts): with a reference it is disabled and a run with it raises a CorrlabError.
"""
from __future__ import annotations

import itertools
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Sequence

import ipywidgets as widgets
import numpy as np
import pandas as pd
import torch

from ..errors import CorrlabError, describe
from ..plotting import image_rows_figure, message_figure, metric_comparison_figure
from .common import figure_image, guarded, set_figure, show_message

__all__ = ["InterventionPanel", "epipolar_consistency", "pair_alignment", "count_model_calls"]


# ---------------------------------------------------------------------------- measurements
def epipolar_consistency(images: Any, cameras: Sequence, thresholds: Sequence[float] = (1.0, 2.0),
                         matcher: Callable | None = None, distance: str = "symmetric") -> pd.DataFrame:
    """Multi-view consistency of one set: precision of baseline matches under the conditioning cameras.

    Every view pair ``(i, j), i < j`` is matched with ``matcher`` (default SIFT) and scored by
    :func:`corrlab.evaluation.score_matches` (correct when the epipolar distance is <= the threshold).

    Args:
        images: ``(V, 3, H, W)`` views in [0, 1].
        cameras: ``V`` :class:`~corrlab.geometry.Camera` of the views.

    Returns:
        :func:`~corrlab.evaluation.score_matches`'s table (one row per pair and threshold) plus
        ``metric = "SIFT precision @ {t:g} px"`` and ``value`` (= precision, NaN for a pair without matches).
    """
    from ..evaluation import score_matches

    if matcher is None:
        from ..baselines.sift import match_sift as matcher
    if not hasattr(images, "shape") or len(images.shape) != 4 or cameras is None or len(cameras) != images.shape[0]:
        raise CorrlabError(f"images, cameras: expected (V, 3, H, W) views and V cameras, got {describe(images)} "
                           f"and {describe(cameras)}")
    pairs = {(i, j): matcher(images[i], images[j]) for i, j in itertools.combinations(range(images.shape[0]), 2)}
    table = score_matches(pairs, cameras, thresholds=thresholds, kind=distance, method="sift")
    return table.assign(metric=[f"SIFT precision @ {t:g} px" for t in table["threshold"]], value=table["precision"])


def pair_alignment(images_a: Any, images_b: Any) -> pd.DataFrame:
    """Structural alignment of an endpoint pair, per view (higher = more aligned, both in [-1, 1] / [0, 1]).

    * ``edge correlation``: Pearson correlation of the Sobel gradient magnitudes of the two images
      (structure, independent of colour);
    * ``foreground IoU``: IoU of the pixels that differ from the image's own border colour by more than
      0.1 (a mask proxy for generated objects on a plain background).

    Returns:
        tidy DataFrame ``view, metric, value``.
    """
    import torch.nn.functional as F

    a = torch.as_tensor(np.asarray(images_a, dtype=np.float32))
    b = torch.as_tensor(np.asarray(images_b, dtype=np.float32))
    if a.ndim != 4 or a.shape != b.shape or a.shape[1] != 3:
        raise CorrlabError(f"images_a, images_b: expected two (V, 3, H, W) sets of equal shape, got "
                           f"{describe(images_a)} and {describe(images_b)}")
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])[None, None]

    def edges(x):
        g = x.mean(1, keepdim=True)
        return torch.sqrt(F.conv2d(g, kx, padding=1) ** 2 + F.conv2d(g, kx.transpose(2, 3), padding=1) ** 2)[:, 0]

    def mask(x):
        border = torch.cat([x[:, :, 0, :], x[:, :, -1, :], x[:, :, :, 0], x[:, :, :, -1]], dim=2).median(dim=2).values
        return (x - border[:, :, None, None]).abs().amax(1) > 0.1

    ea, eb, ma, mb = edges(a), edges(b), mask(a), mask(b)
    rows = []
    for v in range(a.shape[0]):
        x, y = ea[v].flatten() - ea[v].mean(), eb[v].flatten() - eb[v].mean()
        den = float(x.norm() * y.norm())
        corr = float((x * y).sum()) / den if den > 0 else float("nan")
        union = int((ma[v] | mb[v]).sum())
        iou = int((ma[v] & mb[v]).sum()) / union if union else float("nan")
        rows += [{"view": v, "metric": "edge correlation", "value": corr},
                 {"view": v, "metric": "foreground IoU", "value": iou}]
    return pd.DataFrame(rows)


@contextmanager
def count_model_calls(model: torch.nn.Module, on_call: Callable[[int], None]):
    """Call ``on_call(n)`` after every forward call of ``model`` (n = calls so far); the hook is removed on exit."""
    count = [0]

    def hook(_module, _inputs, _output):
        count[0] += 1
        on_call(count[0])

    handle = model.register_forward_hook(hook)
    try:
        yield count
    finally:
        handle.remove()


# ---------------------------------------------------------------------------- the panel
PSNR_METRIC = "PSNR vs truth (dB)"
SSIM_METRIC = "SSIM vs truth"


def _check_conditioning(pipeline, num_views: int, size, cameras, reference) -> dict:
    """The ``cameras=`` / ``reference=`` keyword arguments of the panel's generations, validated."""
    from ..geometry import Camera

    out: dict = {}
    if cameras is not None:
        try:
            cameras = list(cameras)
        except TypeError:
            raise CorrlabError(f"cameras: expected a sequence of {num_views} corrlab.geometry.Camera, "
                               f"got {describe(cameras)}") from None
        if len(cameras) != num_views:
            raise CorrlabError(f"cameras: expected num_views = {num_views} cameras, got {len(cameras)}")
        for i, cam in enumerate(cameras):
            if not isinstance(cam, Camera):
                raise CorrlabError(f"cameras[{i}]: expected a corrlab.geometry.Camera, got {describe(cam)}")
        out["cameras"] = cameras
    if reference is None or (isinstance(reference, dict) and not reference):
        return out
    check = getattr(pipeline, "reference_views", None)  # the pipeline's own check (CorrlabPipeline.reference_views)
    if check is None:
        raise CorrlabError(f"reference: this pipeline ({describe(pipeline)}) takes no reference views; use a "
                           "CorrlabPipeline with a MultiViewUNet such as 'corrlab-mvunet-s'")
    check(reference, num_views, size or getattr(pipeline, "sample_size", None))
    if cameras is None:
        raise CorrlabError("cameras: a reference needs the cameras its views were rendered with (e.g. "
                           "render_scene(...).cameras), got None")
    out["reference"] = dict(reference)
    return out


def _check_truth(truth, num_views: int, side) -> torch.Tensor | None:
    if truth is None:
        return None
    if not isinstance(truth, torch.Tensor) or tuple(truth.shape) != (num_views, 3, side, side):
        raise CorrlabError(f"truth: expected the rendered views, a ({num_views}, 3, {side}, {side}) tensor, "
                           f"got {describe(truth)}")
    return truth.float()


class InterventionPanel:
    """Before / after panel for CorrAdapter and segment transport on the embedded model.

    Args:
        pipeline: a :class:`~corrlab.model.CorrlabPipeline`.
        prompt: prompt of the generation (and endpoint A of segment transport).
        prompt_b: endpoint B's prompt for segment transport.
        seed, num_views, num_inference_steps, size, guidance_scale: generation settings (guidance None: the
            pipeline's default ``corrlab.model.DEFAULT_GUIDANCE``).
        corr_adapter: ``(model, **params) -> context manager`` enabling CorrAdapter
            (default :func:`corrlab.interventions.aggregation.corr_adapter`).
        generate_pair: ``(pipeline, prompt_a, prompt_b, *, mode, k, smoothing, seed, num_views,
            num_inference_steps, size, guidance_scale) -> (images_a, images_b)`` (default:
            :func:`corrlab.interventions.pair_generation.generate_pair` with a
            ``LinearDecaySmoothing(w_start=smoothing)`` schedule).
        measure: ``(images, cameras) -> tidy DataFrame(metric, value, ...)`` consistency measure
            (default :func:`epipolar_consistency`).
        cameras: ``num_views`` :class:`~corrlab.geometry.Camera` of the generations (None: the pipeline's
            default cameras for the seed). Used by the CorrAdapter generations.
        reference: ``{view index: image (3, S, S) in [0, 1]}`` (S = ``size`` or the model's sample size):
            image-conditioned CorrAdapter generations (the given views are returned unchanged, the others
            generated under ``cameras``, which are then required: the cameras the reference was rendered
            with). Needs a model that takes reference views (``pipeline.supports_reference``). Segment
            transport is text-only: with a reference its toggle is disabled, and running it raises
            :class:`~corrlab.errors.CorrlabError`.
        reference_guidance: initial value of the "image guidance R" slider (1 = off; see
            :meth:`corrlab.model.CorrlabPipeline.__call__`), which applies to every generation with a reference and
            is disabled without one.
        truth: ``(num_views, 3, S, S)`` rendered views of the same scene, or None: adds a "rendered truth" row
            to the images, ``PSNR vs truth (dB)`` and ``SSIM vs truth`` of the generated (non-reference) views
            to the summary, and the SSIM to the metrics figure.

    Attributes: toggles ``corr_adapter_on, segment_on``; CorrAdapter parameters ``eta, radius,
    active_steps, refresh_every``; image guidance ``reference_guidance``; segment parameters ``prompt_b, k, strength, mode``; ``run_button``,
    ``progress``; figures ``images`` (before / after) and ``metrics``; ``summary`` and ``message``
    (HTML); ``widget``; after a run ``last_result`` (dict of images and the metrics table).
    """

    def __init__(self, pipeline, prompt: str, prompt_b: str | None = None, seed: int = 0, num_views: int = 4,
                 num_inference_steps: int = 10, size: int | None = None, guidance_scale: float | None = None,
                 corr_adapter: Callable | None = None, generate_pair: Callable | None = None,
                 measure: Callable | None = None, cameras: Sequence | None = None, reference: dict | None = None,
                 truth: Any = None, reference_guidance: float = 1.0):
        if not callable(pipeline) or not isinstance(getattr(pipeline, "model", None), torch.nn.Module):
            raise CorrlabError(f"pipeline: expected a CorrlabPipeline (callable with a .model), got {describe(pipeline)}")
        self.pipeline = pipeline
        if guidance_scale is None:
            from ..model.pipeline import DEFAULT_GUIDANCE as guidance_scale
        self.settings = dict(seed=int(seed), num_views=int(num_views), num_inference_steps=int(num_inference_steps),
                             size=size, guidance_scale=float(guidance_scale))
        self.conditioning = _check_conditioning(pipeline, int(num_views), size, cameras, reference)
        self.given_views = sorted(self.conditioning.get("reference", {}))
        from ..model.pipeline import check_reference_guidance

        check_reference_guidance(reference_guidance, bool(self.given_views))
        self.truth = _check_truth(truth, int(num_views), size or getattr(pipeline, "sample_size", None))
        self._corr_adapter = corr_adapter
        self._generate_pair = generate_pair
        self.measure = measure or epipolar_consistency
        self.last_error = None
        self.last_result: dict | None = None
        self._before_cache: dict = {}

        from ..interventions.aggregation import CorrAdapterConfig

        defaults = CorrAdapterConfig()
        style = {"description_width": "150px"}
        n = int(num_inference_steps)
        self.prompt = widgets.Text(value=prompt, description="prompt", style=style)
        self.reference_guidance = widgets.FloatSlider(
            value=float(reference_guidance), min=0.0, max=max(5.0, float(reference_guidance)), step=0.5,
            description="image guidance R", style=style, continuous_update=False, disabled=not self.given_views,
            tooltip="1 = off; > 1 pushes the generated views away from the model's reference-free prediction")
        self.corr_adapter_on = widgets.Checkbox(value=False, description="CorrAdapter", indent=False)
        self.eta = widgets.FloatSlider(value=defaults.eta, min=0.0, max=1.0, step=0.05, description="eta (1 = adapter off)",
                                       style=style, continuous_update=False)
        self.radius = widgets.IntSlider(value=defaults.radius, min=0, max=7, description="window radius r", style=style,
                                        continuous_update=False)
        self.active_steps = widgets.IntSlider(value=0, min=0, max=n, description="active steps (0: all)",
                                              style=style, continuous_update=False)
        self.refresh_every = widgets.IntSlider(value=5, min=1, max=max(1, n), description="refresh every",
                                         style=style, continuous_update=False)
        self.segment_on = widgets.Checkbox(value=False, description="segment transport", indent=False,
                                           disabled=bool(self.given_views),
                                           tooltip="text-only: not available with reference views" if self.given_views else "")
        self.prompt_b = widgets.Text(value=prompt_b or prompt, description="prompt B", style=style)
        self.k = widgets.IntSlider(value=5, min=2, max=9, description="k (segment points)", style=style,
                                   continuous_update=False)
        self.strength = widgets.FloatSlider(value=0.7, min=0.0, max=1.0, step=0.05, description="smoothing w at start",
                                            style=style, continuous_update=False)
        self.mode = widgets.Dropdown(options=["full", "anchor-mean", "endpoints", "hard-cut", "independent"],
                                     value="full", description="mode", style=style)
        self.run_button = widgets.Button(description="Run", button_style="primary", icon="play",
                                         tooltip="regenerate with these settings")
        self.progress = widgets.IntProgress(value=0, min=0, max=1, description="", bar_style="info")
        self.images = figure_image("before-after")
        self.metrics = figure_image("metrics")
        self.summary = widgets.HTML()
        self.message = widgets.HTML()
        self.run_button.on_click(lambda _b: self.run())
        for w in (self.corr_adapter_on, self.segment_on):
            w.observe(self._on_toggle, names="value")
        self._on_toggle(None)
        adapter_box = widgets.VBox([self.corr_adapter_on, self.eta, self.radius, self.active_steps, self.refresh_every])
        segment_box = widgets.VBox([self.segment_on, self.prompt_b, self.k, self.strength, self.mode])
        setting = (f"image-conditioned: view(s) {self.given_views} given, the others generated"
                   if self.given_views else "text-to-multi-view")
        self.widget = widgets.VBox([
            widgets.HTML("<b>Intervention panel</b>: toggle an intervention, press Run, compare before / after "
                         f"<i>({setting}; segment transport is text-only)</i>"),
            widgets.HBox([self.prompt, self.reference_guidance]), widgets.HBox([adapter_box, segment_box]),
            widgets.HBox([self.run_button, self.progress]), self.message, self.summary,
            self.images, self.metrics,
        ])
        self.widget.add_class("corrlab-intervention")
        set_figure(self.images, message_figure("press Run to generate"))
        set_figure(self.metrics, message_figure("metrics appear after a run"))

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def _on_toggle(self, _change) -> None:
        for w in (self.eta, self.radius, self.active_steps, self.refresh_every):
            w.disabled = not self.corr_adapter_on.value
        for w in (self.prompt_b, self.k, self.strength, self.mode):
            w.disabled = not self.segment_on.value

    # ------------------------------------------------------------------ settings
    def adapter_params(self) -> dict:
        """CorrAdapter keyword arguments from the controls (``active_steps`` None = all steps)."""
        return dict(eta=float(self.eta.value), window_radius=int(self.radius.value),
                    active_steps=int(self.active_steps.value) or None, refresh_every=int(self.refresh_every.value))

    def _adapter_context(self):
        if not self.corr_adapter_on.value:
            return nullcontext()
        factory = self._corr_adapter
        if factory is None:
            try:
                from ..interventions.aggregation import corr_adapter as factory
            except ImportError as e:
                raise CorrlabError(f"corr_adapter: CorrAdapter is not available in this corrlab ({e})") from None
        return factory(self.pipeline.model, **self.adapter_params())

    def _pair(self, mode: str):
        """``(images_a, images_b)`` of a segment-transport pair in ``mode`` with the current settings."""
        s = self.settings
        if self._generate_pair is not None:
            return self._generate_pair(self.pipeline, self.prompt.value, self.prompt_b.value, mode=mode,
                                       k=int(self.k.value), smoothing=float(self.strength.value), seed=s["seed"],
                                       num_views=s["num_views"], num_inference_steps=s["num_inference_steps"],
                                       size=s["size"], guidance_scale=s["guidance_scale"])
        try:
            from ..interventions import SegmentTransportConfig
            from ..interventions.schedules import LinearDecaySmoothing
            from ..interventions.pair_generation import SamplingOptions, generate_pair
        except ImportError as e:
            raise CorrlabError(f"segment transport for the embedded model is not available ({e})") from None
        config = SegmentTransportConfig(mode=mode, k=int(self.k.value),
                                        smoothing_schedule=LinearDecaySmoothing(w_start=float(self.strength.value)))
        sampling = SamplingOptions(num_views=s["num_views"], num_inference_steps=s["num_inference_steps"],
                                   guidance_scale=s["guidance_scale"], size=s["size"])
        pair = generate_pair(self.pipeline, self.prompt.value, self.prompt_b.value, s["seed"], sampling=sampling,
                             transport=config, progress=False)
        return pair.set_a.images, pair.set_b.images

    def _reference_guidance(self) -> float | None:
        """The image guidance slider's value with reference views, else None (not applicable)."""
        return float(self.reference_guidance.value) if self.given_views else None

    def _generate(self, prompt: str):
        s = self.settings
        extra = {}
        r = self._reference_guidance()
        if r is not None and r != 1.0:
            extra["reference_guidance"] = r
        return self.pipeline(prompt, num_views=s["num_views"], num_inference_steps=s["num_inference_steps"],
                             guidance_scale=s["guidance_scale"], seed=s["seed"], size=s["size"], progress=False,
                             **self.conditioning, **extra)

    # ------------------------------------------------------------------ run
    @guarded
    def run(self) -> dict | None:
        """Generate before / after with the current settings and update the figures. Returns ``last_result``."""
        show_message(self.message, "")
        prompt = self.prompt.value.strip()
        if not prompt:
            raise CorrlabError("prompt: expected a non-empty prompt, got ''")
        segment = bool(self.segment_on.value)
        if segment and self.given_views:
            raise CorrlabError(f"segment_on: segment transport is text-only (a pair of prompts), but this panel has "
                               f"reference views {self.given_views}; make a panel without reference= for it")
        steps = self.settings["num_inference_steps"]
        key = (prompt, segment, self.prompt_b.value if segment else None, self._reference_guidance())
        # generations to run: the cached "before" (once per key) and the intervened one (a plain run without
        # any intervention is the "before" itself: the sampler is deterministic in the seed)
        n_runs = (key not in self._before_cache) + (segment or bool(self.corr_adapter_on.value))
        self.progress.value, self.progress.max, self.progress.bar_style = 0, max(1, steps * n_runs), "info"
        self.run_button.disabled = True

        def tick(n):
            self.progress.value = min(self.progress.max, n)

        try:
            with count_model_calls(self.pipeline.model, tick), torch.no_grad():
                if segment:
                    result = self._run_segment(key)
                else:
                    result = self._run_plain(key, prompt)
            self.progress.value = self.progress.max
            self.progress.bar_style = "success"
        except BaseException:
            self.progress.bar_style = "danger"
            raise
        finally:
            self.run_button.disabled = False
        self.last_result = result
        return result

    def _label(self) -> str:
        if not self.corr_adapter_on.value:
            return "after (no intervention)"
        p = self.adapter_params()
        return f"CorrAdapter eta={p['eta']:g} r={p['window_radius']}"

    def _run_plain(self, key, prompt: str) -> dict:
        if key not in self._before_cache:
            self._before_cache[key] = self._generate(prompt)
        before = self._before_cache[key]
        if self.corr_adapter_on.value:
            with self._adapter_context():
                after = self._generate(prompt)
        else:
            after = before
        label = self._label()
        rows = {"plain": before.images, label: after.images}
        if self.truth is not None:
            rows["rendered truth"] = self.truth
        set_figure(self.images, image_rows_figure(rows))
        table = pd.concat([self.measure(before.images, before.cameras).assign(condition="plain"),
                           self.measure(after.images, after.cameras).assign(condition=label)], ignore_index=True)
        if self.truth is not None:
            table = pd.concat([table, self._against_truth(before.images).assign(condition="plain"),
                               self._against_truth(after.images).assign(condition=label)], ignore_index=True)
        shown = table[table["metric"] != PSNR_METRIC]  # dB: not on the [0, 1] axis of the others (in the summary)
        title = "multi-view consistency under the conditioning cameras (mean over view pairs)"
        if self.truth is not None:
            title = "consistency (mean over view pairs) and SSIM of the generated views vs the truth"
        set_figure(self.metrics, metric_comparison_figure(shown, title=title))
        means = table.groupby(["condition", "metric"], sort=False)["value"].mean().unstack()
        self.summary.value = means.to_html(float_format="{:.3f}".format, na_rep="n/a")
        if not self.corr_adapter_on.value:
            show_message(self.message, "no intervention enabled: after = before", "info")
        return {"before": before.images, "after": after.images, "cameras": before.cameras, "metrics": table,
                "given_views": list(self.given_views)}

    def _against_truth(self, images) -> pd.DataFrame:
        """Tidy ``view, metric, value``: PSNR (dB) and SSIM of each generated view against ``truth``."""
        from ..model.conditioned import psnr, ssim

        rows = []
        for v in range(images.shape[0]):
            if v in self.given_views:
                continue  # a given view is the reference itself
            rows += [{"view": v, "metric": PSNR_METRIC, "value": psnr(images[v], self.truth[v])},
                     {"view": v, "metric": SSIM_METRIC, "value": ssim(images[v], self.truth[v])}]
        return pd.DataFrame(rows, columns=["view", "metric", "value"])

    def _run_segment(self, key) -> dict:
        if key not in self._before_cache:
            self._before_cache[key] = self._pair("independent")
        ia, ib = self._before_cache[key]
        mode = self.mode.value
        with self._adapter_context():
            a, b = self._pair(mode)
        suffix = " + CorrAdapter" if self.corr_adapter_on.value else ""
        set_figure(self.images, image_rows_figure({
            "A independent": ia, "B independent": ib, f"A {mode}{suffix}": a, f"B {mode}{suffix}": b}))
        table = pd.concat([pair_alignment(ia, ib).assign(condition="independent"),
                           pair_alignment(a, b).assign(condition=f"{mode}{suffix}")], ignore_index=True)
        set_figure(self.metrics, metric_comparison_figure(table, title="structural alignment of A and B (per view)"))
        means = table.groupby(["condition", "metric"], sort=False)["value"].mean().unstack()
        self.summary.value = means.to_html(float_format="{:.3f}".format, na_rep="n/a")
        return {"before": (ia, ib), "after": (a, b), "metrics": table}
