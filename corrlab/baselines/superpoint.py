"""SuperPoint keypoints (transformers) matched by LightGlue when its weights are local, else by mutual NN.

Weights never download at run time. ``SuperPointMatcher.from_pretrained`` looks, in order, at the
``weights_dir`` argument, the ``CORRLAB_SUPERPOINT`` environment variable (a local directory) and the
Hugging Face cache entry of ``magic-leap-community/superpoint`` (``local_files_only=True``). The LightGlue
matcher is optional: ``lightglue_dir``, ``CORRLAB_SUPERPOINT_LIGHTGLUE``, then the cached
``ETH-CVG/lightglue_superpoint`` (whose checkpoint holds its own SuperPoint).

Coordinate convention of transformers' SuperPoint (checked in modeling_superpoint.py, transformers 5.x):
keypoints are ``torch.nonzero`` indices of the full-resolution score map, flipped to (x, y) = (column, row),
so an integer keypoint is the centre of that pixel (corrlab's convention); ``forward`` then divides by
(W, H) and returns *relative* (x, y). ``LightGlueForKeypointMatching`` returns the same relative
keypoints (its docstring says absolute, the code returns relative). corrlab multiplies by (W, H) and
rounds (the values are integer pixel indices). The encoder works at stride 8: with H or W not a multiple
of 8 only the top-left ``8*floor(H/8) x 8*floor(W/8)`` region gets keypoints.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from corrlab.errors import ShapeError, WeightsNotFoundError

from .descriptor_matching import mutual_nearest_neighbours
from .images import as_image_tensor, to_gray
from .matches import Matches

__all__ = ["SuperPointMatcher", "match_superpoint", "find_superpoint_weights", "find_lightglue_weights",
           "SUPERPOINT_ENV", "LIGHTGLUE_ENV", "SUPERPOINT_HUB_ID", "LIGHTGLUE_HUB_ID"]

SUPERPOINT_ENV = "CORRLAB_SUPERPOINT"
LIGHTGLUE_ENV = "CORRLAB_SUPERPOINT_LIGHTGLUE"
SUPERPOINT_HUB_ID = "magic-leap-community/superpoint"
LIGHTGLUE_HUB_ID = "ETH-CVG/lightglue_superpoint"


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _cached_hub_snapshot(repo_id: str) -> Path | None:
    """Local snapshot of ``repo_id`` in the Hugging Face cache, or None (never touches the network)."""
    try:
        from huggingface_hub import snapshot_download

        # HF_HUB_CACHE is read here (not only at import) so callers and tests can point at another cache.
        path = Path(snapshot_download(repo_id, local_files_only=True, cache_dir=os.environ.get("HF_HUB_CACHE")))
    except Exception:  # LocalEntryNotFoundError, offline mode, a broken cache: all mean "not available"
        return None
    return path if _is_model_dir(path) else None


def _resolve(explicit: str | Path | None, env: str, hub_id: str) -> tuple[Path | None, list[str]]:
    """First local model directory among (explicit, $env, hub cache) and what was tried, for messages."""
    tried = []
    if explicit is not None:
        path = Path(explicit)
        if _is_model_dir(path):
            return path, tried
        tried.append(f"argument {str(path)!r} (no config.json there)")
    value = os.environ.get(env)
    if value:
        if _is_model_dir(Path(value)):
            return Path(value), tried
        tried.append(f"${env}={value!r} (no config.json there)")
    else:
        tried.append(f"${env} (unset)")
    snapshot = _cached_hub_snapshot(hub_id)
    if snapshot is not None:
        return snapshot, tried
    tried.append(f"Hugging Face cache entry {hub_id!r} (not downloaded)")
    return None, tried


def find_superpoint_weights(weights_dir: str | Path | None = None) -> Path:
    """Local SuperPoint model directory, or :class:`WeightsNotFoundError` saying how to provide one."""
    path, tried = _resolve(weights_dir, SUPERPOINT_ENV, SUPERPOINT_HUB_ID)
    if path is None:
        raise WeightsNotFoundError(
            "SuperPoint weights not found; tried " + "; ".join(tried) + ". corrlab never downloads at run time. "
            f"On a machine with network run `hf download {SUPERPOINT_HUB_ID} --local-dir superpoint` "
            f"(older huggingface_hub: `huggingface-cli download {SUPERPOINT_HUB_ID} --local-dir superpoint`), "
            f"copy the folder here and set {SUPERPOINT_ENV}=/path/to/superpoint (or pass weights_dir=...). "
            f"Optional LightGlue matcher: `hf download {LIGHTGLUE_HUB_ID} --local-dir lightglue_superpoint` "
            f"and {LIGHTGLUE_ENV}=/path/to/lightglue_superpoint.")
    return path


def find_lightglue_weights(lightglue_dir: str | Path | None = None) -> Path | None:
    """Local LightGlue-for-SuperPoint model directory, or None (then matching falls back to mutual NN)."""
    return _resolve(lightglue_dir, LIGHTGLUE_ENV, LIGHTGLUE_HUB_ID)[0]


def _relative_to_pixels(keypoints: torch.Tensor, width: int, height: int) -> np.ndarray:
    """transformers' relative (x, y) ``(N, 2)`` -> corrlab pixels (integer = pixel centre) ``(N, 2)`` float64."""
    pixels = keypoints.double() * torch.tensor([width, height], dtype=torch.float64)
    return pixels.round().numpy()


def _model_input(image: torch.Tensor) -> torch.Tensor:
    """``(3, H, W)`` RGB in [0, 1] -> ``(1, 3, H, W)`` grayscale repeated on 3 channels (what transformers expects)."""
    return to_gray(image)[None, None].expand(1, 3, -1, -1).contiguous()


class SuperPointMatcher:
    """SuperPoint + (LightGlue or mutual NN) on CPU, eval mode. Call as ``matcher(img0, img1) -> Matches``.

    Args:
        detector: a ``transformers.SuperPointForKeypointDetection``.
        lightglue: optional ``transformers.LightGlueForKeypointMatching``; when given it detects (with its own
            SuperPoint) and matches, method ``"superpoint+lightglue"``; otherwise ``"superpoint+mnn"``.
    """

    def __init__(self, detector: torch.nn.Module, lightglue: torch.nn.Module | None = None) -> None:
        self.detector = detector.eval()
        self.lightglue = lightglue.eval() if lightglue is not None else None
        self.method = "superpoint+lightglue" if lightglue is not None else "superpoint+mnn"

    @classmethod
    def from_pretrained(cls, weights_dir: str | Path | None = None, lightglue_dir: str | Path | None = None,
                        use_lightglue: bool = True) -> "SuperPointMatcher":
        """Load local weights (see the module docstring for the search order); never downloads."""
        from transformers import LightGlueForKeypointMatching, SuperPointForKeypointDetection

        detector = SuperPointForKeypointDetection.from_pretrained(find_superpoint_weights(weights_dir),
                                                                  local_files_only=True)
        lightglue_path = find_lightglue_weights(lightglue_dir) if use_lightglue else None
        lightglue = None
        if lightglue_path is not None:
            lightglue = LightGlueForKeypointMatching.from_pretrained(lightglue_path, local_files_only=True)
        return cls(detector, lightglue)

    @classmethod
    def from_config(cls, config: Any = None, seed: int = 0, with_lightglue: bool = False) -> "SuperPointMatcher":
        """Randomly initialised models (for testing the plumbing): same seed -> same weights.

        Args:
            config: a ``transformers.SuperPointConfig`` (default ``SuperPointConfig()``).
            seed: seeds a forked RNG, so the global torch RNG is left untouched.
            with_lightglue: also build a random ``LightGlueForKeypointMatching`` around the same config.
        """
        from transformers import (LightGlueConfig, LightGlueForKeypointMatching, SuperPointConfig,
                                  SuperPointForKeypointDetection)

        config = config if config is not None else SuperPointConfig()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            detector = SuperPointForKeypointDetection(config)
            lightglue = None
            if with_lightglue:
                lightglue = LightGlueForKeypointMatching(LightGlueConfig(keypoint_detector_config=config))
        return cls(detector, lightglue)

    @torch.no_grad()
    def detect(self, image: Any, name: str = "image") -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
        """Keypoints ``(N, 2)`` float64 corrlab pixels, descriptors ``(N, 256)`` (unit norm), scores ``(N,)``."""
        image = as_image_tensor(name, image)
        out = self.detector(_model_input(image))
        keep = out.mask[0].bool()
        pixels = _relative_to_pixels(out.keypoints[0][keep], image.shape[2], image.shape[1])
        return pixels, out.descriptors[0][keep], out.scores[0][keep].double().numpy()

    @torch.no_grad()
    def __call__(self, img0: Any, img1: Any) -> Matches:
        """Match two ``(3, H, W)`` images in [0, 1] (or ``(H, W, 3)`` uint8)."""
        if self.lightglue is not None:
            return self._match_lightglue(as_image_tensor("img0", img0), as_image_tensor("img1", img1))
        pts0, desc0, _ = self.detect(img0, "img0")
        pts1, desc1, _ = self.detect(img1, "img1")
        idx0, idx1, similarity = mutual_nearest_neighbours(desc0, desc1)
        return Matches(pts0[idx0.numpy()], pts1[idx1.numpy()], similarity.double().numpy(), self.method)

    def _match_lightglue(self, image0: torch.Tensor, image1: torch.Tensor) -> Matches:
        if image0.shape != image1.shape:
            raise ShapeError(f"img1: LightGlue (transformers) matches images of one size; expected shape "
                             f"{tuple(image0.shape)} as img0, got {tuple(image1.shape)}")
        pixel_values = torch.stack([_model_input(image0)[0], _model_input(image1)[0]])[None]
        out = self.lightglue(pixel_values)
        height, width = image0.shape[1:]
        # transformers drops the batch axis of matches/scores when pruning is disabled: reshape to (2, K).
        matches = out.matches.reshape(2, -1)
        scores = out.matching_scores.reshape(2, -1)
        mask = out.mask.reshape(2, -1).bool()
        keypoints = out.keypoints.reshape(2, -1, 2)
        valid = (matches[0] > -1) & mask[0]
        idx0 = torch.nonzero(valid, as_tuple=True)[0]
        idx1 = matches[0][idx0]
        pts0 = _relative_to_pixels(keypoints[0][idx0], width, height)
        pts1 = _relative_to_pixels(keypoints[1][idx1], width, height)
        return Matches(pts0, pts1, scores[0][idx0].double().numpy(), self.method)


@functools.lru_cache(maxsize=4)
def _cached_matcher(weights_dir: str, lightglue_dir: str | None) -> SuperPointMatcher:
    return SuperPointMatcher.from_pretrained(weights_dir, lightglue_dir, use_lightglue=lightglue_dir is not None)


def match_superpoint(img0: Any, img1: Any, weights_dir: str | Path | None = None,
                     lightglue_dir: str | Path | None = None) -> Matches:
    """Match with local SuperPoint weights (loaded once per process per weights location)."""
    detector_path = find_superpoint_weights(weights_dir)
    lightglue_path = find_lightglue_weights(lightglue_dir)
    return _cached_matcher(str(detector_path), None if lightglue_path is None else str(lightglue_path))(img0, img1)
