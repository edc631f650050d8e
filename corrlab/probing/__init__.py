"""Native correspondences inside multi-image attention: matcher, taps, probe, records (capture only;
scores are in :mod:`corrlab.evaluation`).

>>> import corrlab
>>> corrlab.probe.layers(pipe)                                   # doctest: +SKIP
>>> with corrlab.probe(pipe, layers=["blocks.7.attn"]) as rec:    # doctest: +SKIP
...     mvs = pipe("red striped box", seed=0)
>>> rec.set_meta(prompt=mvs.prompt, seed=mvs.seed, cameras=mvs.cameras)   # doctest: +SKIP
>>> corrlab.evaluation.score_record(rec)                          # doctest: +SKIP
"""
from .custom import ProjectionSpec, register_attention_module, register_family, unregister_attention_module, unregister_family
from .controls import CONTROLS, appearance_matches, chance_matches, control_matches, identity_matches
from .matcher import MATCHING_DEFAULTS, HistoryMax, TokenMatches, match_layout, match_tokens, match_views
from .row_attention import RowWiseMultiViewAttnProcessor, row_wise_attention_processors
from .probe import ProbeRecorder, probe
from .record import ProbeRecord, RecordBuilder
from .runs import COMPARISON_MATCHING, probe_generations, probe_rendered
from .taps import AttentionCall, AttentionTaps, LayerInfo, TokenLayout, list_layers

__all__ = [
    "probe",
    "ProbeRecorder",
    "ProbeRecord",
    "RecordBuilder",
    "TokenMatches",
    "MATCHING_DEFAULTS",
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
]
