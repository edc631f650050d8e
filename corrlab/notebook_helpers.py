"""Helpers shared by corrlab's notebooks (``notebooks/0*.ipynb``).

* Fast mode: with the environment variable ``CORRLAB_NB_FAST=1`` the notebooks replace their
  ``parameters`` cell's sizes by tiny ones (a few steps, two small views). Voila, which serves a
  notebook for the browser test, cannot take papermill parameters, so this is how the served notebook
  is kept fast. ``fast_mode()`` says whether it is on.
* :func:`load_pipeline`: the shipped embedded model, a folder, or (when no weights are installed) an
  untrained model of the same architecture, announced loudly, so a notebook still runs end to end.
"""
from __future__ import annotations

import os

import torch

from .errors import CorrlabError, WeightsNotFoundError

__all__ = ["FAST_ENV", "fast_mode", "load_pipeline", "untrained_pipeline"]

#: Environment variable that switches the notebooks to tiny sizes (``1`` = on).
FAST_ENV = "CORRLAB_NB_FAST"


def fast_mode() -> bool:
    """True when ``CORRLAB_NB_FAST`` is ``1`` / ``true`` / ``yes`` (case-insensitive)."""
    value = os.environ.get(FAST_ENV, "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise CorrlabError(f"{FAST_ENV}: expected 1/true/yes or 0/false/no, got {os.environ[FAST_ENV]!r}")


def untrained_pipeline(seed: int = 0):
    """A :class:`~corrlab.model.CorrlabPipeline` with a randomly initialised embedded-model architecture.

    The architecture is that of the default model ``corrlab-mvunet-s`` (a :class:`~corrlab.model.MultiViewUNet`:
    64 px, channels 64/96/128, multi-view attention at 16 x 16 and 8 x 8, 4 heads, epipolar attention bias).
    Its residual output convolutions, output layer and "given" embedding start at zero (the model would output
    zero velocity and return the noise), so every all-zero parameter gets small random values from ``seed``
    instead, except the epipolar bias gains: they stay at zero, so untrained attention has no geometric prior.
    """
    from .model import CorrlabPipeline, MultiViewUNet

    gen = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng():
        torch.manual_seed(int(seed))
        model = MultiViewUNet(sample_size=64, channels=(64, 96, 128), attention_levels=(1, 2), stem=2, num_heads=4,
                              prompt_dim=64, ray_freqs=4, epipolar_bias=True, epipolar_gain_scale=1000.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.any() and not name.endswith("epipolar_gain"):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return CorrlabPipeline(model.eval())


def load_pipeline(model: str = "default", seed: int = 0, verbose: bool = True):
    """The embedded model as a :class:`~corrlab.model.CorrlabPipeline`.

    Args:
        model: ``"default"`` (the shipped weights in ``data/``, or ``$CORRLAB_MODEL``), a model name under
            ``data/``, a folder written by ``CorrlabPipeline.save_pretrained``, or ``"untrained"``.
        seed: seed of the untrained fallback.

    When ``model == "default"`` and no weights are installed, prints why and returns
    :func:`untrained_pipeline` (results then describe an untrained model). Any other missing model raises
    :class:`~corrlab.errors.WeightsNotFoundError`.
    """
    from .model import load_default

    if model == "untrained":
        return untrained_pipeline(seed)
    try:
        pipe = load_default(None if model == "default" else model)
    except WeightsNotFoundError as e:
        if model != "default":
            raise
        if verbose:
            print(f"NOTE: no trained weights installed ({e}).\nUsing an UNTRAINED model of the same architecture: "
                  "every number below describes an untrained model.")
        return untrained_pipeline(seed)
    if verbose:
        m = pipe.model
        params = sum(p.numel() for p in m.parameters())
        refs = "takes reference views" if pipe.supports_reference else "text only"
        print(f"embedded model: {type(m).__name__}, {params / 1e6:.1f} M parameters, {m.config.sample_size} px, {refs}")
    return pipe
