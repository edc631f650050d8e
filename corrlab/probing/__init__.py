"""Native correspondences inside multi-image attention: matcher, taps, probe, records (capture only;
scores are in :mod:`corrlab.evaluation`).

>>> import corrlab
>>> corrlab.probe.layers(pipe)                                   # doctest: +SKIP
>>> with corrlab.probe(pipe, layers=["blocks.7.attn"]) as rec:    # doctest: +SKIP
...     mvs = pipe("red striped box", seed=0)
>>> corrlab.evaluation.score_record(rec)   # the set's cameras were recorded by the probe   # doctest: +SKIP
"""
from .custom import ProjectionSpec, register_attention_module, register_family, unregister_attention_module, unregister_family
from .controls import CONTROLS, appearance_matches, chance_matches, control_matches, identity_matches
from .matcher import DEFAULT_CHUNK_SIZE, HistoryMax, MatchingOptions, TokenMatches, match_layout, match_tokens, match_views
from .row_attention import RowWiseMultiViewAttnProcessor, row_wise_attention_processors
from .recording import ProbeRecorder, probe
from .record import ProbeRecord, RecordBuilder
from .runs import COMPARISON_MATCHING, probe_generations, probe_rendered
from .taps import AttentionCall, AttentionTaps, LayerInfo, StepClock, TokenLayout, list_layers
from .attention_cache import AttentionCache, cache_attention

__all__ = [
    "probe",
    "ProbeRecorder",
    "ProbeRecord",
    "RecordBuilder",
    "TokenMatches",
    "MatchingOptions",
    "DEFAULT_CHUNK_SIZE",
    "match_tokens",
    "match_views",
    "match_layout",
    "HistoryMax",
    "RowWiseMultiViewAttnProcessor",
    "row_wise_attention_processors",
    "ProjectionSpec",
    "register_attention_module",
    "unregister_attention_module",
    "register_family",
    "unregister_family",
    "CONTROLS",
    "chance_matches",
    "identity_matches",
    "appearance_matches",
    "control_matches",
    "COMPARISON_MATCHING",
    "probe_rendered",
    "probe_generations",
    "AttentionCall",
    "AttentionTaps",
    "LayerInfo",
    "TokenLayout",
    "list_layers",
    "StepClock",
    "AttentionCache",
    "cache_attention",
]
