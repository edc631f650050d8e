"""``corrlab.sweep(spec, out, ...)``: run a sweep into a store and return a :class:`SweepHandle`."""
from __future__ import annotations

import threading
import time
from pathlib import Path

from ..errors import CorrlabError
from .engines import make_engine
from .spec import load_spec
from .store import SweepStore

__all__ = ["sweep", "SweepHandle"]


class SweepHandle:
    """A running or finished sweep.

    Attributes:
        store: the :class:`~corrlab.sweeps.store.SweepStore`.
        items: the sweep's :class:`~corrlab.sweeps.spec.SweepItem` list; ``keys`` their keys.
        stats: ``total``, ``skipped`` (complete before this run), ``redone`` (found incomplete or
            corrupted and redone), ``computed`` (committed by this run), ``retried``, ``failed``.
        events: one dict per finished attempt (``key``, ``status`` done/retry/failed, ``attempt``,
            ``worker``, ``pid``, ``seconds``, ``error``).
        failures: key -> error of items that failed after every retry.
        workers: worker id -> ``{"pid", "key"}`` (the item in flight, None when idle).
    """

    def __init__(self, spec, store: SweepStore, items, engine, progress: bool = True, on_item=None):
        self.spec, self.store, self.items = spec, store, list(items)
        self.keys = [it.key for it in self.items]
        self.engine = engine
        self.stats = {"total": len(self.items), "skipped": 0, "redone": 0, "computed": 0, "retried": 0, "failed": 0}
        self.events: list[dict] = []
        self.failures: dict[str, str] = {}
        self.workers: dict[int, dict] = {}
        self.on_item = on_item
        self._progress = progress
        self._bar = None
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.done = False
        self.seconds = None

    # ------------------------------------------------------------------ engine callbacks
    def _set_worker(self, wid: int, **fields) -> None:
        with self._lock:
            self.workers.setdefault(wid, {"pid": None, "key": None})
            self.workers[wid].update(fields)

    def _event(self, item, status: str, attempt: int, worker=None, result=None, error=None, traceback=None) -> None:
        with self._lock:
            ev = {"key": item.key, "status": status, "attempt": attempt, "worker": worker,
                  "pid": (result or {}).get("pid"), "seconds": (result or {}).get("seconds"), "error": error,
                  "time": time.time()}
            if traceback:
                ev["traceback"] = traceback
            self.events.append(ev)
            if status == "done":
                self.stats["computed"] += 1
                if self._bar is not None:
                    self._bar.update(1)
            elif status == "retry":
                self.stats["retried"] += 1
            elif status == "failed":
                self.stats["failed"] += 1
                self.failures[item.key] = error
                if self._bar is not None:
                    self._bar.update(1)
        if self.on_item is not None:
            self.on_item(self, ev)

    # ------------------------------------------------------------------ running
    def _run(self) -> None:
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        try:
            self.store.clean_tmp()
            todo = []
            for it in self.items:
                if self.store.is_complete(it.key, "sha256"):
                    self.stats["skipped"] += 1
                    continue
                if self.store.item_dir(it.key).exists() or self.store.fragment(it.key).exists():
                    self.store.discard(it.key)  # half-written or corrupted: redo
                    self.stats["redone"] += 1
                todo.append(it)
            self.todo = [it.key for it in todo]
            self._bar = tqdm(total=len(self.items), initial=self.stats["skipped"], desc=f"sweep ({self.engine.name})",
                             unit="item", disable=not self._progress)
            try:
                if todo:
                    self.engine.run(self, todo)
            finally:
                self._bar.close()
                self.store.clean_tmp(set(self.keys))
        except BaseException as e:
            self._error = e
            raise
        finally:
            self.seconds = time.perf_counter() - t0
            self.done = True

    def _start_background(self) -> None:
        def target():
            try:
                self._run()
            except BaseException:  # noqa: BLE001 - kept in self._error, re-raised by wait()
                pass

        self._thread = threading.Thread(target=target, name="corrlab-sweep", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> "SweepHandle":
        """Block until the sweep is finished (``block=False``); re-raises the sweep's error, if any."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"timeout: the sweep is still running after {timeout} s")
        if self._error is not None:
            raise self._error
        return self

    # ------------------------------------------------------------------ results
    def open(self, verify: str = "size", all_items: bool = False):
        """The sweep's results as a :class:`~corrlab.sweeps.result.SweepResult` (lazy dataset + score table).

        Only this sweep's items by default; ``all_items=True`` opens everything complete in the store.
        """
        from .result import open_sweep

        return open_sweep(self.store.root, keys=None if all_items else self.keys, verify=verify)

    def __repr__(self) -> str:
        state = "done" if self.done else "running"
        s = ", ".join(f"{k}={v}" for k, v in self.stats.items())
        return f"SweepHandle({str(self.store.root)!r}, engine={self.engine.name!r}, {state}, {s})"


def sweep(spec, out, *, engine: str = "local", resume: bool = False, address: str | None = None,
          workers: int | None = None, gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0,
          max_retries: int = 2, device: str | None = None, threads: int | None = None, progress: bool = True,
          block: bool = True, on_item=None, init_kwargs: dict | None = None) -> SweepHandle:
    """Run every item of a sweep spec into the store ``out`` (see :mod:`corrlab.sweeps`).

    Args:
        spec: a ``.toml`` path, a dict of the same shape, or a loaded :class:`SweepSpec`. Validated
            completely (keys, grids, models, layers) before any work starts.
        out: the store folder (new or empty; an existing store needs ``resume=True``).
        engine: ``"local"`` (this process) or ``"ray"`` (actors; ``pip install corrlab[ray]``).
        resume: continue an existing store: complete items (checksums verified) are skipped,
            half-written or corrupted ones redone.
        address, workers, gpus_per_worker, cpus_per_worker: Ray options (see :class:`RayEngine`).
        max_retries: retries per item (failed task or dead worker) before it is reported as failed.
        device: local engine: ``"cpu"``/``"cuda"`` (default: cuda if available).
        threads: local engine: torch CPU threads (default: unchanged).
        progress: show a progress bar (tqdm: a terminal bar, an ipywidgets bar in a notebook).
        block: False runs in a background thread; ``handle.wait()`` joins it.
        on_item: ``callback(handle, event)`` after every finished attempt (in the driver).

    Returns:
        A :class:`SweepHandle` (``.stats``, ``.events``, ``.failures``, ``.open()``).
    """
    s = load_spec(spec)
    items = s.items()
    eng = make_engine(engine, address=address, workers=workers, gpus_per_worker=gpus_per_worker,
                      cpus_per_worker=cpus_per_worker, max_retries=max_retries, device=device, threads=threads,
                      init_kwargs=init_kwargs)
    if not isinstance(out, (str, Path)):
        raise CorrlabError(f"out: expected a folder path for the sweep store, got {type(out).__name__}")
    store = SweepStore(out).create(resume)
    store.save_spec(s)
    handle = SweepHandle(s, store, items, eng, progress=progress, on_item=on_item)
    if block:
        handle._run()
    else:
        handle._start_background()
    return handle
