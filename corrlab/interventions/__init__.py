"""Interventions on multi-image flow models: segment transport (and CorrAdapter, added separately).

* :func:`segment_transport` (:mod:`.transport`): jointly generate a structurally aligned pair from two
  conditions by transporting the whole segment between them (ablation modes ``full``, ``anchor-mean``,
  ``endpoints``, ``hard-cut``, ``independent``); :mod:`.schedules` holds its weight/smoothing/time schedules,
  :mod:`.velocity_adapters` turns the embedded model and diffusers Flux/Wan transformers into velocity
  functions, and :mod:`.pair_generation` (``generate_pair``, ``generate_pairs``) runs the whole pair
  generation with the embedded model.
* :func:`corr_adapter` (:mod:`.aggregation`): CorrAdapter, windowed aggregation around native correspondences.
"""
from .schedules import (
    ConstantSmoothing,
    FixedWeights,
    LinearDecaySmoothing,
    MidpointToUniformWeights,
    UniformWeights,
    linear_timesteps,
    shifted_timesteps,
)
from .transport import (
    MODES,
    SegmentResult,
    SegmentTransportConfig,
    alpha_sweep,
    fit_segment_endpoints,
    history_frame,
    line_fit_coefficients,
    segment_transport,
)
from .velocity_adapters import FluxVelocity, WanVelocity, embedded_velocity_fn
from .pair_generation import PairResult, SamplingOptions, generate_pair, generate_pairs

__all__ = [
    "MODES",
    "SegmentResult",
    "SegmentTransportConfig",
    "alpha_sweep",
    "fit_segment_endpoints",
    "history_frame",
    "line_fit_coefficients",
    "segment_transport",
    "FluxVelocity",
    "PairResult",
    "SamplingOptions",
    "WanVelocity",
    "embedded_velocity_fn",
    "generate_pair",
    "generate_pairs",
    "ConstantSmoothing",
    "FixedWeights",
    "LinearDecaySmoothing",
    "MidpointToUniformWeights",
    "UniformWeights",
    "linear_timesteps",
    "shifted_timesteps",
]

# CorrAdapter (training-free native-correspondence aggregation, methods.md section 2)
from .aggregation import (  # noqa: E402
    AggregationOptions,
    MatchedAttention,
    CorrAdapter,
    CorrAdapterConfig,
    CorrAdapterHandle,
    blend_aggregated,
    corr_adapted_output,
    corr_adapter,
    default_adapter_layers,
    is_decoder_layer,
    other_images,
    paper_schedule,
    window_token_indices,
    windowed_aggregation,
)

__all__ += [
    "AggregationOptions",
    "MatchedAttention",
    "CorrAdapter",
    "CorrAdapterConfig",
    "CorrAdapterHandle",
    "blend_aggregated",
    "corr_adapted_output",
    "corr_adapter",
    "default_adapter_layers",
    "is_decoder_layer",
    "other_images",
    "paper_schedule",
    "window_token_indices",
    "windowed_aggregation",
]
