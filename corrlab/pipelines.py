"""Real diffusers pipelines: load one from a folder or the local Hugging Face cache, never from the network.

>>> pipe = corrlab.load_pipeline("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")      # doctest: +SKIP
>>> pipe = corrlab.load_pipeline("tiny/wan")                               # doctest: +SKIP

Supported pipeline classes (:data:`SUPPORTED_PIPELINES`) and how corrlab sees their images:

* ``WanPipeline``: a video transformer; the latent frames are the images (frames x patches in one
  sequence). Probe, CorrAdapter and segment transport (:class:`~corrlab.interventions.WanVelocity`).
* ``FluxPipeline``: a single-image transformer; the images of a batch attend to each other under
  :func:`~corrlab.probing.extended_attention.extended_attention` (text tokens stay per image). Segment
  transport through :class:`~corrlab.interventions.FluxVelocity`.
* ``StableDiffusionPipeline``: a single-image UNet, made multi-image the same way.
* :class:`MultiViewUNetPipeline`: corrlab's multi-view UNet pipeline, a ``StableDiffusionPipeline`` whose
  UNet self-attention layers run :class:`~corrlab.probing.extended_attention.MultiViewAttnProcessor`
  (MVDream / MV-Adapter style: the ``num_views`` images of a prompt are consecutive batch entries).

Any other pipeline class raises :class:`UnsupportedPipelineError`, which names these and the extension
point for custom attention modules.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .errors import CorrlabError, WeightsNotFoundError, describe

__all__ = [
    "SUPPORTED_PIPELINES",
    "UnsupportedPipelineError",
    "MultiViewUNetPipeline",
    "load_pipeline",
    "pipeline_class_name",
    "pipeline_kind",
    "check_supported",
]

#: pipeline class name -> kind ("video": frames in one sequence; "extended": single-image model made
#: multi-image with extended attention; "multiview": views as batch entries with a multi-view processor)
SUPPORTED_PIPELINES: dict[str, str] = {
    "WanPipeline": "video",
    "FluxPipeline": "extended",
    "StableDiffusionPipeline": "extended",
    "MultiViewUNetPipeline": "multiview",
}

EXTENSION_POINT = (
    "corrlab.probing extension point for custom attention modules (see docs/architecture.md): register the "
    "denoiser family so corrlab can find its multi-image attention layers and their token layout"
)


class UnsupportedPipelineError(CorrlabError):
    """A diffusers pipeline (or model) of a type corrlab cannot probe."""


def _unsupported(what: str) -> UnsupportedPipelineError:
    return UnsupportedPipelineError(
        f"{what} is not a supported pipeline type; supported: {sorted(SUPPORTED_PIPELINES)} (and corrlab's own "
        f"CorrlabPipeline). For another model, use the {EXTENSION_POINT}."
    )


def pipeline_class_name(pipe: Any) -> str:
    return type(pipe).__name__


def check_supported(pipe: Any) -> str:
    """The kind of a loaded pipeline (see :data:`SUPPORTED_PIPELINES`), or :class:`UnsupportedPipelineError`."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in SUPPORTED_PIPELINES:
            return SUPPORTED_PIPELINES[cls.__name__]
    raise _unsupported(f"pipe: {type(pipe).__name__}")


pipeline_kind = check_supported


# ------------------------------------------------------------------------------ multi-view UNet
def _multiview_base():
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline


class MultiViewUNetPipeline(_multiview_base()):
    """A ``StableDiffusionPipeline`` generating ``num_views`` mutually attending views per prompt.

    Every ``attn1`` (self-attention) layer of the UNet runs a
    :class:`~corrlab.probing.extended_attention.MultiViewAttnProcessor`: hidden states ``(B*V, h*w, C)``,
    the V consecutive batch entries of a prompt attend jointly. ``num_views`` is part of the pipeline's
    config (saved in ``model_index.json``), so ``save_pretrained`` / ``from_pretrained`` round-trip it.
    ``__call__`` takes the ordinary ``StableDiffusionPipeline`` arguments; ``num_images_per_prompt``
    defaults to (and must be a multiple of) ``num_views``.
    """

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None, feature_extractor=None,
                 image_encoder=None, requires_safety_checker: bool = False, num_views: int = 4):
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor,
                         image_encoder, requires_safety_checker=requires_safety_checker)
        from .probing.extended_attention import multiview_attention_processors

        self.register_to_config(num_views=int(num_views))
        self.unet.set_attn_processor(multiview_attention_processors(self.unet, int(num_views)))

    @property
    def num_views(self) -> int:
        return int(self.config.num_views)

    def __call__(self, *args, num_images_per_prompt: int | None = None, **kwargs):
        n = self.num_views if num_images_per_prompt is None else num_images_per_prompt
        if not isinstance(n, int) or n < 1 or n % self.num_views:
            raise CorrlabError(
                f"num_images_per_prompt: expected a positive multiple of num_views = {self.num_views}, got {n!r}"
            )
        return super().__call__(*args, num_images_per_prompt=n, **kwargs)


# ------------------------------------------------------------------------------ loading
def _pipeline_class(name: str):
    if name == "MultiViewUNetPipeline":
        return MultiViewUNetPipeline
    import diffusers

    return getattr(diffusers, name)


def _local_folder(path_or_hub_id: str) -> Path | None:
    p = Path(path_or_hub_id).expanduser()
    if p.is_dir():
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path_or_hub_id), local_files_only=True))
    except Exception:  # not in the cache (LocalEntryNotFoundError), or not a valid id
        return None


def load_pipeline(path_or_hub_id: str | os.PathLike, *, torch_dtype: torch.dtype | None = None,
                  device: str | torch.device | None = None, **kwargs: Any):
    """A supported diffusers pipeline from a local folder, or from the local Hugging Face cache by hub id.

    Never downloads (``local_files_only=True``). The class comes from the folder's ``model_index.json``
    (``_class_name``); it must be one of :data:`SUPPORTED_PIPELINES`.

    Args:
        path_or_hub_id: a folder written by ``save_pretrained`` (e.g. by ``scripts/make_tiny_pipelines.py``),
            or a hub id such as ``"Wan-AI/Wan2.1-T2V-1.3B-Diffusers"`` already in the local cache.
        torch_dtype: dtype of the weights (default: as saved).
        device: move the pipeline there after loading (default: stay on the CPU).
        **kwargs: passed to the class's ``from_pretrained``.

    Raises:
        WeightsNotFoundError: nothing local for that path or id (with the command that fetches it).
        UnsupportedPipelineError: the pipeline class is not supported.
        FormatError-like CorrlabError: ``model_index.json`` missing or unreadable.
    """
    if not isinstance(path_or_hub_id, (str, os.PathLike)) or not str(path_or_hub_id):
        raise CorrlabError(f"path_or_hub_id: expected a folder or a Hugging Face model id, got {describe(path_or_hub_id)}")
    name = str(path_or_hub_id)
    folder = _local_folder(name)
    if folder is None:
        raise WeightsNotFoundError(
            f"path_or_hub_id: {name!r} is neither a local folder nor in the local Hugging Face cache, and corrlab "
            f"never downloads weights. On a machine with network access run\n"
            f"    hf download {name} --local-dir <DIR>\n"
            f"(pip install 'huggingface_hub[cli]'), then pass that folder; or build tiny test pipelines with "
            f"`python scripts/make_tiny_pipelines.py --out DIR`."
        )
    index = folder / "model_index.json"
    if not index.is_file():
        raise CorrlabError(
            f"path_or_hub_id: {str(folder)!r} holds no model_index.json, so it is not a diffusers pipeline folder "
            f"(expected one written by DiffusionPipeline.save_pretrained)"
        )
    try:
        class_name = json.loads(index.read_text())["_class_name"]
    except (ValueError, KeyError, TypeError) as e:
        raise CorrlabError(f"path_or_hub_id: {str(index)!r} is not a readable model_index.json ({e!r})") from None
    if class_name not in SUPPORTED_PIPELINES:
        raise _unsupported(f"path_or_hub_id: {name!r} holds a {class_name}, which")
    cls = _pipeline_class(class_name)
    options = dict(local_files_only=True, **kwargs)
    if torch_dtype is not None:
        options["torch_dtype"] = torch_dtype
    pipe = cls.from_pretrained(str(folder), **options)
    if device is not None:
        pipe = pipe.to(device)
    return pipe
