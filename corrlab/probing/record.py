"""Probe records: native correspondences as one labelled ``xarray.Dataset``, saved to one netCDF file.

Layout of ``ProbeRecord.ds`` (format ``corrlab.probe_record``, version 2):

* dims ``(layer, step, src, tgt, head, row, col)``; ``row``/``col`` index the SOURCE token grid of each
  layer. Layers may differ in grid and in the number of matched heads ``H'``: ``row``, ``col``, ``head``
  span the largest, smaller layers are padded.
* coords ``layer`` (hook names), ``step`` (sampler step index), ``timestep(step)`` (the model's timestep
  value, NaN if unknown), ``src``, ``tgt`` (image indices), ``head``, ``row``, ``col``; per layer
  ``grid_rows(layer)``, ``grid_cols(layer)``, ``num_heads(layer)`` (``H'``, 1 for head-averaged matching).
* variables on all seven dims: ``match_row``, ``match_col`` (int32, the matched target token; -1 where
  there is none), ``match_x``, ``match_y`` (float32 pixel centre of the matched target token, NaN where
  none), ``confidence`` (float32, NaN where none), ``kept`` (bool, False where none). "None" means:
  ``src == tgt``, padding, or a (layer, step) that was not recorded.
* ``src_x``, ``src_y`` (float64 on ``(layer, row, col)``): pixel centres of the source tokens.
* when known, the generation's cameras, one per image (the set's cameras, stored once, as data):
  ``camera_K``, ``camera_R`` (float64 on ``(view, mat_row, mat_col)``, 3 x 3), ``camera_t`` (float64 on
  ``(view, mat_row)``), ``camera_model`` (str on ``(view,)``: ``perspective`` / ``orthographic``), the
  fields of :class:`corrlab.geometry.Camera` (``x_cam = R x_world + t``) exactly; coord ``view`` (0..V-1).
* attrs: ``format``, ``version``, ``matching`` (JSON of the matching options), ``image_height``,
  ``image_width``, ``batch_index`` (the int asked for, or ``"auto"``), and when known ``prompt``, ``seed``,
  ``model``.

Version 1 records (cameras as a JSON attribute ``cameras``) still load: :meth:`ProbeRecord.load` moves the
cameras into the variables above (JSON floats round-trip float64 exactly) and says version 2.

Pixels follow corrlab's convention (centre of the top-left pixel at (0, 0)).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import xarray as xr

from ..errors import CorrlabError, FormatError, ShapeError, describe

__all__ = ["ProbeRecord", "RecordBuilder", "RECORD_FORMAT", "RECORD_VERSION", "MATCH_VARIABLES", "CAMERA_VARIABLES"]

RECORD_FORMAT = "corrlab.probe_record"
RECORD_VERSION = 2
#: Earlier versions :meth:`ProbeRecord.load` still reads (converted on load).
READABLE_VERSIONS = (1, 2)
CAMERA_VARIABLES = ("camera_K", "camera_R", "camera_t", "camera_model")
DIMS = ("layer", "step", "src", "tgt", "head", "row", "col")
MATCH_VARIABLES = ("match_row", "match_col", "match_x", "match_y", "confidence", "kept")
_OPTIONAL_ATTRS = ("prompt", "seed", "model")


@dataclass
class _LayerEntry:
    grid: tuple[int, int]
    num_heads: int
    centres: np.ndarray  # (h*w, 2) float64
    steps: dict = field(default_factory=dict)  # step -> (index, confidence, kept) arrays (V, V, H', N)


class RecordBuilder:
    """Collects matches call by call (bounded: small ints/floats per token) and builds the Dataset."""

    def __init__(self, matching: dict, image_size: tuple[int, int] | None = None, batch_index: int | str = "auto"):
        self.matching = dict(matching)
        self.image_size = image_size
        self.batch_index = batch_index if isinstance(batch_index, str) else int(batch_index)
        self.num_images: int | None = None
        self.layers: dict[str, _LayerEntry] = {}
        self.row_wise_layers: list[str] = []
        self.timesteps: dict[int, float] = {}
        self.version = 0  # bumped on every change, so a cached Dataset knows it is stale

    @property
    def nbytes(self) -> int:
        """Bytes held by the recorded matches (index, confidence, kept per layer and step)."""
        return sum(a.nbytes for e in self.layers.values() for arrays in e.steps.values() for a in arrays)

    def add_layer(self, name: str, grid: tuple[int, int], num_heads: int, centres: torch.Tensor | np.ndarray,
                  image_size: tuple[int, int], row_wise: bool = False) -> None:
        """Register a layer: ``grid (h, w)``, ``H'`` matched heads, token ``centres (h*w, 2)`` pixels;
        ``row_wise``: the layer attends row by row (matches lie on the source row)."""
        if name in self.layers:
            return
        if row_wise:
            self.row_wise_layers.append(name)
        centres = np.asarray(torch.as_tensor(centres, dtype=torch.float64).cpu())
        if centres.shape != (grid[0] * grid[1], 2):
            raise ShapeError(f"centres: expected shape ({grid[0] * grid[1]}, 2) for grid {grid}, got {describe(centres)}")
        size = (int(image_size[0]), int(image_size[1]))
        if self.image_size is None:
            self.image_size = size
        elif tuple(self.image_size) != size:
            raise ShapeError(f"image_size: expected {tuple(self.image_size)} like the other layers, got {size} for {name!r}")
        self.layers[name] = _LayerEntry(grid=(int(grid[0]), int(grid[1])), num_heads=int(num_heads), centres=centres)
        self.version += 1

    def add(self, layer: str, step: int, timestep: float | None, src: int, tgts: Sequence[int],
            index: torch.Tensor, confidence: torch.Tensor, kept: torch.Tensor, num_images: int) -> None:
        """Store the matches of source image ``src`` against ``tgts``: each ``(H', T, N)``."""
        entry = self.layers[layer]
        if self.num_images is None:
            self.num_images = int(num_images)
        elif self.num_images != num_images:
            raise ShapeError(f"num_images: expected {self.num_images} like earlier calls, got {num_images} ({layer!r})")
        n = entry.grid[0] * entry.grid[1]
        shape = (entry.num_heads, len(tgts), n)
        if tuple(index.shape) != shape:
            raise ShapeError(f"index: expected shape {shape} for layer {layer!r}, got {describe(index)}")
        if step not in entry.steps:
            v, hp = self.num_images, entry.num_heads
            entry.steps[step] = (
                np.full((v, v, hp, n), -1, dtype=np.int32),
                np.full((v, v, hp, n), np.nan, dtype=np.float32),
                np.zeros((v, v, hp, n), dtype=bool),
            )
        idx, conf, kp = entry.steps[step]
        tg = list(tgts)
        idx[src, tg] = index.to("cpu", torch.int32).numpy().transpose(1, 0, 2)
        conf[src, tg] = confidence.to("cpu", torch.float32).numpy().transpose(1, 0, 2)
        kp[src, tg] = kept.to("cpu").numpy().transpose(1, 0, 2)
        self._stored(step, timestep)

    def add_all(self, layer: str, step: int, timestep: float | None, index: torch.Tensor, confidence: torch.Tensor,
                kept: torch.Tensor) -> None:
        """Store the matches of every ordered image pair at once: each ``(H', V, V, N)`` (source image, target
        image); the diagonal (an image against itself) is not stored. Same result as :meth:`add` per source."""
        entry = self.layers[layer]
        V = int(index.shape[1]) if index.ndim == 4 else -1
        if self.num_images is None and V > 0:
            self.num_images = V
        n = entry.grid[0] * entry.grid[1]
        shape = (entry.num_heads, self.num_images, self.num_images, n)
        if tuple(index.shape) != shape or confidence.shape != index.shape or kept.shape != index.shape:
            raise ShapeError(f"index, confidence, kept: expected shape {shape} for layer {layer!r}, got "
                             f"{describe(index)}, {describe(confidence)}, {describe(kept)}")
        if step in entry.steps:  # earlier sources of this step: merge pair by pair
            for i in range(V):
                tgts = [j for j in range(V) if j != i]
                self.add(layer, step, timestep, i, tgts, index[:, i, tgts], confidence[:, i, tgts],
                         kept[:, i, tgts], V)
            return
        idx = index.to("cpu", torch.int32).numpy().transpose(1, 2, 0, 3).copy()  # (V, V, H', N)
        conf = confidence.to("cpu", torch.float32).numpy().transpose(1, 2, 0, 3).copy()
        kp = kept.to("cpu").numpy().transpose(1, 2, 0, 3).copy()
        diag = np.arange(V)
        idx[diag, diag], conf[diag, diag], kp[diag, diag] = -1, np.nan, False
        entry.steps[step] = (idx, conf, kp)
        self._stored(step, timestep)

    def _stored(self, step: int, timestep: float | None) -> None:
        """Bookkeeping after matches of ``step`` were stored: its timestep (NaN when unknown), a new version."""
        self.timesteps[step] = float("nan") if timestep is None else float(timestep)
        self.version += 1

    def build(self, attrs: dict) -> xr.Dataset:
        """The record's Dataset (see the module docstring)."""
        names = list(self.layers)
        steps = sorted(self.timesteps)
        v = self.num_images or 0
        hmax = max((e.num_heads for e in self.layers.values()), default=0)
        rmax = max((e.grid[0] for e in self.layers.values()), default=0)
        cmax = max((e.grid[1] for e in self.layers.values()), default=0)
        shape = (len(names), len(steps), v, v, hmax, rmax, cmax)
        match_row = np.full(shape, -1, dtype=np.int32)
        match_col = np.full(shape, -1, dtype=np.int32)
        match_x = np.full(shape, np.nan, dtype=np.float32)
        match_y = np.full(shape, np.nan, dtype=np.float32)
        conf = np.full(shape, np.nan, dtype=np.float32)
        kept = np.zeros(shape, dtype=bool)
        src_x = np.full((len(names), rmax, cmax), np.nan)
        src_y = np.full((len(names), rmax, cmax), np.nan)
        step_pos = {s: i for i, s in enumerate(steps)}
        for li, name in enumerate(names):
            e = self.layers[name]
            h, w = e.grid
            src_x[li, :h, :w] = e.centres[:, 0].reshape(h, w)
            src_y[li, :h, :w] = e.centres[:, 1].reshape(h, w)
            for step, (idx, cf, kp) in e.steps.items():
                si = step_pos[step]
                valid = idx >= 0
                safe = np.where(valid, idx, 0)
                grid_shape = idx.shape[:3] + (h, w)
                match_row[li, si, :, :, : e.num_heads, :h, :w] = np.where(valid, safe // w, -1).reshape(grid_shape)
                match_col[li, si, :, :, : e.num_heads, :h, :w] = np.where(valid, safe % w, -1).reshape(grid_shape)
                xy = e.centres[safe]  # (V, V, H', N, 2)
                match_x[li, si, :, :, : e.num_heads, :h, :w] = np.where(valid, xy[..., 0], np.nan).reshape(grid_shape)
                match_y[li, si, :, :, : e.num_heads, :h, :w] = np.where(valid, xy[..., 1], np.nan).reshape(grid_shape)
                conf[li, si, :, :, : e.num_heads, :h, :w] = cf.reshape(grid_shape)
                kept[li, si, :, :, : e.num_heads, :h, :w] = kp.reshape(grid_shape)
        coords = {
            "layer": np.array(names, dtype=str),
            "step": np.array(steps, dtype=np.int64),
            "timestep": ("step", np.array([self.timesteps[s] for s in steps], dtype=np.float64)),
            "src": np.arange(v, dtype=np.int64),
            "tgt": np.arange(v, dtype=np.int64),
            "head": np.arange(hmax, dtype=np.int64),
            "row": np.arange(rmax, dtype=np.int64),
            "col": np.arange(cmax, dtype=np.int64),
            "grid_rows": ("layer", np.array([self.layers[n].grid[0] for n in names], dtype=np.int64)),
            "grid_cols": ("layer", np.array([self.layers[n].grid[1] for n in names], dtype=np.int64)),
            "num_heads": ("layer", np.array([self.layers[n].num_heads for n in names], dtype=np.int64)),
        }
        data = {
            "match_row": (DIMS, match_row), "match_col": (DIMS, match_col),
            "match_x": (DIMS, match_x), "match_y": (DIMS, match_y),
            "confidence": (DIMS, conf), "kept": (DIMS, kept),
            "src_x": (("layer", "row", "col"), src_x), "src_y": (("layer", "row", "col"), src_y),
        }
        size = self.image_size or (0, 0)
        base = {
            "format": RECORD_FORMAT,
            "version": RECORD_VERSION,
            "matching": json.dumps(self.matching, sort_keys=True),
            "image_height": int(size[0]),
            "image_width": int(size[1]),
            "batch_index": self.batch_index,
        }
        if self.row_wise_layers:
            # matches of these layers lie on the source token's row by construction; the row is the
            # epipolar line only for orthographic views at elevation 0 (MV-Adapter's setting)
            base["row_wise_layers"] = json.dumps(self.row_wise_layers)
        return xr.Dataset(data, coords=coords, attrs={**base, **attrs})


class ProbeRecord:
    """Native correspondences of one probed generation (see the module docstring for the layout).

    While a probe is recording, ``ds`` is rebuilt on access from what has been recorded so far.
    """

    def __init__(self, ds: xr.Dataset | None = None, *, builder: RecordBuilder | None = None):
        if (ds is None) == (builder is None):
            raise CorrlabError("ProbeRecord: expected exactly one of ds or builder")
        self._builder = builder
        self._attrs: dict[str, Any] = {}
        self._camera_vars: dict[str, Any] = {}
        self._ds = None
        self._built_version = -1
        if ds is not None:
            _validate(ds, "ds")
            self._ds = ds

    # ------------------------------------------------------------------ access
    @property
    def ds(self) -> xr.Dataset:
        b = self._builder
        if b is not None and b.version != self._built_version:
            self._ds = b.build(self._attrs).assign(self._camera_vars)
            self._built_version = b.version
        return self._ds

    def set_meta(self, prompt: str | None = None, seed: int | None = None, cameras=None, model: str | None = None) -> None:
        """Attach what the probe cannot see: the prompt, seed, cameras (list of ``Camera``) and model name.

        A probe of a ``CorrlabPipeline`` records the generated set's prompt, seed and cameras itself; this is
        for bare models and diffusers pipelines (whose outputs carry no cameras), and for the model name.
        """
        new: dict[str, Any] = {}
        if prompt is not None:
            new["prompt"] = str(prompt)
        if seed is not None:
            new["seed"] = int(seed)
        if model is not None:
            new["model"] = str(model)
        cams = None if cameras is None else camera_variables(cameras)
        if self._builder is not None:
            self._attrs.update(new)
            if cams is not None:
                self._camera_vars = cams
            self._built_version = -1
        else:
            ds = self._ds.assign_attrs(new)
            if cams is not None:
                ds = ds.drop_vars([v for v in (*CAMERA_VARIABLES, "view") if v in ds.variables]).assign(cams)
            self._ds = ds

    @property
    def nbytes(self) -> int:
        """Bytes of the record: the recorder's arrays while recording, else the Dataset's."""
        return self._builder.nbytes if self._builder is not None else int(self.ds.nbytes)

    @property
    def layers(self) -> list[str]:
        return [str(x) for x in self.ds["layer"].values]

    @property
    def steps(self) -> list[int]:
        return [int(x) for x in self.ds["step"].values]

    @property
    def num_images(self) -> int:
        return int(self.ds.sizes["src"])

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of the generated images in pixels."""
        return int(self.ds.attrs["image_height"]), int(self.ds.attrs["image_width"])

    @property
    def matching(self) -> dict:
        return json.loads(self.ds.attrs["matching"])

    @property
    def prompt(self) -> str | None:
        p = self.ds.attrs.get("prompt")
        return None if p is None else str(p)

    @property
    def seed(self) -> int | None:
        s = self.ds.attrs.get("seed")
        return None if s is None else int(s)

    @property
    def cameras(self):
        """The generation's cameras (list of :class:`corrlab.geometry.Camera`), or None if unknown."""
        return cameras_from_dataset(self.ds)

    def require_cameras(self, what: str = "scoring") -> list:
        """:attr:`cameras`, or a :class:`CorrlabError` saying that ``what`` needs them and how to attach them."""
        cams = self.cameras
        if cams is None:
            raise CorrlabError(
                f"cameras: {what} needs the generation's cameras and the record holds none (a probe of a CorrlabPipeline "
                "records them; for other models call rec.set_meta(cameras=...) or pass cameras=...)"
            )
        return cams

    def grid(self, layer: str) -> tuple[int, int]:
        """Token grid ``(h, w)`` of a recorded layer."""
        sel = self._layer(layer)
        return int(sel["grid_rows"]), int(sel["grid_cols"])

    def token_centres(self, layer: str) -> np.ndarray:
        """``(h*w, 2)`` float64 pixel centres of ``layer``'s tokens, row-major."""
        h, w = self.grid(layer)
        sel = self._layer(layer)
        return np.stack([sel["src_x"].values[:h, :w].reshape(-1), sel["src_y"].values[:h, :w].reshape(-1)], axis=1)

    def _layer(self, layer: str) -> xr.Dataset:
        if layer not in self.layers:
            raise CorrlabError(f"layer: expected one of the recorded layers {self.layers}, got {layer!r}")
        return self.ds.sel(layer=layer)

    def to_dataframe(self, kept_only: bool = False) -> pd.DataFrame:
        """Tidy table, one row per (layer, step, src, tgt, head, source token) that has a match.

        Columns: layer, step, timestep, src, tgt, head, row, col, src_x, src_y, match_row, match_col,
        match_x, match_y, confidence, kept.
        """
        ds = self.ds
        cols = ["timestep", "src_x", "src_y", *MATCH_VARIABLES]
        df = ds[[c for c in cols if c != "timestep"]].to_dataframe().reset_index()
        df = df[df["match_row"] >= 0]
        if kept_only:
            df = df[df["kept"]]
        df = df[["layer", "step", "timestep", "src", "tgt", "head", "row", "col", *cols[1:]]]
        return df.reset_index(drop=True)

    def __repr__(self) -> str:
        ds = self.ds
        return (f"ProbeRecord(layers={len(self.layers)}, steps={self.steps}, images={ds.sizes.get('src', 0)}, "
                f"heads={ds.sizes.get('head', 0)}, grid=({ds.sizes.get('row', 0)}, {ds.sizes.get('col', 0)}))")

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Write the record to one netCDF file (h5netcdf engine, gzip), atomically. Returns the path."""
        from ..io_utils import atomic_write

        ds = self.ds
        encoding = {name: {"zlib": True, "complevel": 4} for name in ds.data_vars if ds[name].dtype.kind not in "OUS"}
        return atomic_write(path, lambda tmp: ds.to_netcdf(tmp, engine="h5netcdf", encoding=encoding))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ProbeRecord":
        """Read a record written by :meth:`save`; truncated or foreign files raise ``FormatError``."""
        path = Path(path)
        if not path.is_file():
            raise CorrlabError(f"path: expected an existing probe record file, got {str(path)!r}")
        try:
            with xr.open_dataset(path, engine="h5netcdf") as f:
                ds = f.load()
        except Exception as e:  # h5py/h5netcdf raise many types for damaged files
            raise FormatError(
                f"path: expected a corrlab probe record (netCDF/HDF5), got an unreadable file {str(path)!r} "
                f"({type(e).__name__}: {e})"
            ) from None
        ds = _upgrade(ds, f"path {str(path)!r}")
        _validate(ds, f"path {str(path)!r}")
        return cls(ds)

    def equals(self, other: "ProbeRecord") -> bool:
        """True when both records hold identical values, coordinates and attributes."""
        return isinstance(other, ProbeRecord) and self.ds.identical(other.ds)


def _validate(ds: Any, what: str) -> None:
    if not isinstance(ds, xr.Dataset):
        raise FormatError(f"{what}: expected an xarray.Dataset, got {describe(ds)}")
    fmt = ds.attrs.get("format")
    if fmt != RECORD_FORMAT:
        raise FormatError(f"{what}: expected a dataset with attribute format={RECORD_FORMAT!r}, got format={fmt!r}")
    version = ds.attrs.get("version")
    if version is None or int(version) != RECORD_VERSION:
        raise FormatError(f"{what}: expected {RECORD_FORMAT} version {RECORD_VERSION} (load() also reads versions "
                          f"{list(READABLE_VERSIONS)}), got version {version}")
    if "cameras" in ds.attrs:
        raise FormatError(f"{what}: expected the cameras as variables {list(CAMERA_VARIABLES)} (version "
                          f"{RECORD_VERSION}), got a JSON attribute 'cameras' (version 1 layout)")
    present = [v for v in CAMERA_VARIABLES if v in ds.variables]
    if present and len(present) != len(CAMERA_VARIABLES):
        raise FormatError(f"{what}: expected all of {list(CAMERA_VARIABLES)} or none, got {present}")
    missing = [v for v in (*MATCH_VARIABLES, "src_x", "src_y") if v not in ds.variables]
    missing += [c for c in ("timestep", "grid_rows", "grid_cols", "num_heads") if c not in ds.coords]
    if missing:
        raise FormatError(f"{what}: expected variables {list(MATCH_VARIABLES)} and coords, missing {missing}")
    for v in MATCH_VARIABLES:
        if tuple(ds[v].dims) != DIMS:
            raise FormatError(f"{what}: expected {v} on dims {DIMS}, got {tuple(ds[v].dims)}")


def camera_variables(cameras) -> dict[str, Any]:
    """The record's camera variables (see the module docstring) of a list of :class:`~corrlab.geometry.Camera`,
    with the ``view`` coordinate (0..V-1, so records with different view counts align)."""
    from ..geometry import Camera

    cams = list(cameras) if isinstance(cameras, (list, tuple)) else None
    if not cams or not all(isinstance(c, Camera) for c in cams):
        raise CorrlabError(f"cameras: expected a non-empty list of corrlab.geometry.Camera, got {describe(cameras)}")
    return {
        "camera_K": (("view", "mat_row", "mat_col"), np.stack([c.K.numpy() for c in cams]).astype(np.float64)),
        "camera_R": (("view", "mat_row", "mat_col"), np.stack([c.R.numpy() for c in cams]).astype(np.float64)),
        "camera_t": (("view", "mat_row"), np.stack([c.t.numpy() for c in cams]).astype(np.float64)),
        "camera_model": (("view",), np.array([c.model for c in cams], dtype=str)),
        "view": np.arange(len(cams), dtype=np.int64),
    }


def cameras_from_dataset(ds: xr.Dataset):
    """The cameras stored in a record's Dataset (list of :class:`~corrlab.geometry.Camera`), or None."""
    from ..geometry import Camera

    if "camera_K" not in ds.variables:
        return None
    K, R, t = (np.asarray(ds[v].values, dtype=np.float64) for v in ("camera_K", "camera_R", "camera_t"))
    models = [str(m) for m in np.asarray(ds["camera_model"].values).reshape(-1)]
    return [Camera(K=torch.from_numpy(K[i].copy()), R=torch.from_numpy(R[i].copy()), t=torch.from_numpy(t[i].copy()),
                   model=models[i]) for i in range(len(models))]


def _upgrade(ds: xr.Dataset, what: str) -> xr.Dataset:
    """A version 1 record in the version 2 layout: its ``cameras`` JSON attribute becomes the camera variables."""
    if ds.attrs.get("format") != RECORD_FORMAT or ds.attrs.get("version") is None:
        return ds  # _validate names what is wrong
    try:
        version = int(ds.attrs["version"])
    except (TypeError, ValueError):
        return ds
    if version != 1:
        return ds
    from ..geometry import Camera

    attrs = dict(ds.attrs)
    text = attrs.pop("cameras", None)
    attrs["version"] = RECORD_VERSION
    ds = ds.copy()
    ds.attrs = attrs
    if text is None:
        return ds
    try:
        cams = [Camera.from_dict(d) for d in json.loads(text)]
    except (ValueError, TypeError, CorrlabError) as e:
        raise FormatError(f"{what}: a version 1 record whose 'cameras' attribute is not a JSON list of cameras ({e})") from None
    return ds.assign(camera_variables(cams))
