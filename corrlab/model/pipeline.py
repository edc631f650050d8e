"""``CorrlabPipeline``: sample multi-view sets from :class:`MultiViewDiT` with a flow-matching Euler scheduler.

Rectified flow: ``x_t = (1 - t) x_0 + t eps`` with the model predicting ``v = eps - x_0``; the sampler
integrates from ``t = 1`` (noise) to ``t = 0`` with diffusers' ``FlowMatchEulerDiscreteScheduler``
(its sigma is corrlab's ``t``; a step is ``x <- x + (t_next - t) v``). Classifier-free guidance runs
inside :meth:`CorrlabPipeline.velocity` as one batched model call. Images are [0, 1] outside and
[-1, 1] inside the model.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tqdm.auto import tqdm

from ..errors import (
    CorrlabError, ShapeError, ValueRangeError, WeightsNotFoundError, check_shape, describe, is_nonnegative_number,
)
from ..geometry import Camera
from .dit import MultiViewDiT
from .rays import plucker_ray_embeds
from .unet import MultiViewUNet

#: The denoisers a :class:`CorrlabPipeline` can drive, by config ``_class_name``.
MODEL_CLASSES = {"MultiViewDiT": MultiViewDiT, "MultiViewUNet": MultiViewUNet}

__all__ = ["CorrlabPipeline", "default_scheduler", "DEFAULT_STEPS", "DEFAULT_GUIDANCE"]

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 3.0


def check_guidance_scale(guidance_scale) -> None:
    """The one check of a text (classifier-free) guidance value: a finite number >= 0, not a bool
    (:class:`ValueRangeError` naming ``guidance_scale`` otherwise)."""
    if not is_nonnegative_number(guidance_scale):
        raise ValueRangeError(f"guidance_scale: expected a finite number >= 0, got {guidance_scale!r}")


def check_reference_guidance(reference_guidance, has_reference: bool) -> None:
    """The one check of an image guidance value: a finite number >= 0 (:class:`ValueRangeError`), and a value other
    than 1 (off) only with reference views (:class:`CorrlabError`). Used by the pipeline and the panels."""
    if not is_nonnegative_number(reference_guidance):
        raise ValueRangeError(f"reference_guidance: expected a number >= 0, got {reference_guidance!r}")
    if reference_guidance != 1.0 and not has_reference:
        raise CorrlabError(f"reference_guidance: {reference_guidance!r} needs reference views, got none")


def default_scheduler(shift: float = 1.0) -> FlowMatchEulerDiscreteScheduler:
    """The Euler flow-matching scheduler the embedded model samples with (sigma = corrlab's t)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


class CorrlabPipeline:
    """Text (+ optional reference views) + cameras -> multi-view set, with corrlab's :class:`MultiViewDiT`
    or :class:`MultiViewUNet` and a flow-matching scheduler.

    Attributes: ``model`` (also ``transformer``), ``scheduler``.
    """

    corrlab_embedded = True  # corrlab's own model: CFG batched [cond, uncond] (see probing.attention_cache)

    def __init__(self, model: MultiViewDiT | MultiViewUNet, scheduler: FlowMatchEulerDiscreteScheduler | None = None):
        if not isinstance(model, (MultiViewDiT, MultiViewUNet)):
            raise CorrlabError(f"model: expected a corrlab MultiViewDiT or MultiViewUNet, got {describe(model)}")
        self.model = model
        self.scheduler = scheduler if scheduler is not None else default_scheduler()
        self._output_observers: list = []

    @contextmanager
    def observe_outputs(self, fn) -> Iterator[None]:
        """Inside the ``with``, ``fn(result)`` sees what every :meth:`__call__` returns (a ``MultiViewSet`` or a
        list of them) before the caller does; removed on exit, also on exceptions. The probe records the
        generated set's prompt, seed and cameras this way."""
        self._output_observers.append(fn)
        try:
            yield
        finally:
            self._output_observers.remove(fn)

    # ------------------------------------------------------------------ basics
    @property
    def transformer(self) -> MultiViewDiT | MultiViewUNet:
        """Alias of :attr:`model` (the diffusers pipelines' name for the denoiser)."""
        return self.model

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def sample_size(self) -> int:
        return int(self.model.config.sample_size)

    @property
    def supports_reference(self) -> bool:
        """Whether the model takes clean reference views (``reference=`` of :meth:`__call__`)."""
        return isinstance(self.model, MultiViewUNet) or bool(getattr(self.model.config, "reference_conditioning", False))

    def to(self, device) -> "CorrlabPipeline":
        self.model.to(device)
        return self

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "CorrlabPipeline":
        """Load ``path/model`` (safetensors) and ``path/scheduler``; also accepts a bare model folder."""
        path = Path(path)
        if (path / "model").is_dir():
            model_dir, sched_dir = path / "model", path / "scheduler"
        elif (path / "config.json").is_file():
            model_dir, sched_dir = path, path / "scheduler"
        else:
            raise WeightsNotFoundError(
                f"path: expected a folder with model/ (and scheduler/) written by CorrlabPipeline.save_pretrained, "
                f"got {str(path)!r}; train weights with `corrlab train --config FILE --out runs/NAME`"
            )
        import json

        class_name = json.loads((model_dir / "config.json").read_text()).get("_class_name", "MultiViewDiT")
        if class_name not in MODEL_CLASSES:
            raise CorrlabError(
                f"path: {str(model_dir)!r} holds a {class_name!r}; expected one of {sorted(MODEL_CLASSES)}"
            )
        model = MODEL_CLASSES[class_name].from_pretrained(model_dir, use_safetensors=True, low_cpu_mem_usage=False)
        model.eval()
        scheduler = (
            FlowMatchEulerDiscreteScheduler.from_pretrained(sched_dir) if sched_dir.is_dir() else default_scheduler()
        )
        return cls(model, scheduler)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``path/model`` (config.json + safetensors) and ``path/scheduler``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path / "model", safe_serialization=True)
        self.scheduler.save_pretrained(path / "scheduler")

    # ------------------------------------------------------------------ conditioning
    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """``B`` prompts -> ``(B, D)`` pooled word embeddings (linear in them)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        return self.model.encode_prompt(list(prompts))

    def ray_embeds(self, cameras: Sequence[Camera], size: int | None = None) -> torch.Tensor:
        """``V`` cameras -> ``(V, 6, h, w)`` Plücker embeddings of the token centre rays."""
        cfg = self.model.config
        return plucker_ray_embeds(
            list(cameras), size or cfg.sample_size, cfg.patch_size, cfg.scene_scale
        ).to(self.device)

    def velocity(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        prompt_embeds: torch.Tensor,
        ray_embeds: torch.Tensor,
        guidance_scale: float = DEFAULT_GUIDANCE,
        given: torch.Tensor | None = None,
        reference_guidance: float = 1.0,
        reference_noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Guided velocity: ``x (B, V, 3, H, W)``, ``t (B,)`` or float, ``prompt_embeds (B, D)``,
        ``ray_embeds (B, V, 6, h, w)``, ``given (B, V)`` bool reference views (or None) -> ``(B, V, 3, H, W)``.

        One batched model call, branches stacked ``[cond, text-null, reference-null]`` (those needed):
        ``v = v_cond + (g - 1) (v_cond - v_text_null) + (r - 1) (v_cond - v_ref_null)`` with ``g`` =
        ``guidance_scale`` (the null prompt, references kept) and ``r`` = ``reference_guidance`` (the prompt
        kept, no view given: the given views enter as ``(1 - t) x + t reference_noise``, a generated view at
        level ``t``, so the model sees no clean reference). ``g = r = 1``: the conditional prediction alone;
        ``r = 1``: ``v_null + g (v_cond - v_null)``. ``r != 1`` needs ``given`` and ``reference_noise``
        ``(B, V, 3, H, W)``.
        """
        if x.ndim != 5:
            raise CorrlabError(f"x: expected shape (B, V, 3, H, W), got {describe(x)}")
        B = x.shape[0]
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        if t.ndim == 0:
            t = t.expand(B)
        check_shape("t", t, (B,), expected=f"({B},) or a float")
        check_guidance_scale(guidance_scale)
        check_reference_guidance(reference_guidance, given is not None)
        ref_null = reference_guidance != 1.0
        if ref_null:
            check_shape("reference_noise", reference_noise, tuple(x.shape), expected=f"{tuple(x.shape)} (like x)")
        text_null = guidance_scale != 1.0
        kw = {} if given is None else {"given": given}
        if not (text_null or ref_null):
            return self.model(x, t, prompt_embeds, ray_embeds, **kw)
        xs, prompts, givens = [x], [prompt_embeds], [given]
        if text_null:
            xs.append(x)
            prompts.append(self.model.null_prompt_embeds(B).to(prompt_embeds))
            givens.append(given)
        if ref_null:
            g5 = given[:, :, None, None, None]
            tb = t.to(x.dtype)[:, None, None, None, None]
            xs.append(torch.where(g5, (1.0 - tb) * x + tb * reference_noise.to(x), x))
            prompts.append(prompt_embeds)
            givens.append(torch.zeros_like(given))
        n = len(xs)
        if given is not None:
            kw = {"given": torch.cat(givens)}
        v = self.model(torch.cat(xs), torch.cat([t] * n), torch.cat(prompts), torch.cat([ray_embeds] * n), **kw)
        parts = v.chunk(n)
        v_cond, out, k = parts[0], parts[0], 1
        if text_null:  # written v_null + g (v_cond - v_null), as in every earlier release (bit-identical outputs)
            out = parts[k] + guidance_scale * (v_cond - parts[k])
            k += 1
        if ref_null:
            out = out + (reference_guidance - 1.0) * (v_cond - parts[k])
        return out

    # ------------------------------------------------------------------ sampling
    def timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """``(S + 1,)`` values of t from 1 to 0 that the sampler visits (the scheduler's sigmas)."""
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueRangeError(f"num_inference_steps: expected an int >= 1, got {num_inference_steps!r}")
        self.scheduler.set_timesteps(num_inference_steps, device="cpu")
        return self.scheduler.sigmas.to(torch.float32).clone()

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        cameras: Sequence[Camera] | None = None,
        num_views: int = 4,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE,
        seed: int = 0,
        generator: torch.Generator | None = None,
        progress: bool = True,
        size: int | None = None,
        reference: dict | None = None,
        reference_guidance: float = 1.0,
    ):
        """Generate one set per prompt: a ``MultiViewSet`` (or a list of them for a list of prompts).

        ``reference`` ``{view index: image (3, H, W) in [0, 1]}`` gives those views as clean references
        (image-conditioned generation): they enter the model clean, flagged as given, are kept fixed, and are
        returned unchanged; the other views are generated. ``meta["given_views"]`` lists them.
        ``reference_guidance`` ``r`` (image guidance, as in Zero123): ``r > 1`` pushes the generated views
        further from what the model predicts without any reference, ``v_cond + (r - 1) (v_cond - v_ref_null)``
        (see :meth:`velocity`); 1 (default) = off. The reference-null branch's noise for the given views is
        drawn from the generator after the initial noise, so ``r = 1`` draws exactly what earlier releases drew.

        ``cameras`` None -> ``corrlab.scenes.sample_cameras(seed, num_views, size, layout="train")``
        (the same cameras for every prompt of the call). The initial noise comes from ``generator`` when
        given, else from ``torch.Generator().manual_seed(seed)``; the same seed gives bit-identical
        images on the CPU.
        """
        from ..sets import MultiViewSet

        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        if not prompts:
            raise CorrlabError("prompt: expected a string or a non-empty list of strings, got an empty list")
        size = size or self.sample_size
        if cameras is None:
            from ..scenes import sample_cameras

            cameras = sample_cameras(seed, num_views, size, layout="train")
        cameras = list(cameras)
        for i, cam in enumerate(cameras):
            if not isinstance(cam, Camera):
                raise CorrlabError(f"cameras[{i}]: expected a corrlab.geometry.Camera, got {describe(cam)}")
        B, V = len(prompts), len(cameras)
        given, ref = self.reference_views(reference, V, size)
        check_guidance_scale(guidance_scale)
        check_reference_guidance(reference_guidance, given is not None)
        if generator is None:
            generator = torch.Generator().manual_seed(int(seed))
        prompt_embeds = self.encode_prompt(prompts)
        rays = self.ray_embeds(cameras, size)[None].expand(B, -1, -1, -1, -1)
        x = torch.randn((B, V, 3, size, size), generator=generator, dtype=torch.float32).to(self.device)
        ref_noise = None
        if reference_guidance != 1.0:
            ref_noise = torch.randn((B, V, 3, size, size), generator=generator, dtype=torch.float32).to(self.device)
        given_b = None
        if given is not None:
            given_b = given[None].expand(B, -1).to(self.device)
            ref = ref.to(self.device)
            x = torch.where(given_b[:, :, None, None, None], ref[None] * 2.0 - 1.0, x)
        ts = self.timesteps(num_inference_steps)
        was_training = self.model.training
        self.model.eval()
        try:
            for i in tqdm(range(num_inference_steps), desc="sampling", disable=not progress, leave=False):
                v = self.velocity(x, float(ts[i]), prompt_embeds, rays, guidance_scale, given=given_b,
                                  reference_guidance=reference_guidance, reference_noise=ref_noise)
                if given_b is not None:
                    v = v.masked_fill(given_b[:, :, None, None, None], 0.0)  # references stay clean
                x = x + (float(ts[i + 1]) - float(ts[i])) * v
        finally:
            self.model.train(was_training)
        images = ((x.float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)
        if given is not None:
            images[:, given] = ref[given].cpu()  # bit-exact copies of the given images
        meta = {"num_inference_steps": num_inference_steps, "guidance_scale": float(guidance_scale), "generated": True}
        if reference_guidance != 1.0:
            meta["reference_guidance"] = float(reference_guidance)
        if given is not None:
            meta["given_views"] = [int(v) for v in torch.nonzero(given).flatten()]
        result = self._sets(images, cameras, prompts, seed, meta, single)
        for fn in tuple(self._output_observers):
            fn(result)
        return result

    def reference_views(self, reference, views: int, size: int):
        """Validate ``reference`` ``{view index: image (3, size, size) in [0, 1]}`` for ``views`` views ->
        ``(given (V,) bool, images (V, 3, S, S))``, or ``(None, None)`` for None / ``{}``. The one check of a
        reference, used by ``__call__`` and by the panels that pass one on."""
        if reference is None or (isinstance(reference, dict) and not reference):
            return None, None
        if not isinstance(reference, dict):
            raise CorrlabError(f"reference: expected a dict {{view index: image (3, H, W)}}, got {describe(reference)}")
        if not self.supports_reference:
            raise CorrlabError(
                f"reference: this pipeline's model ({type(self.model).__name__}) was not trained with reference views "
                "(pipeline.supports_reference is False); use a MultiViewUNet such as 'corrlab-mvunet-s' or a "
                "reference-conditioned model, or leave reference out for text-to-multi-view"
            )
        given = torch.zeros(views, dtype=torch.bool)
        ref = torch.zeros(views, 3, size, size, dtype=torch.float32)
        for v, img in reference.items():
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < views:
                raise CorrlabError(f"reference: expected view indices in [0, {views}), got key {v!r}")
            img = torch.as_tensor(img, dtype=torch.float32)
            if tuple(img.shape) != (3, size, size):
                raise ShapeError(f"reference[{v}]: expected a (3, {size}, {size}) tensor in [0, 1], got {describe(img)}")
            if not bool(torch.isfinite(img).all()) or float(img.min()) < 0 or float(img.max()) > 1:
                raise ValueRangeError(f"reference[{v}]: expected finite values in [0, 1], got [{float(img.min())}, {float(img.max())}]")
            given[v] = True
            ref[v] = img
        if bool(given.all()):
            raise CorrlabError(f"reference: every one of the {views} views is given; leave at least one to generate")
        return given, ref

    @staticmethod
    def _sets(images, cameras, prompts, seed, meta, single):
        from ..sets import MultiViewSet

        B = images.shape[0]
        sets = [
            MultiViewSet(images=images[b], cameras=cameras, prompt=prompts[b], seed=int(seed), meta=dict(meta))
            for b in range(B)
        ]
        return sets[0] if single else sets
