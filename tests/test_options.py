"""Option objects (issue 13): MatchingOptions (one definition of the matching defaults), CorrAdapterConfig's
keyword form, AggregationOptions, SamplingOptions; the renamed modules and the package-level names."""
import argparse
import dataclasses
import importlib
import inspect

import pytest

from corrlab.errors import CorrlabError, ValueRangeError
from corrlab.interventions import AggregationOptions, CorrAdapterConfig, SamplingOptions
from corrlab.probing import MatchingOptions
from corrlab.probing import matcher


def test_matching_options_defaults_are_the_papers_and_frozen():
    d = MatchingOptions()
    assert d.as_dict() == {"similarity": "softmax", "heads": "per_head", "confidence": "global", "threshold": 0.05,
                           "window_radius": 3, "mutual": False, "strict": False, "history": None}
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.threshold = 0.3
    assert MatchingOptions.fields() == tuple(d.as_dict())
    assert "history" not in d.matcher_kwargs() and set(d.matcher_kwargs()) == set(d.as_dict()) - {"history"}
    assert MatchingOptions(threshold=1).threshold == 1.0 and isinstance(MatchingOptions(threshold=1).threshold, float)


@pytest.mark.parametrize("field, value, expected", [
    ("similarity", "cosine", "similarity"),
    ("heads", "max", "heads"),
    ("confidence", "local", "confidence"),
    ("threshold", 1.5, r"threshold: expected a probability in \[0, 1\], got 1.5"),
    ("threshold", True, "threshold"),
    ("threshold", "0.1", "threshold"),
    ("window_radius", -1, "window_radius: expected a non-negative int, got -1"),
    ("window_radius", 2.0, "window_radius"),
    ("mutual", 1, "mutual: expected a bool, got 1"),
    ("strict", "yes", "strict"),
    ("history", 0, r"history: expected None or a positive int \(calls kept per layer\), got 0"),
    ("history", True, "history"),
])
def test_matching_options_errors_name_field_value_and_expectation(field, value, expected):
    with pytest.raises(CorrlabError, match=expected):
        MatchingOptions(**{field: value})


def test_build_replaces_fields_and_rejects_unknown_names():
    base = MatchingOptions(heads="mean")
    assert MatchingOptions.build(base, threshold=0.2) == MatchingOptions(heads="mean", threshold=0.2)
    assert MatchingOptions.build() == MatchingOptions()
    with pytest.raises(CorrlabError, match=r"unknown options \['treshold'\]; expected some of \['similarity'"):
        MatchingOptions.build(treshold=0.2)
    with pytest.raises(CorrlabError, match="matching: expected None or a MatchingOptions"):
        MatchingOptions.build({"heads": "mean"})


def test_matching_defaults_have_one_definition():
    """The matcher's signatures, the CorrAdapter's config and the CLI flags read the dataclass's defaults."""
    d = MatchingOptions()
    params = inspect.signature(matcher.match_views).parameters  # match_tokens / match_layout forward to it
    for name in ("similarity", "heads", "confidence", "threshold", "window_radius", "mutual", "strict"):
        assert params[name].default == getattr(d, name), name
    assert params["chunk_size"].default == matcher.DEFAULT_CHUNK_SIZE
    assert CorrAdapterConfig().matching == d
    from corrlab.commands import probe as probe_command

    parser = argparse.ArgumentParser()
    probe_command.register(parser.add_subparsers())
    args = parser.parse_args(["probe", "--prompt", "x", "--out", "o"])
    assert probe_command.matching_from_args(args) == d  # no flag given: exactly the defaults
    args = parser.parse_args(["probe", "--prompt", "x", "--out", "o", "--heads", "mean", "--threshold", "0.2",
                              "--mutual", "--history", "11", "--window-radius", "1"])
    assert probe_command.matching_from_args(args) == MatchingOptions(heads="mean", threshold=0.2, mutual=True,
                                                                     history=11, window_radius=1)
    bad = parser.parse_args(["probe", "--prompt", "x", "--out", "o", "--threshold", "2"])
    with pytest.raises(ValueRangeError, match="threshold"):
        probe_command.matching_from_args(bad)


def test_sweep_spec_probe_table_builds_matching_options():
    from corrlab.sweeps.spec import SpecError, _probe

    p = _probe({"heads": "mean", "history": 3})
    assert {k: p[k] for k in MatchingOptions.fields()} == MatchingOptions(heads="mean", history=3).as_dict()
    assert p["chunk_size"] == matcher.DEFAULT_CHUNK_SIZE and p["batch_index"] is None
    with pytest.raises(SpecError, match="probe.threshold"):
        _probe({"threshold": -0.1})
    with pytest.raises(SpecError, match="probe.history"):
        _probe({"history": 0})


def test_corr_adapter_config_embeds_matching_options():
    cfg = CorrAdapterConfig.build(eta=0.5, threshold=0.2, window_radius=1, history=4)
    assert cfg.matching == MatchingOptions(threshold=0.2, window_radius=1, history=4) and cfg.eta == 0.5
    assert cfg.radius == 1 and cfg.aggregation("row") == AggregationOptions(radius=1, eta=0.5, window="row")
    assert cfg.matcher_kwargs() == {**cfg.matching.matcher_kwargs(), "chunk_size": 64}
    # keywords replace fields of the matching given alongside them, or of the base config's
    assert CorrAdapterConfig.build(matching=MatchingOptions(heads="mean"), threshold=0.3).matching == MatchingOptions(
        heads="mean", threshold=0.3)
    assert CorrAdapterConfig.build(cfg, mutual=True).matching == dataclasses.replace(cfg.matching, mutual=True)
    with pytest.raises(CorrlabError, match=r"unknown CorrAdapter parameters \['radius'\]"):
        CorrAdapterConfig.build(radius=2)
    with pytest.raises(CorrlabError, match="history_for_aggregation: expected together with matching.history"):
        CorrAdapterConfig.build(history_for_aggregation=True)
    sync = CorrAdapterConfig.preset("syncdreamer")
    assert sync.matching == MatchingOptions(similarity="dual_softmax", confidence="window", history=11)


@pytest.mark.parametrize("field, value", [("radius", -1), ("eta", 1.5), ("window", "auto"), ("border", "wrap"),
                                          ("unmatched", "zero"), ("chunk_size", 0)])
def test_aggregation_options_errors_name_the_field(field, value):
    with pytest.raises(CorrlabError, match=field):
        AggregationOptions(**{field: value})


def test_sampling_options_validate_and_give_the_pipeline_call():
    s = SamplingOptions(num_views=2, num_inference_steps=4)
    assert s.pipeline_kwargs() == {"num_views": 2, "num_inference_steps": 4}
    for field, value in (("num_views", 0), ("num_inference_steps", 0), ("size", True), ("guidance_scale", -1.0),
                         ("guidance_scale", float("nan")), ("guidance_scale", float("inf")), ("guidance_scale", True)):
        with pytest.raises(ValueRangeError, match=field):
            SamplingOptions(**{field: value})


def test_long_signatures_are_option_objects():
    from corrlab.interventions import corr_adapted_output, generate_pair, generate_pairs, windowed_aggregation

    for fn, most in ((generate_pair, 9), (generate_pairs, 8), (corr_adapted_output, 4), (windowed_aggregation, 2)):
        assert len(inspect.signature(fn).parameters) <= most, fn.__name__


@pytest.mark.parametrize("module, names", [
    ("corrlab.probing.recording", ["probe", "ProbeRecorder"]),
    ("corrlab.interventions.aggregation", ["corr_adapter", "CorrAdapterConfig", "CorrAdapterHandle", "AggregationOptions"]),
    ("corrlab.interventions.transport", ["segment_transport", "SegmentTransportConfig"]),
    ("corrlab.interventions.pair_generation", ["generate_pair", "generate_pairs", "PairResult", "SamplingOptions"]),
    ("corrlab.interventions.velocity_adapters", ["embedded_velocity_fn", "FluxVelocity", "WanVelocity"]),
    ("corrlab.notebook_helpers", ["fast_mode", "load_pipeline", "untrained_pipeline"]),
])
def test_renamed_modules_hold_their_names(module, names):
    mod = importlib.import_module(module)
    assert all(callable(getattr(mod, n)) for n in names)


def test_package_level_names_stay_and_no_module_shadows_them():
    import corrlab
    import corrlab.interventions as iv
    import corrlab.probing as pr
    from corrlab.interventions.aggregation import corr_adapter
    from corrlab.interventions.pair_generation import generate_pair
    from corrlab.interventions.transport import segment_transport
    from corrlab.probing.recording import probe

    assert corrlab.probe is probe and pr.probe is probe and callable(probe.layers)
    assert corrlab.corr_adapter is corr_adapter and iv.corr_adapter is corr_adapter
    assert corrlab.segment_transport is segment_transport and iv.segment_transport is segment_transport
    assert corrlab.generate_pair is generate_pair and corrlab.MatchingOptions is MatchingOptions
    for gone in ("corrlab.probing.probe", "corrlab.interventions.corr_adapter", "corrlab.interventions.segment_transport",
                 "corrlab.widgets.notebook"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(gone)
    assert not hasattr(importlib.import_module("corrlab.interventions.velocity_adapters"), "generate_pair")
