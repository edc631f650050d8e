"""One sweep item, end to end: generate with probing (and an intervention), score, write into the store.

:class:`ItemRunner` keeps pipelines loaded (one per model) so a worker (the local loop or a Ray actor)
loads a model once and processes many items with it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from collections import OrderedDict

import pandas as pd

from ..errors import CorrlabError
from .store import SweepStore

__all__ = ["ItemRunner", "score_item"]


def score_item(rec, mvs, score: dict) -> pd.DataFrame:
    """Tidy per-pair score rows of one probed generation: native (per layer, step), controls, baselines
    (:func:`corrlab.evaluation.score_set`), in :data:`corrlab.evaluation.SCORE_COLUMNS` order."""
    from ..evaluation import SCORE_COLUMNS, score_set

    df = score_set(rec, mvs, score["thresholds"], score["kind"], score["kept_only"], score["controls"],
                   score["baselines"])
    return df[list(SCORE_COLUMNS)]


class ItemRunner:
    """Runs items into a store, keeping up to ``max_models`` pipelines loaded.

    Args:
        store: the store folder.
        device: ``"cpu"``, ``"cuda"`` (or ``None``: cuda when available, else cpu).
        threads: torch CPU threads (None: leave torch's setting).
    """

    def __init__(self, store, device: str | None = None, threads: int | None = None, max_models: int = 2):
        import torch

        self.store = SweepStore(store)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        if threads is not None:
            torch.set_num_threads(int(threads))
        self.threads = torch.get_num_threads()
        self.max_models = max_models
        self._pipes: OrderedDict = OrderedDict()
        self.loads = 0

    def pid(self) -> int:
        return os.getpid()

    def pipeline(self, path: str):
        from ..model import CorrlabPipeline

        if path in self._pipes:
            self._pipes.move_to_end(path)
            return self._pipes[path]
        pipe = CorrlabPipeline.from_pretrained(path).to(self.device)
        self.loads += 1
        self._pipes[path] = pipe
        while len(self._pipes) > self.max_models:
            self._pipes.popitem(last=False)
        return pipe

    def run(self, key: str, config: dict, labels: dict) -> dict:
        """Compute one item and commit it to the store; returns a summary dict."""
        from ..geometry import Camera
        from ..probing import MatchingOptions, probe
        from ..sets import save_set

        t0 = time.perf_counter()
        pipe = self.pipeline(config["model"]["path"])
        cameras, size = None, None
        if config["cameras"] is not None:
            cameras = [Camera.from_dict(v) for v in config["cameras"]["views"]]
            size = int(config["cameras"]["size"])
        else:  # the pipeline's own default is layout "train" with the same seed and size
            from ..scenes import sample_cameras

            cameras = sample_cameras(int(config["seed"]), int(config["views"]), pipe.sample_size,
                                     layout=config["layout"])
        p = config["probe"]
        matching = MatchingOptions.build(**{k: p[k] for k in MatchingOptions.fields() if k in p})
        iv = config["intervention"]
        tmp = self.store.new_tmp(key)
        try:
            with contextlib.ExitStack() as stack:
                if iv["name"] == "corr_adapter":
                    from ..interventions.aggregation import corr_adapter

                    stack.enter_context(corr_adapter(pipe, **{k: v for k, v in iv.items() if k != "name"}))
                elif iv["name"] != "none":
                    raise CorrlabError(f"intervention: expected 'none' or 'corr_adapter', got {iv['name']!r}")
                rec = stack.enter_context(probe(pipe, layers=p["layers"], steps=p["steps"], matching=matching,
                                                batch_index=p["batch_index"], chunk_size=p["chunk_size"]))
                mvs = pipe(config["prompt"], cameras=cameras, num_views=int(config["views"]),
                           num_inference_steps=int(config["num_steps"]), guidance_scale=float(config["guidance"]),
                           seed=int(config["seed"]), progress=False, size=size)
            if not rec.steps:
                raise CorrlabError(f"probe.steps: no step of the {config['num_steps']} sampled matched {p['steps']}")
            rec.set_meta(model=config["model"]["label"])  # prompt, seed, cameras: recorded by the probe
            t_gen = time.perf_counter() - t0
            save_set(mvs, tmp)
            rec.save(tmp / "record.nc")
            scores = score_item(rec, mvs, config["score"])
            info = {"worker": {"host": socket.gethostname(), "pid": os.getpid(), "device": self.device,
                               "threads": self.threads},
                    "seconds": {"generate": t_gen, "total": time.perf_counter() - t0}}
            written = self.store.commit(key, tmp, config, labels, scores, info)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return {"key": key, "written": written, "pid": os.getpid(), "seconds": time.perf_counter() - t0}
