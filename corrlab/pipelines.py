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

import numpy as np
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


def __getattr__(name: str) -> Any:
    # MultiViewUNetPipeline subclasses diffusers' StableDiffusionPipeline: imported on first use only, so the
    # CLI's pipeline check stays light.
    if name == "MultiViewUNetPipeline":
        from .multiview_unet import MultiViewUNetPipeline

        return MultiViewUNetPipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------ loading
def _pipeline_class(name: str):
    if name == "MultiViewUNetPipeline":
        from .multiview_unet import MultiViewUNetPipeline

        return MultiViewUNetPipeline
    import diffusers

    return getattr(diffusers, name)


def _local_folder(path_or_hub_id: str, cache_dir: Any = None) -> Path | None:
    p = Path(path_or_hub_id).expanduser()
    if p.is_dir():
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path_or_hub_id), local_files_only=True, cache_dir=cache_dir))
    except Exception:  # not in the cache (LocalEntryNotFoundError), or not a valid id
        return None


def load_pipeline(path_or_hub_id: str | os.PathLike, *, torch_dtype: torch.dtype | None = None,
                  device: str | torch.device | None = None, cache_dir: str | os.PathLike | None = None, **kwargs: Any):
    """A supported diffusers pipeline from a local folder, or from the local Hugging Face cache by hub id.

    Never downloads (``local_files_only=True``). The class comes from the folder's ``model_index.json``
    (``_class_name``); it must be one of :data:`SUPPORTED_PIPELINES`.

    Args:
        path_or_hub_id: a folder written by ``save_pretrained`` (e.g. by ``scripts/make_tiny_pipelines.py``),
            or a hub id such as ``"Wan-AI/Wan2.1-T2V-1.3B-Diffusers"`` already in the local cache.
        torch_dtype: dtype of the weights (default: as saved).
        device: move the pipeline there after loading (default: stay on the CPU).
        cache_dir: the Hugging Face cache to look a hub id up in (default: the standard one, ``$HF_HUB_CACHE``).
        **kwargs: passed to the class's ``from_pretrained``.

    Raises:
        WeightsNotFoundError: nothing local for that path or id (with the command that fetches it).
        UnsupportedPipelineError: the pipeline class is not supported.
        FormatError-like CorrlabError: ``model_index.json`` missing or unreadable.
    """
    if not isinstance(path_or_hub_id, (str, os.PathLike)) or not str(path_or_hub_id):
        raise CorrlabError(f"path_or_hub_id: expected a folder or a Hugging Face model id, got {describe(path_or_hub_id)}")
    name = str(path_or_hub_id)
    folder = _local_folder(name, cache_dir)
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


# ------------------------------------------------------------------------------ running (CLI, notebook 5)
PIPELINE_OUTPUT_FORMAT = "corrlab.pipeline_output"


def is_pipeline_folder(path: Any) -> bool:
    """True when ``path`` is a folder holding a diffusers ``model_index.json``."""
    try:
        return (Path(path) / "model_index.json").is_file()
    except TypeError:
        return False


def num_images_of(pipe: Any, num_images: int | None = None) -> int | None:
    """Images that attend to each other per prompt: ``num_images`` (default 4) for single-image pipelines
    under extended attention, ``num_views`` for the multi-view UNet, None for video (frames set it)."""
    kind = check_supported(pipe)
    if kind == "multiview":
        if num_images not in (None, pipe.num_views):
            raise CorrlabError(f"num_images: this MultiViewUNetPipeline generates {pipe.num_views} views, got {num_images}")
        return pipe.num_views
    if kind == "video":
        return None
    n = 4 if num_images is None else num_images
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise CorrlabError(f"num_images: expected a positive number of images, got {n!r}")
    return n


def multi_image(pipe: Any, num_images: int | None = None):
    """Context making the pipeline's images attend to each other: extended attention over ``num_images``
    for Flux / SD, nothing for Wan (frames share a sequence) and the multi-view UNet (its processors)."""
    from contextlib import nullcontext

    from .probing.extended_attention import extended_attention

    if check_supported(pipe) == "extended":
        return extended_attention(pipe, num_images_of(pipe, num_images))
    return nullcontext()


def pipeline_call_kwargs(pipe: Any, prompt: str, seed: int, *, num_inference_steps: int | None = None,
                         guidance_scale: float | None = None, num_images: int | None = None,
                         height: int | None = None, width: int | None = None, num_frames: int | None = None,
                         output_type: str = "np") -> dict:
    """Keyword arguments of the pipeline's own ``__call__`` for one seeded generation (None = its default)."""
    kind = check_supported(pipe)
    kw: dict[str, Any] = dict(prompt=prompt, generator=torch.Generator().manual_seed(int(seed)), output_type=output_type)
    for name, value in (("num_inference_steps", num_inference_steps), ("guidance_scale", guidance_scale),
                        ("height", height), ("width", width)):
        if value is not None:
            kw[name] = value
    if kind == "video":
        if num_frames is not None:
            kw["num_frames"] = int(num_frames)
    elif num_frames is not None:
        raise CorrlabError(f"num_frames: only video pipelines take a number of frames, got {num_frames} for {type(pipe).__name__}")
    else:
        kw["num_images_per_prompt"] = num_images_of(pipe, num_images)
    return kw


def output_images(out: Any) -> torch.Tensor:
    """The images of a pipeline output (``output_type="np"`` or ``"pt"``) as ``(N, 3, H, W)`` float32 in [0, 1]
    (a video's frames, or the images of the batch)."""
    x = out.frames[0] if hasattr(out, "frames") else out.images
    if isinstance(x, list):
        x = np.stack([np.asarray(i, dtype=np.float32) / (255.0 if np.asarray(i).dtype == np.uint8 else 1.0) for i in x])
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()
    if t.ndim == 4 and t.shape[-1] == 3:
        t = t.permute(0, 3, 1, 2)
    if t.ndim != 4 or t.shape[1] != 3:
        raise CorrlabError(f"out: expected images or frames of shape (N, H, W, 3) or (N, 3, H, W), got {describe(t)}")
    return t.clamp(0, 1).contiguous()


def record_frame_indices(pipe: Any, num_recorded: int, num_outputs: int) -> list[int]:
    """Which output image stands for each recorded image: the last frame of each latent frame's group for a
    video VAE, else the images in order."""
    if check_supported(pipe) == "video":
        from .video_consistency import latent_frame_indices

        return latent_frame_indices(num_recorded, num_outputs, int(getattr(pipe, "vae_scale_factor_temporal", 4)))
    if num_recorded != num_outputs:
        raise CorrlabError(f"num_recorded: the record holds {num_recorded} images but the pipeline returned {num_outputs}")
    return list(range(num_outputs))


def save_pipeline_output(directory: Any, images: torch.Tensor, meta: dict) -> Path:
    """Write ``DIR/frames/NNN.png`` (every output image or frame) and ``DIR/pipeline.json`` (``meta`` plus the
    format tag), each file atomically. Returns the folder."""
    import io

    from PIL import Image

    from .io_utils import atomic_write_bytes, atomic_write_text

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    arr = (images.permute(0, 2, 3, 1).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
    for i, a in enumerate(arr):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        atomic_write_bytes(d / "frames" / f"{i:03d}.png", buf.getvalue())
    header = {"format": PIPELINE_OUTPUT_FORMAT, "version": 1, "num_frames": int(arr.shape[0]),
              "height": int(arr.shape[1]), "width": int(arr.shape[2]), **meta}
    atomic_write_text(d / "pipeline.json", json.dumps(header, indent=1))
    return d


def load_pipeline_output(directory: Any) -> tuple[torch.Tensor, dict]:
    """``(images (N, 3, H, W) float32 in [0, 1], header)`` of a folder written by :func:`save_pipeline_output`."""
    from PIL import Image

    from .errors import FormatError

    d = Path(directory)
    f = d / "pipeline.json"
    if not f.is_file():
        raise CorrlabError(f"directory: {str(d)!r} holds no pipeline.json (expected output of `corrlab probe --model PIPELINE_DIR`)")
    try:
        header = json.loads(f.read_text())
        n = int(header["num_frames"])
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError(f"directory: {str(f)!r} is not a corrlab pipeline.json ({e!r})") from None
    if header.get("format") != PIPELINE_OUTPUT_FORMAT:
        raise FormatError(f"directory: {str(f)!r} has format {header.get('format')!r}, expected {PIPELINE_OUTPUT_FORMAT!r}")
    frames = []
    for i in range(n):
        p = d / "frames" / f"{i:03d}.png"
        if not p.is_file():
            raise FormatError(f"directory: frame {str(p)!r} is missing ({n} frames expected)")
        frames.append(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous(), header


def pipeline_source(model: Any) -> Path | None:
    """The local diffusers pipeline folder named by a ``--model`` value (a folder with ``model_index.json``, or
    a hub id ``owner/name`` in the local Hugging Face cache), else None (e.g. the embedded model)."""
    if model is None:
        return None
    if is_pipeline_folder(model):
        return Path(model)
    name = str(model)
    if name.count("/") == 1 and not Path(name).exists():
        folder = _local_folder(name)
        if folder is not None and is_pipeline_folder(folder):
            return folder
    return None
