"""The sweep store: one folder per item, one parquet fragment per item, a completion marker written last.

Layout::

    STORE/corrlab-sweep.json           {"format": "corrlab.sweep_store", "version": 1}
    STORE/specs/<spec hash>.json       every spec run into the store (normalised)
    STORE/items/<key>/                 one generation run: a corrlab set (view_XX.png, cameras.json)
                                       + record.nc (the probe record, netCDF) + item.json (marker)
    STORE/manifest/<key>.parquet       the item's scores with its labels (tidy rows)

Why one netCDF per item instead of a zarr group per item: the probe record already is a netCDF file
with its own reader and validation, every item folder stays a set that ``corrlab score DIR`` reads, xarray
opens it lazily with dask chunks, and it adds no dependency. Writers never share a file: a worker
writes the whole item into ``items/.tmp-<key>-<random>/``, writes ``item.json`` (the configuration and
the SHA-256 and size of every file, and of the manifest fragment) last, renames the folder into place
(atomic on POSIX), then writes ``manifest/<key>.parquet`` through a temporary file and ``os.replace``.

An item is complete when ``item.json`` exists, every file it lists has its size (``verify="size"``) or
its checksum (``verify="sha256"``), and the fragment matches. Anything else (a worker killed mid-item,
a truncated or altered file) is incomplete, and a resumed sweep redoes it.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import pandas as pd

from ..errors import CorrlabError, FormatError
from ..io_utils import atomic_write_bytes, atomic_write_text

__all__ = ["SweepStore", "STORE_FORMAT", "STORE_VERSION"]

STORE_FORMAT = "corrlab.sweep_store"
STORE_VERSION = 1
MARKER = "item.json"
HEADER = "corrlab-sweep.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class SweepStore:
    """A sweep store folder (see the module docstring)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # ------------------------------------------------------------------ paths
    @property
    def items_dir(self) -> Path:
        return self.root / "items"

    @property
    def manifest_dir(self) -> Path:
        return self.root / "manifest"

    def item_dir(self, key: str) -> Path:
        return self.items_dir / key

    def fragment(self, key: str) -> Path:
        return self.manifest_dir / f"{key}.parquet"

    # ------------------------------------------------------------------ creation
    def is_store(self) -> bool:
        return (self.root / HEADER).is_file()

    def check(self) -> "SweepStore":
        """Raise unless ``root`` is a sweep store of this version."""
        f = self.root / HEADER
        if not f.is_file():
            raise CorrlabError(f"store: expected a sweep store (folder with {HEADER}), got {str(self.root)!r}")
        try:
            header = json.loads(f.read_text())
        except ValueError:
            raise FormatError(f"store: {str(f)!r} is not JSON") from None
        if header.get("format") != STORE_FORMAT or header.get("version") != STORE_VERSION:
            raise FormatError(f"store: expected format {STORE_FORMAT} version {STORE_VERSION}, got {header}")
        return self

    def create(self, resume: bool) -> "SweepStore":
        """Make the store folder; an existing store needs ``resume``; a foreign non-empty folder raises."""
        if self.root.exists():
            if not self.root.is_dir():
                raise CorrlabError(f"out: expected a folder for the sweep store, got a file {str(self.root)!r}")
            if self.is_store():
                self.check()
                if not resume:
                    raise CorrlabError(f"out: {str(self.root)!r} already holds a sweep store; pass --resume "
                                       "(resume=True) to continue it, or choose a new --out")
            elif any(self.root.iterdir()):
                raise CorrlabError(f"out: expected a new or empty folder (or a sweep store), got a non-empty folder "
                                   f"{str(self.root)!r}")
        self.items_dir.mkdir(parents=True, exist_ok=True)
        self.manifest_dir.mkdir(parents=True, exist_ok=True)
        (self.root / "specs").mkdir(exist_ok=True)
        if not self.is_store():
            atomic_write_text(self.root / HEADER, json.dumps({"format": STORE_FORMAT, "version": STORE_VERSION}))
        return self

    def save_spec(self, spec) -> None:
        atomic_write_text(self.root / "specs" / f"{spec.hash[:16]}.json",
                          json.dumps({"source": spec.source, "models": spec.models, **spec.to_dict()}, indent=1))

    # ------------------------------------------------------------------ items
    def new_tmp(self, key: str) -> Path:
        d = self.items_dir / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        d.mkdir(parents=True)
        return d

    def commit(self, key: str, tmp: Path, config: dict, labels: dict, scores: pd.DataFrame, info: dict) -> bool:
        """Finish an item written into ``tmp``: marker last, rename into place, then the fragment.

        Returns False (and discards ``tmp``) when a complete item with this key is already there.
        """
        fragment = _fragment_bytes(key, labels, scores)
        files = {}
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                files[f.relative_to(tmp).as_posix()] = {"size": f.stat().st_size, "sha256": _sha256(f)}
        marker = {"key": key, "config": config, "labels": labels, "files": files,
                  "manifest": {"size": len(fragment), "sha256": hashlib.sha256(fragment).hexdigest()},
                  "written_unix": time.time(), **info}
        atomic_write_text(tmp / MARKER, json.dumps(marker, indent=1, default=str))
        target = self.item_dir(key)
        if target.exists():
            if self.is_complete(key, "sha256"):
                shutil.rmtree(tmp, ignore_errors=True)
                return False
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        atomic_write_bytes(self.fragment(key), fragment)
        return True

    def marker(self, key: str) -> dict | None:
        f = self.item_dir(key) / MARKER
        try:
            return json.loads(f.read_text())
        except (OSError, ValueError):
            return None

    def is_complete(self, key: str, verify: str = "sha256") -> bool:
        """True when the item's marker, files and fragment check out (``verify``: ``"size"`` or ``"sha256"``)."""
        if verify not in ("size", "sha256"):
            raise CorrlabError(f"verify: expected 'size' or 'sha256', got {verify!r}")
        m = self.marker(key)
        if m is None or m.get("key") != key:
            return False
        d = self.item_dir(key)
        checks = [(d / name, meta) for name, meta in m.get("files", {}).items()]
        checks.append((self.fragment(key), m.get("manifest", {})))
        for path, meta in checks:
            try:
                if path.stat().st_size != meta.get("size"):
                    return False
            except OSError:
                return False
            if verify == "sha256" and _sha256(path) != meta.get("sha256"):
                return False
        return True

    def keys(self) -> list[str]:
        """Keys with a marker in ``items/`` (complete or not), sorted."""
        if not self.items_dir.is_dir():
            return []
        return sorted(p.name for p in self.items_dir.iterdir() if not p.name.startswith(".") and (p / MARKER).exists())

    def complete_keys(self, verify: str = "size") -> list[str]:
        return [k for k in self.keys() if self.is_complete(k, verify)]

    def discard(self, key: str) -> None:
        """Remove an incomplete item (its folder and fragment) so it is redone."""
        if self.fragment(key).exists():
            self.fragment(key).unlink()
        shutil.rmtree(self.item_dir(key), ignore_errors=True)

    def clean_tmp(self, keys=None) -> int:
        """Remove half-written ``items/.tmp-*`` folders (of ``keys``, or all); returns how many."""
        n = 0
        if not self.items_dir.is_dir():
            return 0
        for p in self.items_dir.glob(".*tmp-*"):  # ours, and save_set's sibling temporaries inside them
            m = re.match(r"^\.+tmp-([0-9a-f]+)-", p.name)
            if m is None:
                continue
            if keys is None or m.group(1) in keys:
                shutil.rmtree(p, ignore_errors=True)
                n += 1
        for p in self.manifest_dir.glob(".*.tmp"):
            if keys is None:
                p.unlink(missing_ok=True)
        return n


def _fragment_bytes(key: str, labels: dict, scores: pd.DataFrame) -> bytes:
    df = scores.copy()
    front = {"key": key, **labels}
    for i, (k, v) in enumerate(front.items()):
        df.insert(i, k, [v] * len(df))
    for c in ("layer", "note", "kind", "method", "prompt", "model", "intervention", "cameras", "layout"):
        if c in df.columns:
            df[c] = df[c].astype(object).where(df[c].notna(), None)
            df[c] = df[c].map(lambda x: None if x is None else str(x))
    for c in ("step", "src", "tgt"):
        if c in df.columns:
            df[c] = pd.array([None if pd.isna(x) else int(x) for x in df[c]], dtype="Int64")
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()

