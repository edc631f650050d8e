"""Executors of a sweep: ``local`` (this process, one item after another) and ``ray`` (actors).

Ray (``pip install corrlab[ray]``): ``workers`` actors, each reserving ``num_cpus=cpus_per_worker`` and
``num_gpus=gpus_per_worker`` (fractional: 0.5 puts two actors on one GPU), each loading a pipeline once
and computing many items. The driver hands every idle actor the next item (so fast workers take more:
no static split), and keeps at most one item in flight per actor. An item whose task raises is
retried (``max_retries`` times, then reported as failed); an actor that dies (process killed, node lost)
is replaced by a new one and its in-flight item is put back in the queue (that counts as a retry).
Items a dead worker had already committed stay: commits are atomic and independent.
"""
from __future__ import annotations

import os
import traceback
from collections import deque

from ..errors import CorrlabError
from .worker import ItemRunner

__all__ = ["LocalEngine", "RayEngine", "make_engine"]


def _describe_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:400]}"


class LocalEngine:
    """Items one after another in this process (``threads``: torch CPU threads, None = unchanged)."""

    name = "local"

    def __init__(self, device: str | None = None, threads: int | None = None, max_retries: int = 1):
        self.device, self.threads, self.max_retries = device, threads, max_retries

    def run(self, handle, items) -> None:
        runner = ItemRunner(handle.store.root, self.device, self.threads)
        handle._set_worker(0, pid=os.getpid(), key=None)
        for item in items:
            attempt = 0
            while True:
                attempt += 1
                handle._set_worker(0, pid=os.getpid(), key=item.key)
                try:
                    result = runner.run(item.key, item.config, item.labels)
                except Exception as e:  # noqa: BLE001 - any failure of one item is retried, then reported
                    if attempt <= self.max_retries:
                        handle._event(item, "retry", attempt, worker=0, error=_describe_error(e))
                        continue
                    handle._event(item, "failed", attempt, worker=0, error=_describe_error(e),
                                  traceback=traceback.format_exc())
                    break
                handle._event(item, "done", attempt, worker=0, result=result)
                break
        handle._set_worker(0, pid=os.getpid(), key=None)


_ACTOR = None


def _actor_class():
    global _ACTOR
    if _ACTOR is None:
        import ray

        class SweepActor:
            """A Ray actor holding an :class:`ItemRunner` (pipelines stay loaded between items)."""

            def __init__(self, store: str, device: str | None, threads: int | None):
                self.runner = ItemRunner(store, device, threads)

            def pid(self) -> int:
                return os.getpid()

            def run(self, key: str, config: dict, labels: dict) -> dict:
                return self.runner.run(key, config, labels)

        _ACTOR = ray.remote(SweepActor)
    return _ACTOR


def _import_ray():
    try:
        import ray
    except ImportError:
        raise CorrlabError("engine: 'ray' needs Ray; install it with `pip install corrlab[ray]` "
                           "(or use engine='local')") from None
    return ray


class RayEngine:
    """Items on Ray actors (see the module docstring).

    Args:
        address: Ray cluster address (``"auto"``, ``"ray://host:10001"``, ...); None: connect to the running
            ``ray.init`` of this process, else start a local cluster (shut down afterwards).
        workers: number of actors (default: what the cluster's GPUs or CPUs hold, at most the items).
        gpus_per_worker: ``num_gpus`` per actor (fractional allowed); > 0 runs the model on CUDA.
        cpus_per_worker: ``num_cpus`` per actor; also the actor's torch CPU threads.
        max_retries: retries per item after a failed task or a dead worker.
        init_kwargs: extra ``ray.init`` arguments when this engine starts the cluster.
    """

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None, gpus_per_worker: float = 0.0,
                 cpus_per_worker: float = 1.0, max_retries: int = 2, init_kwargs: dict | None = None,
                 max_replacements: int | None = None):
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise CorrlabError(f"workers: expected a positive int (or None), got {workers!r}")
        if not isinstance(gpus_per_worker, (int, float)) or gpus_per_worker < 0:
            raise CorrlabError(f"gpus_per_worker: expected a number >= 0 (fractions share a GPU), got {gpus_per_worker!r}")
        if not isinstance(cpus_per_worker, (int, float)) or cpus_per_worker <= 0:
            raise CorrlabError(f"cpus_per_worker: expected a number > 0, got {cpus_per_worker!r}")
        self.address, self.workers = address, workers
        self.gpus_per_worker, self.cpus_per_worker = float(gpus_per_worker), float(cpus_per_worker)
        self.max_retries = max_retries
        self.init_kwargs = dict(init_kwargs or {})
        self.max_replacements = max_replacements

    def _n_workers(self, ray, n_items: int) -> int:
        if self.workers is not None:
            return min(self.workers, max(n_items, 1))
        res = ray.cluster_resources()
        if self.gpus_per_worker > 0:
            n = int(res.get("GPU", 0) // self.gpus_per_worker)
            if n < 1:
                raise CorrlabError(f"gpus_per_worker: the cluster has {res.get('GPU', 0)} GPUs, expected at least "
                                   f"{self.gpus_per_worker} for one worker")
        else:
            n = max(1, int(res.get("CPU", 1) // self.cpus_per_worker))
        return min(n, max(n_items, 1))

    def run(self, handle, items) -> None:
        ray = _import_ray()
        started = False
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "log_to_driver": False, **self.init_kwargs}
            if self.address is not None:
                kwargs["address"] = self.address
            try:
                ray.init(**kwargs)
            except Exception as e:  # noqa: BLE001 - Ray raises bare Exceptions for start-up failures
                ray.shutdown()
                where = f"the cluster at {self.address!r}" if self.address else "a local Ray cluster"
                raise CorrlabError(
                    f"address: could not start or reach {where} ({type(e).__name__}: {e}). On a heavily loaded "
                    "machine the raylet can time out waiting for its agents: start one with `ray start --head "
                    "--num-cpus N` and pass --address auto, or use --engine local") from e
            started = True
        try:
            self._run(ray, handle, list(items))
        finally:
            if started:
                ray.shutdown()

    def _run(self, ray, handle, items) -> None:
        from ray.exceptions import RayTaskError

        n = self._n_workers(ray, len(items))
        device = "cuda" if self.gpus_per_worker > 0 else "cpu"
        threads = max(1, int(self.cpus_per_worker))
        opts = dict(num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker, max_restarts=0,
                    max_task_retries=0)
        actor_cls = _actor_class()
        store = str(handle.store.root.resolve())
        replacements_left = self.max_replacements if self.max_replacements is not None else (
            n + len(items) * (self.max_retries + 1))

        actors: dict[int, object] = {}
        next_id = 0

        def spawn() -> int:
            nonlocal next_id
            wid = next_id
            next_id += 1
            actors[wid] = actor_cls.options(**opts).remote(store, device, threads)
            handle._set_worker(wid, pid=None, key=None)
            pid_refs[actors[wid].pid.remote()] = wid
            return wid

        pid_refs: dict = {}
        idle = deque()
        for _ in range(n):
            idle.append(spawn())
        queue = deque((item, 1) for item in items)
        inflight: dict = {}  # ref -> (wid, item, attempt)
        try:
            while queue or inflight:
                while queue and idle:
                    wid = idle.popleft()
                    item, attempt = queue.popleft()
                    ref = actors[wid].run.remote(item.key, item.config, item.labels)
                    inflight[ref] = (wid, item, attempt)
                    handle._set_worker(wid, key=item.key)
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5)
                if pid_refs:  # which process each actor is (after the wait: known before its items finish)
                    ready_pids, _ = ray.wait(list(pid_refs), num_returns=len(pid_refs), timeout=0)
                    for r in ready_pids:
                        wid = pid_refs.pop(r)
                        try:
                            handle._set_worker(wid, pid=ray.get(r))
                        except Exception:  # noqa: BLE001 - a dead actor: its run() call reports it
                            pass
                for ref in ready:
                    wid, item, attempt = inflight.pop(ref)
                    try:
                        result = ray.get(ref)
                    except RayTaskError as e:  # the item raised; the actor is fine
                        handle._set_worker(wid, key=None)
                        idle.append(wid)
                        self._retry(handle, queue, item, attempt, wid, e.cause if e.cause is not None else e)
                        continue
                    except Exception as e:  # noqa: BLE001 - the actor died (or is unreachable): replace it
                        handle._set_worker(wid, key=None, dead=True)
                        try:
                            ray.kill(actors.pop(wid))
                        except Exception:  # noqa: BLE001
                            pass
                        self._retry(handle, queue, item, attempt, wid, e)
                        if replacements_left <= 0:
                            raise CorrlabError("ray: workers keep dying; stopping (see the sweep's events)") from e
                        replacements_left -= 1
                        idle.append(spawn())
                        continue
                    handle._set_worker(wid, key=None)
                    idle.append(wid)
                    handle._event(item, "done", attempt, worker=wid, result=result)
        finally:
            for a in actors.values():
                try:
                    ray.kill(a)
                except Exception:  # noqa: BLE001
                    pass

    def _retry(self, handle, queue, item, attempt, wid, error) -> None:
        if attempt <= self.max_retries:
            handle._event(item, "retry", attempt, worker=wid, error=_describe_error(error))
            queue.append((item, attempt + 1))
        else:
            handle._event(item, "failed", attempt, worker=wid, error=_describe_error(error))


def make_engine(engine: str, *, address=None, workers=None, gpus_per_worker=0.0, cpus_per_worker=1.0,
                max_retries=2, device=None, threads=None, init_kwargs=None):
    """An engine by name (``"local"`` or ``"ray"``); options that the engine cannot use raise."""
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise CorrlabError(f"max_retries: expected an int >= 0, got {max_retries!r}")
    if engine == "local":
        unused = [n for n, v in (("address", address), ("workers", workers)) if v is not None]
        unused += ["gpus_per_worker"] if gpus_per_worker else []
        if unused:
            raise CorrlabError(f"{', '.join(unused)}: expected only with engine='ray', got them with engine='local'")
        return LocalEngine(device=device, threads=threads, max_retries=max_retries)
    if engine == "ray":
        _import_ray()
        return RayEngine(address=address, workers=workers, gpus_per_worker=gpus_per_worker,
                         cpus_per_worker=cpus_per_worker, max_retries=max_retries, init_kwargs=init_kwargs)
    raise CorrlabError(f"engine: expected 'local' or 'ray', got {engine!r}")
