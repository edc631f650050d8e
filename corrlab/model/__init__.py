"""corrlab's embedded model: a small multi-view rectified-flow model trained on corrlab's own scenes.

The default, ``corrlab-mvunet-s`` (the embedded model v2), is a :class:`MultiViewUNet` with a learned epipolar
attention bias; it generates text-only or from given reference views. ``corrlab-mvdit-s`` (v1, a
:class:`MultiViewDiT`, text-only) stays in ``data/`` by name.

>>> from corrlab.model import load_default                         # doctest: +SKIP
>>> pipe = load_default()                                           # doctest: +SKIP
>>> mvs = pipe("red striped box", seed=0)                           # doctest: +SKIP

``load_default()`` reads ``data/<DEFAULT_MODEL_NAME>/`` of the corrlab repository, or the folder (or a
model name under ``data/``) given by the ``CORRLAB_MODEL`` environment variable.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import WeightsNotFoundError
from .dit import MultiViewDiT
from .unet import MultiViewUNet
from .pipeline import DEFAULT_GUIDANCE, DEFAULT_STEPS, CorrlabPipeline, default_scheduler
from .prompt import PromptEncoder
from .rays import plucker_ray_embeds, token_centres
from .lora import load_corrstar, load_lora

__all__ = [
    "MultiViewDiT",
    "MultiViewUNet",
    "PromptEncoder",
    "CorrlabPipeline",
    "default_scheduler",
    "plucker_ray_embeds",
    "token_centres",
    "load_default",
    "resolve_model_path",
    "DEFAULT_MODEL_NAME",
    "DEFAULT_STEPS",
    "DEFAULT_GUIDANCE",
    "DATA_DIR",
    "load_corrstar",
    "load_lora",
]

#: Folder name of the shipped weights under ``data/``.
DEFAULT_MODEL_NAME = "corrlab-mvunet-s"
#: ``data/`` of the corrlab repository (next to the ``corrlab`` package).
DATA_DIR = Path(__file__).resolve().parents[2] / "data"


def resolve_model_path(name_or_path: str | os.PathLike | None = None) -> Path:
    """A model folder from a path, a name under ``data/``, ``$CORRLAB_MODEL``, or the default name."""
    spec = name_or_path if name_or_path is not None else os.environ.get("CORRLAB_MODEL") or DEFAULT_MODEL_NAME
    p = Path(spec).expanduser()
    if p.is_dir():
        return p
    q = DATA_DIR / str(spec)
    if q.is_dir():
        return q
    raise WeightsNotFoundError(
        f"model: no weights found for {str(spec)!r} (looked at {str(p)!r} and {str(q)!r}). corrlab cannot download "
        f"weights; train them with `corrlab train --config FILE --out runs/NAME` and copy the EMA weights with "
        f"CorrlabPipeline.save_pretrained to data/{DEFAULT_MODEL_NAME}/, or point CORRLAB_MODEL at a folder."
    )


def load_default(name_or_path: str | os.PathLike | None = None, lora: str | os.PathLike | None = None) -> CorrlabPipeline:
    """Load the shipped embedded model (or ``name_or_path``) as a :class:`CorrlabPipeline` on the CPU.

    ``lora``: a LoRA folder (or name under ``data/``, e.g. ``"corrlab-mvunet-s-corrstar"``) loaded onto it with
    :func:`corrlab.model.lora.load_corrstar` (checked against the base's weights hash); its handle is
    ``pipe.lora`` (``pipe.lora.unload()`` restores the base).
    """
    path = resolve_model_path(name_or_path)
    if not ((path / "model" / "config.json").is_file() or (path / "config.json").is_file()):
        raise WeightsNotFoundError(
            f"model: {str(path)!r} holds no model/config.json; train weights with "
            f"`corrlab train --config FILE --out runs/NAME`"
        )
    pipe = CorrlabPipeline.from_pretrained(path)
    if lora is not None:
        pipe.lora = load_corrstar(pipe, lora)
    return pipe
