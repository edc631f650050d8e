"""``corrlab.open_sweep(STORE)``: every complete item as one lazy labelled dataset and one tidy table."""
from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import CorrlabError
from .store import SweepStore

__all__ = ["open_sweep", "SweepResult"]

_FILL = {"match_row": -1, "match_col": -1, "kept": False, "grid_rows": -1, "grid_cols": -1, "num_heads": 0,
         "camera_model": ""}


def _label_array(values: list):
    """A label column: numbers as float (NaN for missing), ints as int64, anything else as objects."""
    present = [v for v in values if v is not None and not (isinstance(v, float) and np.isnan(v))]
    if present and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in present):
        if len(present) == len(values):
            return np.asarray(values, dtype=np.int64)
        return np.asarray([np.nan if v is None else float(v) for v in values])
    if present and all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in present):
        return np.asarray([np.nan if v is None else float(v) for v in values])
    return np.asarray([None if v is None else str(v) for v in values], dtype=object)


class SweepResult:
    """The complete items of a sweep store.

    Attributes:
        store: the :class:`~corrlab.sweeps.store.SweepStore`.
        keys: the item keys opened (sorted).
        items: DataFrame indexed by key: the item labels (model, prompt, seed, views, cameras, num_steps,
            guidance, intervention, intervention_*), and worker/seconds of its run.
        ds: (lazy, built on first access) one ``xarray.Dataset`` over all items: the probe records'
            variables with a leading ``item`` dim (dask arrays, one chunk per item), padded to the largest
            grid / view count (``match_row``/``match_col`` -1, ``kept`` False, floats NaN), the labels as
            ``item`` coords, per-item ``timestep(item, step)`` and the cameras ``camera_K``, ``camera_R``
            ``(item, view, 3, 3)``, ``camera_t`` ``(item, view, 3)``, ``camera_model`` ``(item, view)`` (``""`` padding).
        scores: tidy score table, one row per (item, method, layer, step, src, tgt, threshold), with the
            item's labels as columns (see :func:`corrlab.sweeps.worker.score_item`).
    """

    def __init__(self, store: SweepStore, keys: list[str]):
        self.store = store
        self.keys = sorted(keys)
        markers = {k: store.marker(k) for k in self.keys}
        rows = []
        for k in self.keys:
            m = markers[k]
            rows.append({"key": k, **m["labels"], "pid": m.get("worker", {}).get("pid"),
                         "seconds": m.get("seconds", {}).get("total")})
        self.items = pd.DataFrame(rows).set_index("key") if rows else pd.DataFrame()
        self._markers = markers

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return f"SweepResult({str(self.store.root)!r}, items={len(self.keys)})"

    def item_dir(self, key: str) -> Path:
        """The item's folder: a corrlab set (``load_set``) with ``record.nc``."""
        if key not in self._markers:
            raise CorrlabError(f"key: expected one of the {len(self.keys)} opened items, got {key!r}")
        return self.store.item_dir(key)

    def config(self, key: str) -> dict:
        """The item's full configuration (what its key hashes)."""
        self.item_dir(key)
        return self._markers[key]["config"]

    def record(self, key: str):
        """The item's :class:`~corrlab.probing.ProbeRecord` (loaded)."""
        from ..probing import ProbeRecord

        return ProbeRecord.load(self.item_dir(key) / "record.nc")

    def set(self, key: str):
        """The item's generated :class:`~corrlab.sets.MultiViewSet`."""
        from ..sets import load_set

        return load_set(self.item_dir(key))

    @cached_property
    def scores(self) -> pd.DataFrame:
        if not self.keys:
            return pd.DataFrame()
        frames = [pd.read_parquet(self.store.fragment(k)) for k in self.keys]
        return pd.concat(frames, ignore_index=True)

    @cached_property
    def ds(self):
        import xarray as xr

        if not self.keys:
            raise CorrlabError(f"store: no complete item in {str(self.store.root)!r}")
        parts = []
        for k in self.keys:
            d = xr.open_dataset(self.item_dir(k) / "record.nc", engine="h5netcdf", chunks={})
            d = d.reset_coords([c for c in ("timestep", "grid_rows", "grid_cols", "num_heads") if c in d.coords])
            d.attrs = {a: d.attrs[a] for a in ("format", "version", "matching", "batch_index") if a in d.attrs}
            parts.append(d.expand_dims(item=[k]))
        fill = {name: _FILL.get(name, np.nan) for name in parts[0].data_vars}
        ds = xr.concat(parts, dim="item", join="outer", data_vars="all", coords="different", compat="equals",
                       fill_value=fill, combine_attrs="drop_conflicts")
        for name, value in _FILL.items():  # the outer join promotes ints/bools to float: restore them
            if name in ds and ds[name].dtype.kind == "f":
                ds[name] = ds[name].fillna(value).astype(type(value) if not isinstance(value, bool) else bool)
        labels = self.items.drop(columns=["pid", "seconds"], errors="ignore")
        for col in labels.columns:
            ds = ds.assign_coords({col: ("item", _label_array(list(labels.loc[self.keys, col])))})
        ds.attrs["store"] = str(self.store.root)
        return ds

    def table(self, where: dict | None = None, **eq) -> pd.DataFrame:
        """The score rows whose label columns match: ``where``/``eq`` map a column to a value or a list."""
        cond = {**(where or {}), **eq}
        df = self.scores
        for col, value in cond.items():
            if col not in df.columns:
                raise CorrlabError(f"{col}: expected one of the score table's columns {list(df.columns)}")
            values = value if isinstance(value, (list, tuple, set)) else [value]
            df = df[df[col].isin(list(values))]
        return df.reset_index(drop=True)



def open_sweep(store: str | os.PathLike, keys: list[str] | None = None, verify: str = "size") -> SweepResult:
    """Open a sweep store: every complete item (or the complete ones among ``keys``).

    ``verify``: ``"size"`` (default, cheap) or ``"sha256"`` (reads every file) decides what counts as
    complete; incomplete items are left out (a resumed sweep redoes them).
    """
    s = SweepStore(store).check()
    complete = set(s.complete_keys(verify))
    chosen = sorted(complete if keys is None else [k for k in dict.fromkeys(keys) if k in complete])
    return SweepResult(s, chosen)
