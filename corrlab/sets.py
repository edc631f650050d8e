"""Multi-view sets: :class:`MultiViewSet` and its on-disk format (:func:`save_set`, :func:`load_set`).

A set directory holds::

    view_00.png ... view_{V-1}.png   RGB, 8 bit
    depth_00.npy ...                 float32 (H, W), z_cam on the object, +inf on the background (optional)
    mask_00.png ...                  8-bit grey, 255 = object (optional)
    cameras.json                     {"format": "corrlab-set", "version": 1, "prompt": str, "seed": int,
                                      "width": W, "height": H,
                                      "views": [{"K": 3x3, "R": 3x3, "t": [3], "model": str}, ...],
                                      "meta": {...}}

Indices have at least two digits (``view_100.png`` follows ``view_99.png``). Sets are written into a
temporary sibling directory and renamed into place.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import CorrlabError, FormatError, ShapeError, ValueRangeError, check_shape, describe
from .geometry import Camera

__all__ = ["MultiViewSet", "save_set", "load_set", "is_set_dir", "FORMAT_NAME", "FORMAT_VERSION"]

FORMAT_NAME = "corrlab-set"
FORMAT_VERSION = 1
CAMERAS_FILE = "cameras.json"


def _as_tensor(name: str, x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise ShapeError(f"{name}: expected a torch.Tensor or numpy array, got {describe(x)}")


@dataclass(eq=False)
class MultiViewSet:
    """V views of one scene with their cameras.

    images: (V, 3, H, W) float32 in [0, 1]. cameras: list of V :class:`Camera`. prompt: the caption.
    seed: the seed that produced the set (-1 if none). depth: (V, H, W) float32, z_cam on the object
    and +inf on the background, or None. masks: (V, H, W) bool (True = object), or None.
    meta: JSON-able dict (scene parameters, layout, ...).
    """

    images: torch.Tensor
    cameras: list
    prompt: str
    seed: int
    depth: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        images = _as_tensor("images", self.images)
        check_shape("images", images, (None, 3, None, None), expected="(V, 3, H, W)")
        if not images.is_floating_point():
            raise ShapeError(f"images: expected float32 values in [0, 1], got {describe(images)}")
        images = images.to(torch.float32)
        V, _, H, W = images.shape
        if V < 1 or H < 1 or W < 1:
            raise ShapeError(f"images: expected at least one non-empty view (V, 3, H, W), got {describe(images)}")
        if not bool(torch.isfinite(images).all()) or float(images.min()) < 0.0 or float(images.max()) > 1.0:
            raise ValueRangeError(
                f"images: expected finite values in [0, 1], got range [{float(images.min()):.4g}, {float(images.max()):.4g}]"
            )
        self.images = images
        cams = list(self.cameras) if isinstance(self.cameras, (list, tuple)) else None
        if cams is None or len(cams) != V:
            raise CorrlabError(f"cameras: expected a list of {V} Camera (one per view), got {describe(self.cameras)}")
        for i, c in enumerate(cams):
            if not isinstance(c, Camera):
                raise CorrlabError(f"cameras[{i}]: expected a corrlab.geometry.Camera, got {describe(c)}")
        self.cameras = cams
        if not isinstance(self.prompt, str):
            raise CorrlabError(f"prompt: expected a str, got {describe(self.prompt)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise CorrlabError(f"seed: expected an int, got {describe(self.seed)}")
        self.seed = int(self.seed)
        if self.depth is not None:
            depth = _as_tensor("depth", self.depth)
            check_shape("depth", depth, (V, H, W), expected=f"(V, H, W) = ({V}, {H}, {W}) matching images")
            if not depth.is_floating_point():
                raise ShapeError(f"depth: expected float32 z_cam values, got {describe(depth)}")
            depth = depth.to(torch.float32)
            if bool(torch.isnan(depth).any()) or bool((depth == float("-inf")).any()):
                raise ValueRangeError("depth: expected finite z_cam or +inf (background), got NaN or -inf entries")
            self.depth = depth
        if self.masks is not None:
            masks = _as_tensor("masks", self.masks)
            check_shape("masks", masks, (V, H, W), expected=f"(V, H, W) = ({V}, {H}, {W}) matching images")
            if masks.dtype != torch.bool:
                raise ShapeError(f"masks: expected a bool tensor, got {describe(masks)}")
            self.masks = masks
        if not isinstance(self.meta, dict):
            raise CorrlabError(f"meta: expected a JSON-able dict, got {describe(self.meta)}")
        try:
            json.dumps(self.meta, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise CorrlabError(f"meta: expected a JSON-able dict, got one that json cannot write ({e})") from None

    @property
    def num_views(self) -> int:
        return int(self.images.shape[0])

    @property
    def height(self) -> int:
        return int(self.images.shape[2])

    @property
    def width(self) -> int:
        return int(self.images.shape[3])

    @property
    def size(self) -> int:
        """Side length of the (square) views; raises for non-square views (use height, width)."""
        if self.height != self.width:
            raise CorrlabError(f"size: defined for square views only, got H={self.height}, W={self.width}; use .height and .width")
        return self.height


# ---------------------------------------------------------------------------------------- writing
def _name(kind: str, i: int, ext: str) -> str:
    return f"{kind}_{i:02d}.{ext}"


def is_set_dir(path) -> bool:
    """True if ``path`` is a directory whose cameras.json declares a corrlab set."""
    f = Path(path) / CAMERAS_FILE
    try:
        d = json.loads(f.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and d.get("format") == FORMAT_NAME and isinstance(d.get("views"), list)


def _to_uint8_hwc(img: torch.Tensor) -> np.ndarray:
    return (img.permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)


def save_set(mv: MultiViewSet, directory) -> Path:
    """Write ``mv`` to ``directory`` atomically; returns the directory's path.

    An existing ``directory`` is replaced only if it is empty or a corrlab set; anything else raises
    :class:`FormatError`.
    """
    from PIL import Image

    if not isinstance(mv, MultiViewSet):
        raise CorrlabError(f"mv: expected a MultiViewSet, got {describe(mv)}")
    out = Path(directory)
    if out.exists():
        if not out.is_dir():
            raise FormatError(f"directory: {out} exists and is a file, expected a corrlab set directory or a new path")
        if any(out.iterdir()) and not is_set_dir(out):
            raise FormatError(f"directory: {out} exists and is not a corrlab set (no valid {CAMERAS_FILE}); refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for i in range(mv.num_views):
            Image.fromarray(_to_uint8_hwc(mv.images[i]), mode="RGB").save(tmp / _name("view", i, "png"))
            if mv.depth is not None:
                np.save(tmp / _name("depth", i, "npy"), mv.depth[i].numpy().astype(np.float32))
            if mv.masks is not None:
                m = mv.masks[i].numpy().astype(np.uint8) * 255
                Image.fromarray(m, mode="L").save(tmp / _name("mask", i, "png"))
        header = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "prompt": mv.prompt,
            "seed": mv.seed,
            "width": mv.width,
            "height": mv.height,
            "views": [c.to_dict() for c in mv.cameras],
            "meta": mv.meta,
        }
        (tmp / CAMERAS_FILE).write_text(json.dumps(header, indent=1))
        os.chmod(tmp, 0o755)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------------------------------- reading
def _read_header(d: Path) -> dict:
    f = d / CAMERAS_FILE
    if not d.is_dir():
        raise FormatError(f"directory: expected a corrlab set directory, got {d} ({'a file' if d.exists() else 'missing'})")
    if not f.is_file():
        raise FormatError(f"directory: {d} is not a corrlab set: {CAMERAS_FILE} is missing")
    try:
        header = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{f}: truncated or corrupt JSON ({e})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{f}: expected a JSON object, got {type(header).__name__}")
    if header.get("format", FORMAT_NAME) != FORMAT_NAME:
        raise FormatError(f"{f}: expected format {FORMAT_NAME!r}, got {header.get('format')!r} (a foreign directory?)")
    version = header.get("version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise FormatError(f"{f}: expected version {FORMAT_VERSION}, got {version!r}")
    missing = [k for k in ("prompt", "seed", "width", "height", "views") if k not in header]
    if missing:
        raise FormatError(f"{f}: missing keys {missing}; expected prompt, seed, width, height, views")
    if not isinstance(header["views"], list) or not header["views"]:
        raise FormatError(f"{f}: 'views' must be a non-empty list of cameras, got {describe(header['views'])}")
    for k in ("width", "height"):
        if not isinstance(header[k], int) or header[k] < 1:
            raise FormatError(f"{f}: {k!r} must be a positive int, got {header[k]!r}")
    return header


def _read_png(path: Path, mode: str, hw: tuple[int, int]) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise FormatError(f"{path.parent}: {path.name} is missing")
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert(mode))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise FormatError(f"{path}: unreadable or truncated PNG ({e})") from None
    if arr.shape[:2] != hw:
        raise FormatError(f"{path}: expected {hw[1]}x{hw[0]} pixels (width x height from {CAMERAS_FILE}), got {arr.shape[1]}x{arr.shape[0]}")
    return arr


def _read_optional(d: Path, kind: str, ext: str, V: int) -> list[Path] | None:
    paths = [d / _name(kind, i, ext) for i in range(V)]
    present = [p.is_file() for p in paths]
    if not any(present):
        return None
    if not all(present):
        gone = [p.name for p, ok in zip(paths, present) if not ok]
        raise FormatError(f"{d}: {kind} files present for some views but missing {gone}")
    return paths


def load_set(directory) -> MultiViewSet:
    """Read a set written by :func:`save_set`. Missing, truncated or foreign content raises :class:`FormatError`."""
    d = Path(directory)
    header = _read_header(d)
    H, W = header["height"], header["width"]
    V = len(header["views"])
    cameras = []
    for i, v in enumerate(header["views"]):
        try:
            if not isinstance(v, dict):
                raise CorrlabError(f"expected a dict with K, R, t, model, got {describe(v)}")
            cameras.append(Camera.from_dict(v))
        except CorrlabError as e:
            raise FormatError(f"{d / CAMERAS_FILE}: views[{i}] is not a valid camera ({e})") from None
    images = np.stack([_read_png(d / _name("view", i, "png"), "RGB", (H, W)) for i in range(V)])
    images = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32) / 255.0

    depth = None
    depth_paths = _read_optional(d, "depth", "npy", V)
    if depth_paths is not None:
        arrs = []
        for p in depth_paths:
            try:
                a = np.load(p, allow_pickle=False)
            except (OSError, ValueError, EOFError) as e:
                raise FormatError(f"{p}: unreadable or truncated .npy ({e})") from None
            if a.shape != (H, W) or a.dtype != np.float32:
                raise FormatError(f"{p}: expected float32 of shape ({H}, {W}), got {a.dtype} of shape {a.shape}")
            arrs.append(a)
        depth = torch.from_numpy(np.stack(arrs))

    masks = None
    mask_paths = _read_optional(d, "mask", "png", V)
    if mask_paths is not None:
        masks = torch.from_numpy(np.stack([_read_png(p, "L", (H, W)) > 127 for p in mask_paths]))

    meta = header.get("meta", {})
    prompt, seed = header["prompt"], header["seed"]
    if not isinstance(prompt, str) or isinstance(seed, bool) or not isinstance(seed, int):
        raise FormatError(f"{d / CAMERAS_FILE}: expected a str prompt and an int seed, got {prompt!r}, {seed!r}")
    try:
        return MultiViewSet(images=images, cameras=cameras, prompt=prompt, seed=seed, depth=depth, masks=masks, meta=meta)
    except CorrlabError as e:
        raise FormatError(f"{d}: inconsistent set ({e})") from None
