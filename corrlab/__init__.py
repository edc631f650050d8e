"""corrlab: probe, score and steer cross-image correspondences in multi-image diffusion and flow models.

>>> import corrlab
>>> pipe = corrlab.load_default()                                   # doctest: +SKIP
>>> corrlab.probe.layers(pipe)                                      # doctest: +SKIP
>>> with corrlab.probe(pipe, layers=["blocks.4.attn"]) as rec:      # doctest: +SKIP
...     mvs = pipe("red striped box", seed=0)
>>> with corrlab.corr_adapter(pipe, eta=0.1, window_radius=3):      # doctest: +SKIP
...     mvs_aligned = pipe("red striped box", seed=0)

Conventions (cameras, pixels, distances) are stated once in :mod:`corrlab.geometry`.
Heavy submodules are imported on first use, so ``import corrlab`` stays fast.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute)
_EXPORTS = {
    "probe": ("corrlab.probing", "probe"),
    "ProbeRecord": ("corrlab.probing", "ProbeRecord"),
    "MatchingOptions": ("corrlab.probing", "MatchingOptions"),
    "score_record": ("corrlab.evaluation", "score_record"),
    "comparison_table": ("corrlab.evaluation", "comparison_table"),
    "pool_scores": ("corrlab.evaluation", "pool_scores"),
    "corr_adapter": ("corrlab.interventions", "corr_adapter"),
    "segment_transport": ("corrlab.interventions", "segment_transport"),
    "generate_pair": ("corrlab.interventions", "generate_pair"),
    "load_default": ("corrlab.model", "load_default"),
    "load_pipeline": ("corrlab.pipelines", "load_pipeline"),
    "CorrlabPipeline": ("corrlab.model", "CorrlabPipeline"),
    "MultiViewDiT": ("corrlab.model", "MultiViewDiT"),
    "Camera": ("corrlab.geometry", "Camera"),
    "MultiViewSet": ("corrlab.sets", "MultiViewSet"),
    "load_set": ("corrlab.sets", "load_set"),
    "save_set": ("corrlab.sets", "save_set"),
    "render_scene": ("corrlab.scenes", "render_scene"),
    "CorrlabError": ("corrlab.errors", "CorrlabError"),
    "sweep": ("corrlab.sweeps", "sweep"),
    "open_sweep": ("corrlab.sweeps", "open_sweep"),
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'corrlab' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
