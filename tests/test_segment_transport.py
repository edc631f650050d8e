"""Segment transport: the closed-form line fit, its reductions, smoothing, modes, adapters and CLI."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from corrlab.errors import CorrlabError, ShapeError, ValueRangeError
from corrlab.interventions import (
    MODES,
    ConstantSmoothing,
    FixedWeights,
    LinearDecaySmoothing,
    MidpointToUniformWeights,
    SegmentTransportConfig,
    alpha_sweep,
    fit_segment_endpoints,
    history_frame,
    linear_timesteps,
    segment_transport,
    shifted_timesteps,
)
from corrlab.interventions.transport import StepPlan, plan_step, segment_alphas, segment_step


# --------------------------------------------------------------------------- a toy analytic field
class ToyField:
    """Exact rectified-flow velocity of Gaussian data ``N(A c, s^2 I)`` plus a nonlinear twist.

    ``E[x_0 | x_t] = mu + (1 - t) s^2 / ((1 - t)^2 s^2 + t^2) (x_t - (1 - t) mu)`` and ``v = (x_t - E[x_0 | x_t]) / t``;
    the data keep the noise's information (s > 0), so the path matters, and ``0.3 tanh(x * (B c))`` makes the
    field nonlinear in ``x`` and ``c`` so intermediate points matter. Counts calls and batch sizes.
    """

    def __init__(self, dim: int = 6, cdim: int = 3, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(dim, cdim, generator=g)
        self.B = torch.randn(dim, cdim, generator=g)
        self.calls: list[int] = []

    def __call__(self, x, t, cond):
        self.calls.append(x.shape[0])
        A, B, s2 = self.A.to(cond.dtype), self.B.to(cond.dtype), 0.25
        mu = cond @ A.T
        x0 = mu + (1 - t) * s2 / ((1 - t) ** 2 * s2 + t**2) * (x - (1 - t) * mu)
        return (x - x0) / t + 0.3 * torch.tanh(x * (cond @ B.T))


def _inputs(seed=0, dim=6, cdim=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(dim, generator=g), torch.randn(cdim, generator=g), torch.randn(cdim, generator=g)


def _euler(field, noise, cond, ts):
    x = noise.clone()
    for i in range(len(ts) - 1):
        x = x + (float(ts[i + 1]) - float(ts[i])) * field(x[None], float(ts[i]), cond[None])[0]
    return x


# --------------------------------------------------------------------------- the closed form
@settings(max_examples=25, deadline=None)
@given(k=st.integers(2, 9), seed=st.integers(0, 10_000), zero_some=st.booleans())
def test_closed_form_equals_numerical_weighted_lstsq(k, seed, zero_some):
    g = torch.Generator().manual_seed(seed)
    alphas = torch.rand(k, generator=g, dtype=torch.float64)
    alphas[0], alphas[-1] = 0.0, 1.0  # guarantee two well-separated alphas
    weights = torch.rand(k, generator=g, dtype=torch.float64) + 0.01
    if zero_some and k > 2:
        weights[1:-1][torch.rand(k - 2, generator=g) < 0.5] = 0.0
    y = torch.randn(k, 4, 3, generator=g, dtype=torch.float64)
    y_a, y_b = fit_segment_endpoints(alphas, weights, y)

    sw = weights.sqrt()[:, None]
    design = torch.stack([1 - alphas, alphas], dim=1) * sw  # (k, 2)
    sol = torch.linalg.lstsq(design, y.reshape(k, -1) * sw).solution  # (2, 12)
    torch.testing.assert_close(y_a, sol[0].reshape(4, 3), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(y_b, sol[1].reshape(4, 3), atol=1e-9, rtol=1e-9)


def test_velocity_form_equals_fit_of_stepped_points():
    g = torch.Generator().manual_seed(1)
    alphas, weights = segment_alphas(5), torch.rand(5, generator=g, dtype=torch.float64) + 0.1
    x_a, x_b, v = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64), torch.randn(5, 8, generator=g, dtype=torch.float64)
    x_pts = (1 - alphas[:, None]) * x_a + alphas[:, None] * x_b
    h = -0.1
    y_a, y_b = fit_segment_endpoints(alphas, weights, x_pts + h * v)
    v_a, v_b = fit_segment_endpoints(alphas, weights, v)
    torch.testing.assert_close(y_a, x_a + h * v_a, atol=1e-12, rtol=0)
    torch.testing.assert_close(y_b, x_b + h * v_b, atol=1e-12, rtol=0)


def test_fit_of_identical_points_returns_them_exactly():
    y = torch.randn(1, 50).expand(5, 50).contiguous()
    y_a, y_b = fit_segment_endpoints(segment_alphas(5), torch.rand(5, dtype=torch.float64) + 0.1, y)
    # exact: the documented guarantee (y - y_ref is exactly 0, so the fit returns y_ref + 0)
    assert torch.equal(y_a, y[0]) and torch.equal(y_b, y[0])


@pytest.mark.parametrize("weights", [(0, 0, 1, 0, 0), (0, 0, 0, 0, 0), (1, 0, 0, 0, -1)])
def test_degenerate_weights_raise(weights):
    with pytest.raises(CorrlabError, match="weights"):
        fit_segment_endpoints(segment_alphas(5), torch.tensor(weights, dtype=torch.float64), torch.randn(5, 3))


def test_weight_schedule_on_one_alpha_raises_in_sampler():
    field, (noise, ca, cb) = ToyField(), _inputs()
    with pytest.raises(CorrlabError, match="two distinct alphas"):
        segment_transport(field, noise, ca, cb, linear_timesteps(4), weight_schedule=FixedWeights((0, 0, 1, 0, 0)), progress=False)


# --------------------------------------------------------------------------- reductions
def test_endpoint_weights_without_smoothing_equal_two_independent_generations():
    field, (noise, ca, cb) = ToyField(), _inputs()
    ts = linear_timesteps(12)
    joint = segment_transport(
        field, noise, ca, cb, ts, mode="full", k=5,
        weight_schedule=FixedWeights((1, 0, 0, 0, 1)), smoothing_schedule=ConstantSmoothing(0.0), progress=False,
    )
    ind_a, ind_b = _euler(field, noise, ca, ts), _euler(field, noise, cb, ts)
    torch.testing.assert_close(joint.x_a, ind_a, atol=1e-6, rtol=0)
    torch.testing.assert_close(joint.x_b, ind_b, atol=1e-6, rtol=0)
    assert not torch.allclose(ind_a, ind_b, atol=1e-2)  # the two conditions really differ
    indep = segment_transport(field, noise, ca, cb, ts, mode="independent", progress=False)
    torch.testing.assert_close(indep.x_a, ind_a, atol=1e-6, rtol=0)
    torch.testing.assert_close(indep.x_b, ind_b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("w", [0.3, 0.6, 1.0])
@pytest.mark.parametrize("anchor", ["midpoint", "mean"])
def test_smoothing_scales_segment_growth_by_one_minus_w(w, anchor):
    field = ToyField()
    g = torch.Generator().manual_seed(3)
    x_a, x_b = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    ca, cb = torch.randn(3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    alphas = segment_alphas(5)
    weights = MidpointToUniformWeights()(0.1, alphas)
    t1, t2 = 0.8, 0.7
    a0, b0, _ = segment_step(field, x_a, x_b, ca, cb, t1, t2, StepPlan(alphas, weights, 0.0, anchor))
    aw, bw, _ = segment_step(field, x_a, x_b, ca, cb, t1, t2, StepPlan(alphas, weights, w, anchor))
    d_free = (b0 - a0) - (x_b - x_a)  # h (v_b - v_a)
    d_smooth = (bw - aw) - (x_b - x_a)  # h (1 - w) (v_b - v_a)
    assert d_free.abs().max() > 1e-3
    torch.testing.assert_close(d_smooth, (1 - w) * d_free, atol=1e-12, rtol=0)
    # hence d||x_b - x_a||/dt = <v_b - v_a, x_b - x_a> / ||x_b - x_a|| scales by (1 - w) too
    delta = x_b - x_a
    rate = lambda d: float(torch.dot(d, delta) / delta.norm())  # noqa: E731
    assert math.isclose(rate(d_smooth), (1 - w) * rate(d_free), rel_tol=1e-9, abs_tol=1e-12)


# --------------------------------------------------------------------------- the modes
@pytest.mark.parametrize("mode", MODES)
def test_each_mode_runs_on_a_toy_field(mode):
    field, (noise, ca, cb) = ToyField(), _inputs()
    ts = linear_timesteps(10)
    r = segment_transport(field, noise, ca, cb, ts, mode=mode, k=5, return_trajectory=True, progress=False)
    assert r.x_a.shape == noise.shape and torch.isfinite(r.x_a).all() and torch.isfinite(r.x_b).all()
    assert len(field.calls) == 10  # ONE batched call per step
    # exact: both endpoints start as copies of the same noise, so x_b - x_a is exactly 0
    assert r.history["x_a"].shape == (11, 6) and r.history["segment_length"][0] == 0
    assert r.history["weights"].shape == (10, r.alphas.numel())
    torch.testing.assert_close(r.history["weights"].sum(dim=1), torch.ones(10, dtype=torch.float64))
    frame = history_frame(r)
    assert list(frame.columns) == ["step", "t", "segment_length", "w", "num_evals", "mode"] and len(frame) == 11
    expected_k = 5 if mode in ("full", "anchor-mean") else 2
    assert max(field.calls) == expected_k and r.history["num_evals"].max() == expected_k


def test_modes_differ_and_hard_cut_shares_the_first_steps():
    _, (noise, ca, cb) = ToyField(), _inputs()
    ts = linear_timesteps(10)
    res = {m: segment_transport(ToyField(), noise, ca, cb, ts, mode=m, num_joint_steps=4, return_trajectory=True, progress=False) for m in MODES}
    for m1 in MODES:
        for m2 in MODES:
            if m1 < m2:
                assert not torch.allclose(res[m1].x_a, res[m2].x_a, atol=1e-4), (m1, m2)
    hc = res["hard-cut"].history
    # shared velocity: identical for 4 steps. exact: same computation twice (with w = 1 both endpoints take
    # the update 1 * anchor + 0 * v, i.e. the same anchor, from the same start)
    assert torch.equal(hc["x_a"][:5], hc["x_b"][:5])
    assert not torch.allclose(hc["x_a"][6], hc["x_b"][6])
    # smoothing keeps the pair closer than independent generation early on
    s_full = res["full"].history["segment_length"][3]
    s_ind = res["independent"].history["segment_length"][3]
    assert s_full < s_ind


def test_even_k_midpoint_anchor_adds_one_point_to_the_same_call():
    field, (noise, ca, cb) = ToyField(), _inputs()
    segment_transport(field, noise, ca, cb, linear_timesteps(6), mode="full", k=4,
                      smoothing_schedule=LinearDecaySmoothing(0.7, 0.5), progress=False)
    assert field.calls == [5, 5, 5, 4, 4, 4]  # anchor needed while w > 0 (steps 0-2)


def test_determinism_and_identical_conditions():
    _, (noise, ca, cb) = ToyField(), _inputs()
    ts = linear_timesteps(8)
    r1 = segment_transport(ToyField(), noise, ca, cb, ts, progress=False)
    r2 = segment_transport(ToyField(), noise, ca, cb, ts, progress=False)
    assert torch.equal(r1.x_a, r2.x_a) and torch.equal(r1.x_b, r2.x_b)  # exact: same computation twice
    for mode in MODES:
        r = segment_transport(ToyField(), noise, ca, ca.clone(), ts, mode=mode, progress=False)
        # exact: the documented guarantee (identical conditions: one evaluation per step, x_b a copy of x_a)
        assert torch.equal(r.x_a, r.x_b), mode


def test_bad_inputs_raise_named_errors():
    field, (noise, ca, cb) = ToyField(), _inputs()
    ts = linear_timesteps(4)
    with pytest.raises(ShapeError, match="cond_b"):
        segment_transport(field, noise, ca, torch.randn(4), ts, progress=False)
    with pytest.raises(CorrlabError, match="timesteps"):
        segment_transport(field, noise, ca, cb, torch.linspace(0, 1, 5), progress=False)
    with pytest.raises(CorrlabError, match="mode"):
        segment_transport(field, noise, ca, cb, ts, mode="fancy", progress=False)
    with pytest.raises(ShapeError, match="velocity_fn"):
        segment_transport(lambda x, t, c: x[:1], noise, ca, cb, ts, progress=False)
    with pytest.raises(CorrlabError, match="smoothing_schedule"):
        segment_transport(field, noise, ca, cb, ts, smoothing_schedule=lambda s: 1.5, progress=False)
    with pytest.raises(CorrlabError, match="k"):
        SegmentTransportConfig(k=1)
    from corrlab.interventions.velocity_adapters import WanVelocity

    for bad in (-1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueRangeError, match="guidance_scale"):
            WanVelocity(object(), guidance_scale=bad)


def test_alpha_sweep_lies_on_the_final_segment():
    field, (noise, ca, cb) = ToyField(), _inputs()
    r = segment_transport(field, noise, ca, cb, linear_timesteps(5), progress=False)
    alphas, xs = alpha_sweep(r, 5)
    # exact: interpolate_points' documented end guarantee (1 * x_a + 0 * x_b and 0 * x_a + 1 * x_b)
    assert xs.shape == (5, 6) and torch.equal(xs[0], r.x_a) and torch.equal(xs[-1], r.x_b)
    torch.testing.assert_close(xs[2], 0.5 * (r.x_a + r.x_b))
    with pytest.raises(CorrlabError, match="m"):
        alpha_sweep(r, 1)


def test_default_schedules_have_the_documented_shape():
    ws, alphas = MidpointToUniformWeights(), segment_alphas(5)
    p0 = ws(0.0, alphas)
    assert math.isclose(float(p0.sum()), 1.0) and int(p0.argmax()) == 2 and p0[0] < 0.2 * p0[2] and p0[0] > 0
    assert torch.allclose(ws(0.45, alphas), torch.full((5,), 0.2, dtype=torch.float64))
    sm = LinearDecaySmoothing()
    assert sm(0.0) == pytest.approx(0.7) and sm(0.25) == pytest.approx(0.35)
    assert sm(0.5) == 0.0 and sm(0.9) == 0.0  # exact: clamped to the literal 0.0 (the w > 0 branches rely on it)
    plan = plan_step(SegmentTransportConfig(mode="hard-cut", num_joint_steps=3), 2, 10)
    # exact: hard-cut's w is the literal 1.0 or 0.0
    assert plan.w == 1.0 and plan_step(SegmentTransportConfig(mode="hard-cut", num_joint_steps=3), 3, 10).w == 0.0
    ts = shifted_timesteps(10, 3.0)
    assert float(ts[0]) == pytest.approx(1.0, abs=1e-12) and float(ts[-1]) == pytest.approx(0.0, abs=1e-12)
    assert 0.0 <= float(ts.min()) and float(ts.max()) <= 1.0  # what segment_transport's time check requires
    assert bool((ts[1:] < ts[:-1]).all()) and ts[5] > 0.5


# --------------------------------------------------------------------------- adapters
def _tiny_pipe():
    from corrlab.model import CorrlabPipeline, MultiViewDiT

    g = torch.Generator().manual_seed(0)
    model = MultiViewDiT(sample_size=16, patch_size=4, hidden_size=32, num_layers=2, num_heads=2, prompt_dim=8)
    with torch.no_grad():
        for layer in (model.ada_out[1], model.proj_out):  # zero-initialised: give the tiny model a real output
            layer.weight.copy_(0.05 * torch.randn(layer.weight.shape, generator=g))
            layer.bias.copy_(0.05 * torch.randn(layer.bias.shape, generator=g))
    return CorrlabPipeline(model.eval())


def test_embedded_independent_pair_reproduces_the_pipeline_and_modes_run():
    from corrlab.interventions.pair_generation import SamplingOptions, generate_pair

    pipe = _tiny_pipe()
    sampling = SamplingOptions(num_views=2, num_inference_steps=4)
    kw = dict(sampling=sampling, progress=False)
    r = generate_pair(pipe, "red striped box", "blue dotted sphere", 3, transport=SegmentTransportConfig(mode="independent"), **kw)
    sa = pipe("red striped box", seed=3, progress=False, **sampling.pipeline_kwargs())
    sb = pipe("blue dotted sphere", seed=3, progress=False, **sampling.pipeline_kwargs())
    torch.testing.assert_close(r.set_a.images, sa.images, atol=1e-5, rtol=0)
    torch.testing.assert_close(r.set_b.images, sb.images, atol=1e-5, rtol=0)
    assert (sa.images - sb.images).abs().max() > 1e-3
    assert [c.K.tolist() for c in r.set_a.cameras] == [c.K.tolist() for c in sa.cameras]
    ends_only = SegmentTransportConfig(mode="full", weight_schedule=FixedWeights((1, 0, 0, 0, 1)), smoothing_schedule=ConstantSmoothing(0.0))
    r2 = generate_pair(pipe, "red striped box", "blue dotted sphere", 3, transport=ends_only, **kw)
    torch.testing.assert_close(r2.set_a.images, sa.images, atol=1e-5, rtol=0)
    torch.testing.assert_close(r2.set_b.images, sb.images, atol=1e-5, rtol=0)
    full = generate_pair(pipe, "red striped box", "blue dotted sphere", 3, sweep=3, **kw)
    assert len(full.sweep_sets) == 3 and full.sweep_alphas == pytest.approx([0.0, 0.5, 1.0], abs=1e-12)
    # exact: same computation twice (the alpha = 0 / 1 sweep latents are x_a / x_b bit for bit, see
    # test_alpha_sweep_lies_on_the_final_segment, decoded by the same code)
    assert torch.equal(full.sweep_sets[0].images, full.set_a.images) and torch.equal(full.sweep_sets[2].images, full.set_b.images)
    assert full.set_a.prompt == "red striped box" and full.set_a.meta["segment_transport"]["mode"] == "full"
    same = generate_pair(pipe, "red striped box", "red striped box", 3, **kw)
    # exact: the prompt encoder embeds each prompt on its own (same computation twice), so the conditions are
    # bit-identical and take the documented path for identical conditions (x_b is a copy of x_a)
    assert torch.equal(same.set_a.images, same.set_b.images)


def test_embedded_pair_batching_equals_separate_pairs():
    from corrlab.interventions.pair_generation import SamplingOptions, generate_pair, generate_pairs

    pipe = _tiny_pipe()
    kw = dict(transport=SegmentTransportConfig(mode="full"), sampling=SamplingOptions(num_views=2, num_inference_steps=3),
              progress=False)
    pairs = [("red striped box", "blue dotted sphere"), ("green checkered cone", "pink striped cylinder")]
    both = generate_pairs(pipe, pairs, [1, 2], **kw)
    for (a, b), seed, res in zip(pairs, [1, 2], both):
        one = generate_pair(pipe, a, b, seed, **kw)
        torch.testing.assert_close(res.set_a.images, one.set_a.images, atol=1e-5, rtol=0)
        torch.testing.assert_close(res.set_b.images, one.set_b.images, atol=1e-5, rtol=0)


def _tiny_flux(guidance_embeds=False):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),
    ).eval()


def _tiny_wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16,
        freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()


def test_flux_packing_matches_the_diffusers_pipeline():
    from diffusers import FluxPipeline

    from corrlab.interventions.velocity_adapters import flux_latent_ids, pack_latents, unpack_latents

    lat = torch.randn(2, 4, 6, 8)
    packed = pack_latents(lat)
    # exact: packing is a reshape / permute (no arithmetic); the ids are integer-valued
    assert torch.equal(packed, FluxPipeline._pack_latents(lat, 2, 4, 6, 8))
    assert torch.equal(unpack_latents(packed, 6, 8), lat)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 6 * 8, 8 * 8, 8), lat)
    assert torch.equal(flux_latent_ids(6, 8), FluxPipeline._prepare_latent_image_ids(1, 3, 4, "cpu", torch.float32))


@pytest.mark.parametrize("kind", ["flux", "flux-guidance", "flux-true-cfg", "wan", "wan-cfg"])
def test_diffusers_adapters_batch_consistently_and_transport(kind):
    from corrlab.interventions.velocity_adapters import FluxVelocity, WanVelocity

    g = torch.Generator().manual_seed(1)
    K = 3
    if kind.startswith("flux"):
        fn = (
            FluxVelocity(_tiny_flux(True), guidance=3.5) if kind == "flux-guidance"
            else FluxVelocity(_tiny_flux(), negative=(torch.randn(5, 32, generator=g), torch.randn(16, generator=g)), true_cfg_scale=4.0)
            if kind == "flux-true-cfg" else FluxVelocity(_tiny_flux())
        )
        x = torch.randn(K, 4, 8, 8, generator=g)
        cond = (torch.randn(K, 5, 32, generator=g), torch.randn(K, 16, generator=g))
        pick = lambda c, i: (c[0][i : i + 1], c[1][i : i + 1])  # noqa: E731
        ends = lambda c, i: (c[0][i], c[1][i])  # noqa: E731
    else:
        fn = WanVelocity(_tiny_wan(), negative=torch.randn(7, 16, generator=g), guidance_scale=5.0 if kind == "wan-cfg" else 1.0)
        x = torch.randn(K, 4, 2, 8, 8, generator=g)
        cond = torch.randn(K, 7, 16, generator=g)
        pick = lambda c, i: c[i : i + 1]  # noqa: E731
        ends = lambda c, i: c[i]  # noqa: E731
    with torch.no_grad():
        v = fn(x, 0.7, cond)
        v_sep = torch.cat([fn(x[i : i + 1], 0.7, pick(cond, i)) for i in range(K)])
        v_other_t = fn(x, 0.3, cond)
    assert v.shape == x.shape and v.abs().mean() > 1e-3
    torch.testing.assert_close(v, v_sep, atol=1e-5, rtol=0)
    assert not torch.allclose(v, v_other_t, atol=1e-4)  # the time reaches the model
    r = segment_transport(fn, x[0], ends(cond, 0), ends(cond, 1), linear_timesteps(3), mode="full", k=3, progress=False)
    assert r.x_a.shape == x[0].shape and torch.isfinite(r.x_b).all() and (r.x_a - r.x_b).abs().max() > 1e-4


def test_flux_guidance_argument_is_checked():
    from corrlab.interventions.velocity_adapters import FluxVelocity

    with pytest.raises(CorrlabError, match="guidance"):
        FluxVelocity(_tiny_flux(True))
    with pytest.raises(CorrlabError, match="guidance"):
        FluxVelocity(_tiny_flux(False), guidance=3.5)


def test_pair_cli_writes_both_sets_and_the_sweep(tmp_path):
    import json

    from corrlab.cli import main
    from corrlab.sets import load_set

    _tiny_pipe().save_pretrained(tmp_path / "model")
    out = tmp_path / "pair"
    rc = main([
        "pair", "--prompt-a", "red striped box", "--prompt-b", "blue dotted sphere", "--seed", "2", "--mode", "full",
        "--k", "3", "--sweep", "3", "--steps", "2", "--views", "2", "--model", str(tmp_path / "model"), "--out", str(out),
        "--no-progress",
    ])
    assert rc == 0
    a, b = load_set(out / "a"), load_set(out / "b")
    assert a.images.shape == (2, 3, 16, 16) and a.prompt == "red striped box" and b.prompt == "blue dotted sphere"
    mid = load_set(out / "sweep" / "alpha_01")
    inside = (a.images > 0.01) & (a.images < 0.99) & (b.images > 0.01) & (b.images < 0.99)  # away from the clamp
    assert inside.float().mean() > 0.5
    assert torch.allclose(mid.images[inside], 0.5 * (a.images + b.images)[inside], atol=1.01 / 255)
    assert json.loads((out / "pair.json").read_text())["sweep_alphas"] == pytest.approx([0.0, 0.5, 1.0], abs=1e-12)
    assert main(["pair", "--prompt-a", "red box", "--prompt-b", "blue box", "--sweep", "1", "--out", str(out)]) == 2
