"""Sweeps: many generation runs from one spec, on this machine or on Ray, into one labelled store.

>>> h = corrlab.sweep("examples/sweep_small.toml", "out/sweep")                 # doctest: +SKIP
>>> h = corrlab.sweep(spec, "out/sweep", engine="ray", gpus_per_worker=0.5)     # doctest: +SKIP
>>> res = corrlab.open_sweep("out/sweep")        # or h.open()                   # doctest: +SKIP
>>> res.ds          # lazy xarray over all items (dask), labels as item coords  # doctest: +SKIP
>>> res.scores      # tidy score table, one row per item x method x layer x step x pair x threshold
>>> AccuracyDashboard.from_sweep(res, where={"intervention": "none"})            # doctest: +SKIP

* :mod:`.spec`: the TOML spec, its validation (before any work) and its expansion into items, each keyed
  by a hash of its full configuration (weights' hash included).
* :mod:`.store`: one folder per item + one parquet fragment per item, marker written last, checksums.
* :mod:`.worker`: one item end to end (generate with probing and an intervention, score, commit).
* :mod:`.engines`: ``local`` and ``ray`` (actors that keep a pipeline loaded, retries, worker loss).
* :mod:`.run`: :func:`sweep` and :class:`SweepHandle`; :mod:`.result`: :func:`open_sweep`.
"""
from .engines import LocalEngine, RayEngine, make_engine
from .result import SweepResult, open_sweep
from .run import SweepHandle, sweep
from .spec import SpecError, SweepItem, SweepSpec, load_spec
from .store import SweepStore
from .worker import ItemRunner, score_item

__all__ = [
    "sweep",
    "open_sweep",
    "load_spec",
    "SweepHandle",
    "SweepResult",
    "SweepSpec",
    "SweepItem",
    "SweepStore",
    "SpecError",
    "ItemRunner",
    "LocalEngine",
    "RayEngine",
    "make_engine",
    "score_item",
]
