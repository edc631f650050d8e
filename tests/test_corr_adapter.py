"""CorrAdapter: exactness of the toggle, the windowed aggregation against a naive reference, step logic."""
from __future__ import annotations

import importlib
import math

import pytest
import torch

from corrlab.errors import CorrlabError, ShapeError, ValueRangeError
from corrlab.interventions import (
    AggregationOptions,
    CorrAdapter,
    MatchedAttention,
    CorrAdapterConfig,
    CorrAdapterHandle,
    blend_aggregated,
    corr_adapted_output,
    corr_adapter,
    default_adapter_layers,
    other_images,
    window_token_indices,
    windowed_aggregation,
)
from corrlab.model import CorrlabPipeline, MultiViewDiT
from corrlab.probing import AttentionCall, MatchingOptions, TokenLayout
from corrlab.probing.match_kernel import load_match_kernel, match_kernel_status

# the package attribute corr_adapter is the context manager; the module is reached through importlib
ca = importlib.import_module("corrlab.interventions.aggregation")


@pytest.fixture(scope="module")
def pipe() -> CorrlabPipeline:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = MultiViewDiT(sample_size=16, patch_size=2, hidden_size=32, num_layers=4, num_heads=2, prompt_dim=8)
    with torch.no_grad():  # the DiT zero-initialises its output layers: randomise them so outputs depend on attention
        for p in model.parameters():
            if p.ndim >= 1 and float(p.abs().max()) == 0.0:  # exact: finds the literal zero initialisation
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return CorrlabPipeline(model.eval())


def generate(pipe, steps: int = 3, guidance: float = 2.0, seed: int = 3) -> torch.Tensor:
    return pipe("red striped box", num_views=3, num_inference_steps=steps, guidance_scale=guidance, seed=seed,
                progress=False).images


# ----------------------------------------------------------------------------------------- on a model
def test_eta_one_reproduces_plain_model_exactly(pipe):
    plain = generate(pipe)
    with corr_adapter(pipe, eta=1.0, threshold=0.0, active_steps=None, layers=["blocks.1.attn", "blocks.3.attn"]) as handle:
        same = generate(pipe)
    assert handle.stats["adapted_calls"] > 0 and handle.stats["kept"] == handle.stats["total"] > 0
    # exact: same computation twice (eta = 1 writes x * 1 + 0 back, which IEEE arithmetic keeps bit for bit,
    # so every later layer sees the plain model's tensors)
    assert torch.equal(same, plain)


def test_enabling_changes_output_and_disabling_restores_bit_identical(pipe):
    plain = generate(pipe)
    with corr_adapter(pipe, eta=0.1, threshold=0.0, active_steps=None):
        adapted = generate(pipe)
    assert not torch.equal(adapted, plain)
    assert torch.equal(generate(pipe), plain)  # exact: same computation twice (the plain model, restored)


def test_restored_after_exception(pipe):
    plain = generate(pipe)
    with pytest.raises(RuntimeError, match="boom"):
        with corr_adapter(pipe, eta=0.0, threshold=0.0):
            generate(pipe)
            raise RuntimeError("boom")
    assert torch.equal(generate(pipe), plain)  # exact: same computation twice (the plain model, restored)


def test_handle_toggle_and_update_without_reloading(pipe):
    plain = generate(pipe)
    handle = CorrAdapterHandle(pipe, eta=0.2, threshold=0.0, active_steps=None)
    assert not handle.enabled
    handle.enable()
    first = generate(pipe)
    again = generate(pipe)  # a new generation restarts at step 0: same result
    # exact below: same computation twice (the same adapted model twice; eta = 1 and disabled are the plain
    # model, see test_eta_one_reproduces_plain_model_exactly)
    assert torch.equal(first, again) and not torch.equal(first, plain)
    handle.update(eta=1.0)
    assert torch.equal(generate(pipe), plain)
    handle.update(eta=0.2, layers=["blocks.1.attn", "blocks.3.attn"])
    assert handle.enabled and handle.layers == ["blocks.1.attn", "blocks.3.attn"]
    one_layer = generate(pipe)
    assert not torch.equal(one_layer, plain) and not torch.equal(one_layer, first)
    handle.disable()
    assert not handle.enabled
    assert torch.equal(generate(pipe), plain)


def test_refresh_interval_reuses_matches(pipe, monkeypatch):
    calls = []
    real = ca.match_layout

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ca, "match_layout", counting)
    # the matcher's own calls (fused_refresh=False; the fused pass's refreshes are counted in the fused tests)
    with corr_adapter(pipe, layers=["blocks.2.attn"], refresh_every=3, active_steps=None, fused_refresh=False) as handle:
        generate(pipe, steps=7, guidance=2.0)  # CFG: batch of 2
    # steps 0, 3, 6 refresh; each refresh matches every (batch entry, source image): 2 x 3
    assert handle.stats["matcher_refreshes"] == 3
    assert len(calls) == 3 * 2 * 3
    calls.clear()
    with corr_adapter(pipe, layers=["blocks.2.attn"], refresh_every=1, active_steps=None, fused_refresh=False) as handle:
        generate(pipe, steps=7, guidance=1.0)  # no CFG: batch of 1
    assert handle.stats["matcher_refreshes"] == 7 and len(calls) == 7 * 3


def test_active_steps_limit_where_it_applies(pipe):
    with corr_adapter(pipe, threshold=0.0, active_steps=2) as handle:
        limited = generate(pipe, steps=5)
    assert handle.stats["adapted_calls"] == 2 * len(handle.layers)
    assert handle.stats["calls"] == 5 * len(handle.layers)
    with corr_adapter(pipe, threshold=0.0, active_steps=None) as handle:
        everywhere = generate(pipe, steps=5)
    assert handle.stats["adapted_calls"] == 5 * len(handle.layers)
    assert not torch.equal(limited, everywhere)


def test_history_max_runs_and_matches_with_history(pipe):
    with corr_adapter(pipe, threshold=0.0, active_steps=None, history=3, refresh_every=1) as handle:
        out = generate(pipe, steps=4)
    assert torch.isfinite(out).all() and handle.stats["matcher_refreshes"] == 4 * len(handle.layers)


def test_default_layer_is_the_last_when_all_share_one_grid(pipe):
    assert default_adapter_layers(pipe) == ["blocks.3.attn"]
    assert CorrAdapterHandle(pipe).layers == ["blocks.3.attn"]


def test_paper_schedule_is_the_one_rule_and_auto_resolves_through_it():
    from corrlab.interventions import paper_schedule

    assert paper_schedule() == (10, 5)
    assert paper_schedule(video=True) == (15, 5)
    assert paper_schedule(image_conditioned=True) == (None, 5)
    assert paper_schedule(image_conditioned=True, row_wise=True) == (None, 1)
    cfg = CorrAdapterConfig()
    assert (cfg.active_steps, cfg.refresh_every) == ("auto", "auto")
    assert cfg.schedule() == (10, 5) and cfg.schedule(row_wise=True, video=True) == (15, 1)
    assert CorrAdapterConfig(image_conditioned=True).schedule() == (None, 5)
    assert CorrAdapterConfig(active_steps=3, refresh_every=2, image_conditioned=True).schedule(row_wise=True) == (3, 2)
    assert CorrAdapterConfig(video=False).schedule(video=True) == (10, 5)  # the config overrides the model


def test_presets_set_every_release_point_and_the_default_stays_clean():
    clean = CorrAdapterConfig()
    assert (clean.matching.strict, clean.history_for_aggregation, clean.shared_guidance_cache,
            clean.refresh_last_step, clean.window_border, clean.unmatched) == (False, False, False, False, "mask", "original")
    assert clean.matching == MatchingOptions()  # the adapter's defaults are the probe's: one definition
    sync = CorrAdapterConfig.preset("syncdreamer")
    assert (sync.matching.similarity, sync.matching.confidence, sync.matching.history, sync.history_for_aggregation,
            sync.shared_guidance_cache, sync.refresh_last_step, sync.num_steps, sync.active_steps) == (
        "dual_softmax", "window", 11, True, True, True, 50, None)
    mva = CorrAdapterConfig.preset("mvadapter", eta=0.5)
    assert (mva.matching.strict, mva.window, mva.window_border, mva.unmatched, mva.refresh_every, mva.eta) == (
        True, "row", "clamp", "scaled", 1, 0.5)
    assert CorrAdapterConfig.preset_names() == ("syncdreamer", "mvadapter")
    with pytest.raises(CorrlabError, match="name"):
        CorrAdapterConfig.preset("mvdream")
    with pytest.raises(CorrlabError, match="num_steps"):
        CorrAdapterConfig(refresh_last_step=True)
    with pytest.raises(CorrlabError, match="history_for_aggregation"):
        CorrAdapterConfig(history_for_aggregation=True)
    with pytest.raises(CorrlabError, match="window_border"):
        CorrAdapterConfig(window_border="wrap")
    with pytest.raises(ValueRangeError, match="refresh_every"):
        CorrAdapterConfig(refresh_every=0)


def test_guidance_branches_called_separately_keep_their_own_cache():
    """A step with two denoiser calls (true-CFG pipelines): with per-entry caches, the second call between
    refreshes reuses its own matches, not the first call's."""
    g = torch.Generator().manual_seed(0)
    layout = TokenLayout(2, (3, 3), (12, 12))
    qs = [torch.randn(1, 2, 1, 9, 4, generator=g) * 3 for _ in range(2)]  # the two branches differ
    adapter = CorrAdapter(CorrAdapterConfig.build(eta=0.0, threshold=0.0, active_steps=None, refresh_every=2))
    outs = {}
    for step in range(2):
        for branch in range(2):
            q = qs[branch]
            call = AttentionCall("l", q, q, q, torch.zeros_like(q), 0.5, layout, 2 * step + branch, 10.0 - step,
                                 step=step, slot=branch, generation=0)
            outs[step, branch] = adapter(call).clone()
    assert adapter.stats["matcher_refreshes"] == 2  # step 0, both branches
    assert torch.equal(outs[0, 0], outs[1, 0]) and torch.equal(outs[0, 1], outs[1, 1])
    assert not torch.equal(outs[1, 0], outs[1, 1])


def test_window_auto_follows_the_layouts_row_wise_flag():
    """``window="auto"`` reads ``TokenLayout.row_wise``: a row window on row-wise layouts, a square elsewhere."""
    g = torch.Generator().manual_seed(3)
    q, k, v, out = (torch.randn(1, 2, 2, 12, 4, generator=g) for _ in range(4))

    def run(window, row_wise):
        layout = TokenLayout(2, (3, 4), (12, 16), row_wise=row_wise)
        adapter = CorrAdapter(CorrAdapterConfig.build(eta=0.0, window_radius=1, threshold=0.0, active_steps=None, window=window))
        call = AttentionCall("l", q, k, v, out.clone(), 0.5, layout, 0, 1.0, step=0, slot=0, generation=0)
        return adapter(call)

    # exact: "auto" resolves to the same window shape, so the same computation runs
    assert torch.equal(run("auto", True), run("row", True)) and torch.equal(run("auto", False), run("square", False))
    assert not torch.equal(run("row", True), run("square", True))  # the flag matters on these inputs


def test_bad_parameters_raise(pipe):
    with pytest.raises(ValueRangeError, match="eta"):
        CorrAdapterConfig(eta=1.5)
    with pytest.raises(ValueRangeError, match="active_steps"):
        CorrAdapterConfig(active_steps=0)
    with pytest.raises(CorrlabError, match="confidence"):
        CorrAdapterConfig.build(confidence="local")
    with pytest.raises(CorrlabError, match="matching: expected a corrlab.probing.MatchingOptions"):
        CorrAdapterConfig(matching={"threshold": 0.1})
    with pytest.raises(CorrlabError, match="unknown CorrAdapter parameters"):
        CorrAdapterHandle(pipe, etaa=0.1)
    with pytest.raises(CorrlabError, match="layers"):
        CorrAdapterHandle(pipe, layers=["blocks.9.attn"])
    handle = CorrAdapterHandle(pipe)
    with pytest.raises(ValueRangeError, match="window_radius"):
        handle.update(window_radius=-1)
    with pytest.raises(CorrlabError, match="unknown CorrAdapter parameters \\['radius'\\]"):
        handle.update(radius=2)
    assert handle.config.radius == 3 and handle.config.matching.window_radius == 3


def test_cli_options_build_the_handle(pipe):
    import argparse

    from corrlab.commands import generate as generate_command

    parser = argparse.ArgumentParser()
    generate_command.register(parser.add_subparsers())
    base = ["generate", "--prompt", "red box", "--out", "unused"]
    args = parser.parse_args(base + ["--corr-adapter", "--eta", "0.5", "--radius", "2", "--active-steps", "0", "--refresh", "3"])
    handle = generate_command._corr_adapter(args, pipe)
    assert not handle.enabled
    assert (handle.config.eta, handle.config.radius, handle.config.active_steps, handle.config.refresh_every) == (0.5, 2, None, 3)
    assert generate_command._corr_adapter(parser.parse_args(base), pipe) is None
    with pytest.raises(CorrlabError, match="--eta"):
        generate_command._corr_adapter(parser.parse_args(base + ["--eta", "0.5"]), pipe)
    with pytest.raises(CorrlabError, match="--preset"):
        generate_command._corr_adapter(parser.parse_args(base + ["--preset", "mvadapter"]), pipe)
    sync = generate_command._corr_adapter(parser.parse_args(base + ["--corr-adapter", "--preset", "syncdreamer",
                                                                    "--steps", "7", "--eta", "0.3"]), pipe)
    assert sync.config == CorrAdapterConfig.preset("syncdreamer", num_steps=7, eta=0.3)
    mva = generate_command._corr_adapter(parser.parse_args(base + ["--corr-adapter", "--preset", "mvadapter"]), pipe)
    assert mva.config == CorrAdapterConfig.preset("mvadapter")
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--corr-adapter", "--preset", "nope"])


# --------------------------------------------------------------------------------- the aggregation itself
def naive_aggregation(q, k, v, index, kept, grid, scale, radius, window):
    """Loop-by-loop reference of methods.md section 2 (float64)."""
    B, V, H, N, _ = q.shape
    h, w = grid
    agg = torch.zeros(B, V, H, N, v.shape[-1], dtype=torch.float64)
    cnt = torch.zeros(B, V, H, N, dtype=torch.float64)
    for b in range(B):
        for i in range(V):
            others = [j for j in range(V) if j != i]
            for hd in range(H):
                hm = hd if index.shape[2] == H else 0
                for p in range(N):
                    for t, j in enumerate(others):
                        if not kept[b, i, hm, t, p]:
                            continue
                        r0, c0 = divmod(int(index[b, i, hm, t, p]), w)
                        offsets = [(0, dc) for dc in range(-radius, radius + 1)] if window == "row" else [
                            (dr, dc) for dr in range(-radius, radius + 1) for dc in range(-radius, radius + 1)]
                        toks = [(r0 + dr) * w + (c0 + dc) for dr, dc in offsets
                                if 0 <= r0 + dr < h and 0 <= c0 + dc < w]
                        logits = torch.stack([scale * (q[b, i, hd, p] @ k[b, j, hd, l]) for l in toks])
                        weights = torch.softmax(logits, dim=0)
                        agg[b, i, hd, p] += sum(wt * v[b, j, hd, l] for wt, l in zip(weights, toks))
                        cnt[b, i, hd, p] += 1
    return agg / cnt.clamp(min=1).unsqueeze(-1), cnt


def random_case(seed: int, heads_matched: int, B=2, V=3, H=2, grid=(3, 4), d=5):
    g = torch.Generator().manual_seed(seed)
    N = grid[0] * grid[1]
    q, k, v = (torch.randn(B, V, H, N, d, generator=g, dtype=torch.float64) for _ in range(3))
    index = torch.randint(0, N, (B, V, heads_matched, V - 1, N), generator=g)
    kept = torch.rand(B, V, heads_matched, V - 1, N, generator=g) < 0.6
    return q, k, v, index, kept


@pytest.mark.parametrize("kernel", ["dense", "gathered"])
@pytest.mark.parametrize("heads_matched, window, radius, chunk", [(2, "square", 1, 7), (1, "square", 2, 512), (2, "row", 1, 3)])
def test_windowed_aggregation_equals_naive_reference(heads_matched, window, radius, chunk, kernel, monkeypatch):
    use_kernel(kernel, monkeypatch)
    q, k, v, index, kept = random_case(heads_matched + radius, heads_matched)
    scale = 1 / math.sqrt(q.shape[-1])
    options = AggregationOptions(radius=radius, eta=0.3, window=window, chunk_size=chunk)
    got, count = windowed_aggregation(MatchedAttention(q, k, v, index, kept, (3, 4), scale), options)
    ref, ref_count = naive_aggregation(q, k, v, index, kept, (3, 4), scale, radius, window)
    assert torch.equal(count, ref_count)  # exact: integer counts
    # float64, different summation orders: a few ulps
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    # the fused output is the blend of the aggregation, on strided (non-contiguous) inputs too
    original = torch.randn(v.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    qs, ks, vs = (x.transpose(2, 3).contiguous().transpose(2, 3) for x in (q, k, v))
    fused = corr_adapted_output(original, MatchedAttention(qs, ks, vs, index, kept, (3, 4), scale), options)
    torch.testing.assert_close(fused, blend_aggregated(original, ref, ref_count, 0.3), rtol=1e-10, atol=1e-12)
    untouched = ref_count == 0
    # exact: rows without a kept match are copied, never written
    assert untouched.any() and torch.equal(fused[untouched], original[untouched])
    att = MatchedAttention(q, k, v, index, kept, (3, 4), scale)
    exact = corr_adapted_output(original, att, AggregationOptions(radius=radius, eta=1.0))
    assert torch.equal(exact, original)  # exact: the documented eta = 1 guarantee (x * 1 + 0 == x in IEEE)
    # in place, also into a tensor whose rows are not contiguous (written through a copy)
    for target in (original.clone(), original.transpose(-1, -2).contiguous().transpose(-1, -2)):
        same = corr_adapted_output(target, att, options, inplace=True)
        assert same is target
        torch.testing.assert_close(target, fused, rtol=1e-12, atol=1e-12)


def use_kernel(kernel: str, monkeypatch) -> None:
    """Route the windowed attention through one kernel: "compiled" (C, float32 CPU), "dense" or "gathered" (torch)."""
    if kernel == "compiled":
        if ca.load_window_kernel() is None:
            pytest.skip(f"no compiled kernel here: {match_kernel_status()}")
        monkeypatch.setattr(ca, "load_window_kernel", ca.load_window_kernel)
    else:
        monkeypatch.setattr(ca, "load_window_kernel", lambda: None)
        monkeypatch.setattr(ca, "DENSE_WINDOW_MAX_TOKENS", 10**9 if kernel == "dense" else 0)


@pytest.mark.parametrize("border, window, unmatched", [("clamp", "square", "scaled"), ("mask", "row", "original"),
                                                       ("clamp", "row", "original"), ("mask", "square", "original")])
def test_the_three_kernels_agree(border, window, unmatched, monkeypatch):
    """The kernels of the windowed attention (compiled C for float32 on the CPU, dense logits for small images,
    gathered windows for large ones) on float32 inputs, every border / window / unmatched rule, a block size that
    splits the rows, a head size that is not a multiple of the C kernel's 8 lanes."""
    g = torch.Generator().manual_seed(21)
    B, V, H, grid, d = 2, 3, 2, (5, 6), 11
    N = grid[0] * grid[1]
    q, k, v = (torch.randn(B, V, H, N, d, generator=g) for _ in range(3))
    index = torch.randint(0, N, (B, V, H, V - 1, N), generator=g)
    kept = torch.rand(B, V, H, V - 1, N, generator=g) < 0.5
    att = MatchedAttention(q, k, v, index, kept, grid, 0.4)
    options = AggregationOptions(radius=2, eta=0.2, window=window, border=border, unmatched=unmatched, chunk_size=5)
    original = torch.randn(v.shape, generator=g)
    out = {}
    kernels = ("dense", "gathered") + (("compiled",) if ca.load_window_kernel() is not None else ())
    for kernel in kernels:
        with monkeypatch.context() as m:
            use_kernel(kernel, m)
            out[kernel] = (corr_adapted_output(original, att, options), windowed_aggregation(att, options))
    for kernel in kernels[1:]:
        # float32, different summation orders (matmul vs dot products): a few ulps of values ~1
        torch.testing.assert_close(out[kernel][0], out["dense"][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[kernel][1][0], out["dense"][1][0], rtol=1e-5, atol=1e-5)
        assert torch.equal(out[kernel][1][1], out["dense"][1][1])  # exact: integer counts
    assert not torch.equal(out["dense"][0], original)  # the case adapts something


@pytest.mark.parametrize("heads_matched, window, radius, d", [(2, "square", 1, 5), (1, "square", 4, 19), (2, "row", 5, 8),
                                                              (2, "square", 3, 45)])
def test_the_compiled_kernel_equals_naive_reference(heads_matched, window, radius, d, monkeypatch):
    """The C kernel (float32) against the float64 loop reference: window radii above and below its 8-lane chunks
    (r = 4, 5: 9 and 11 columns), windows cut by every border of a small grid, head sizes with lane tails."""
    use_kernel("compiled", monkeypatch)
    q, k, v, index, kept = random_case(radius + d, heads_matched, d=d)
    scale = 1 / math.sqrt(d)
    options = AggregationOptions(radius=radius, eta=0.3, window=window)
    got, count = windowed_aggregation(MatchedAttention(q.float(), k.float(), v.float(), index, kept, (3, 4), scale),
                                      options)
    ref, ref_count = naive_aggregation(q, k, v, index, kept, (3, 4), scale, radius, window)
    assert got.dtype == torch.float32 and torch.equal(count, ref_count.float())  # exact: integer counts
    torch.testing.assert_close(got, ref.float(), rtol=1e-5, atol=1e-5)  # float32 arithmetic against float64
    # the blend, in place into strided rows (the attention processors' layout: tokens outer, heads inner)
    original = torch.randn(v.shape, generator=torch.Generator().manual_seed(9))
    target = original.transpose(2, 3).contiguous().transpose(2, 3)
    qs, ks, vs = (x.float().transpose(2, 3).contiguous().transpose(2, 3) for x in (q, k, v))
    out = corr_adapted_output(target, MatchedAttention(qs, ks, vs, index, kept, (3, 4), scale), options, inplace=True)
    assert out is target
    torch.testing.assert_close(out, blend_aggregated(original, ref.float(), ref_count, 0.3), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[ref_count == 0], original[ref_count == 0])  # exact: rows without a kept match untouched


def test_the_compiled_kernel_is_deterministic_and_propagates_nan(monkeypatch):
    """Same inputs twice, on one thread or two: bit-identical (each output row is computed whole by one thread in
    a fixed order). A NaN query makes its own rows NaN, as torch's softmax would, and touches no other row."""
    use_kernel("compiled", monkeypatch)
    q, k, v, index, kept = random_case(3, 2, B=2, V=4, H=2, grid=(6, 5), d=13)
    q, k, v = q.float(), k.float(), v.float()
    att = MatchedAttention(q, k, v, index, kept, (6, 5), 0.3)
    options = AggregationOptions(radius=2, eta=0.1)
    original = torch.randn(v.shape)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = corr_adapted_output(original, att, options)
        torch.set_num_threads(2)
        two = corr_adapted_output(original, att, options)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two) and torch.equal(one, corr_adapted_output(original, att, options))  # exact: same computation
    q_nan = q.clone()
    q_nan[0, 1, 0, 7] = float("nan")
    bad = corr_adapted_output(original, MatchedAttention(q_nan, k, v, index, kept, (6, 5), 0.3), options)
    row_kept = kept[0, 1, 0, :, 7].any()
    assert bool(row_kept) and bad[0, 1, 0, 7].isnan().all()
    others = torch.ones(bad.shape[:-1], dtype=torch.bool)
    others[0, 1, 0, 7] = False
    assert torch.equal(bad[others], one[others])  # exact: the same computation for every other row


def test_the_compiled_kernel_refuses_rows_it_cannot_read():
    """The low-level entry checks what the C code would otherwise read out of bounds."""
    if ca.load_window_kernel() is None:
        pytest.skip(match_kernel_status())
    from corrlab.probing.match_kernel import window_attention

    B, V, H, N, d = 1, 2, 1, 4, 3
    rows = tuple(torch.zeros(B * V * H * N, d) for _ in range(4))
    strides = ((0, V * H * N, H * N, N, 1),) * 4
    index = torch.zeros(B, V, H, V - 1, N, dtype=torch.long)
    kept = torch.ones_like(index, dtype=torch.bool)
    kw = dict(clamp=False, scale=1.0, eta=0.5, scale_out=True)
    window_attention(rows, strides, H, index, kept, (2, 2), (1, 1), **kw)  # fits: no error
    with pytest.raises(ShapeError, match="out rows"):
        window_attention(rows, strides[:3] + ((1, V * H * N, H * N, N, 1),), H, index, kept, (2, 2), (1, 1), **kw)
    with pytest.raises(ValueRangeError, match=r"index: expected token indices in \[0, 4\)"):
        window_attention(rows, strides, H, index + 4, kept, (2, 2), (1, 1), **kw)
    with pytest.raises(ShapeError, match="grid"):
        window_attention(rows, strides, H, index, kept, (3, 2), (1, 1), **kw)
    with pytest.raises(ShapeError, match="float32"):
        window_attention(tuple(r.double() for r in rows), strides, H, index, kept, (2, 2), (1, 1), **kw)


def _perfect_call(eta_out: torch.Tensor, B=2, H=2, grid=(4, 4)) -> tuple[AttentionCall, torch.Tensor]:
    """Two images whose keys are one-hot per token: image 0 token p matches image 1 token perm[p] exactly."""
    N = grid[0] * grid[1]
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(5))
    eye = 20.0 * torch.eye(N)
    q = torch.zeros(B, 2, H, N, N)
    k = torch.zeros(B, 2, H, N, N)
    q[:, 0] = eye[perm]  # query p of image 0 looks for key perm[p] of image 1
    k[:, 1] = eye
    q[:, 1] = eye  # image 1's queries look for the same key index in image 0 ...
    k[:, 0] = eye[perm]  # ... whose keys are permuted: token l of image 1 matches token perm^-1[l]
    v = torch.randn(B, 2, H, N, N, generator=torch.Generator().manual_seed(6))
    layout = TokenLayout(2, grid, (4 * grid[0], 4 * grid[1]))
    call = AttentionCall("blocks.0.attn", q, k, v, eta_out, 1 / math.sqrt(N), layout, 0, 1.0, step=0, slot=0, generation=0)
    return call, perm


def test_perfect_match_with_radius_zero_returns_the_matched_value():
    B, H, N = 2, 2, 16
    out = torch.randn(B, 2, H, N, N, generator=torch.Generator().manual_seed(7))
    call, perm = _perfect_call(out, B, H)
    adapter = CorrAdapter(CorrAdapterConfig.build(eta=0.0, window_radius=0, active_steps=None))
    new = adapter(call)
    inverse = torch.argsort(perm)
    assert adapter.stats["kept"] == adapter.stats["total"] == B * 2 * H * N  # every match kept, both CFG halves
    torch.testing.assert_close(new[:, 0], call.v[:, 1][:, :, perm], rtol=0, atol=1e-6)
    torch.testing.assert_close(new[:, 1], call.v[:, 0][:, :, inverse], rtol=0, atol=1e-6)
    blended = CorrAdapter(CorrAdapterConfig.build(eta=0.25, window_radius=0, active_steps=None))(call)
    torch.testing.assert_close(blended[:, 0], 0.25 * out[:, 0] + 0.75 * call.v[:, 1][:, :, perm], rtol=0, atol=1e-6)


def test_window_token_indices_masks_outside_entries():
    tok, inside = window_token_indices(torch.tensor([0, 5]), (3, 4), 1)
    assert tok.shape == (2, 9) and inside[0].sum() == 4 and inside[1].all()
    assert tok[1].tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    tok, inside = window_token_indices(torch.tensor([4]), (3, 4), 2, "row")
    assert tok.shape == (1, 5) and inside[0].tolist() == [False, False, True, True, True]
    assert tok[0, 2:].tolist() == [4, 5, 6]
    assert other_images(3).tolist() == [[1, 2], [0, 2], [0, 1]]


def test_aggregation_rejects_bad_shapes():
    q, k, v, index, kept = random_case(0, 2)
    with pytest.raises(ShapeError, match="index"):
        MatchedAttention(q, k, v, index[:, :, :, :1], kept, (3, 4), 1.0)
    with pytest.raises(ShapeError, match="grid"):
        MatchedAttention(q, k, v, index, kept, (4, 4), 1.0)
    with pytest.raises(ShapeError, match="kept"):
        MatchedAttention(q, k, v, index, kept.long(), (3, 4), 1.0)
    with pytest.raises(ValueRangeError, match="scale"):
        MatchedAttention(q, k, v, index, kept, (3, 4), 0.0)
    with pytest.raises(ValueRangeError, match=r"index: expected token indices in \[0, 12\), got values in \[.*, 12\]"):
        MatchedAttention(q, k, v, index.index_fill(-1, torch.tensor([0]), 12), kept, (3, 4), 1.0)
    with pytest.raises(ValueRangeError, match=r"index: expected token indices in \[0, 12\), got values in \[-1, "):
        MatchedAttention(q, k, v, index.index_fill(-1, torch.tensor([5]), -1), kept, (3, 4), 1.0)
    with pytest.raises(CorrlabError, match="options: expected an AggregationOptions"):
        windowed_aggregation(MatchedAttention(q, k, v, index, kept, (3, 4), 1.0), {"radius": 1})


def test_window_kernels_benchmark_compares_every_kernel(capsys):
    """benchmarks/window_kernels.py (smoke size): every kernel's output agrees with the dense one, its key=value line
    says which kernels ran and restores the module's settings afterwards."""
    from model_helpers import load_benchmark

    saved = (ca.DENSE_WINDOW_MAX_TOKENS, ca.load_window_kernel)
    assert load_benchmark("window_kernels").main(["--sides", "5", "--repeats", "1", "--head-size", "9"]) == 0
    assert (ca.DENSE_WINDOW_MAX_TOKENS, ca.load_window_kernel) == saved
    summary = dict(kv.split("=") for kv in capsys.readouterr().out.strip().splitlines()[-1].split())
    assert summary["compiled"] == str(ca.load_window_kernel() is not None)
    assert float(summary["max_diff@25"]) < 1e-5
    assert ("speedup_compiled@25" in summary) == (summary["compiled"] == "True")


def test_windows_too_long_for_the_compiled_kernel_go_to_torch(monkeypatch):
    """Above COMPILED_WINDOW_MAX_ENTRIES entries the torch kernels run (the C sums lose precision over very long
    windows): the result equals the torch path's exactly, and a window just inside the bound takes the C kernel."""
    if ca.load_window_kernel() is None:
        pytest.skip(match_kernel_status())
    q, k, v, index, kept = random_case(4, 1, B=1, V=2, H=1, grid=(4, 5), d=6)
    att = MatchedAttention(q.float(), k.float(), v.float(), index, kept, (4, 5), 0.5)
    calls = []
    real = ca.window_attention
    monkeypatch.setattr(ca, "window_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    r = 16  # 33 x 33 = 1089 entries > 1024
    assert (2 * r + 1) ** 2 > ca.COMPILED_WINDOW_MAX_ENTRIES >= (2 * r - 1) ** 2
    long_window = AggregationOptions(radius=r, eta=0.3, border="clamp")
    got = windowed_aggregation(att, long_window)[0]
    assert calls == []
    with monkeypatch.context() as m:
        use_kernel("dense", m)
        assert torch.equal(got, windowed_aggregation(att, long_window)[0])  # exact: the same torch computation
    windowed_aggregation(att, AggregationOptions(radius=r - 1, eta=0.3, border="clamp"))
    assert calls == [1]


# ------------------------------------------------------------------- fused refresh (the attention's own pass)
def _adapted(pipe, **params):
    with corr_adapter(pipe, active_steps=None, refresh_every=2, layers=["blocks.1.attn", "blocks.3.attn"],
                      threshold=0.02, **params) as handle:
        images = generate(pipe, steps=4)
    return images, dict(handle.stats)


def test_fused_refresh_takes_its_matches_from_the_attention_pass(pipe):
    """At refresh steps the attention output and the matches come from one pass (the probe's compiled kernel): the
    generation equals the unfused one up to float rounding and counts the same refreshes and kept slots."""
    if load_match_kernel() is None:
        pytest.skip(match_kernel_status())
    fused, s_fused = _adapted(pipe)
    unfused, s_unfused = _adapted(pipe, fused_refresh=False)
    assert s_fused["fused_refreshes"] == s_fused["matcher_refreshes"] == s_unfused["matcher_refreshes"] == 2 * 2  # steps 0, 2
    assert s_unfused["fused_refreshes"] == 0
    assert s_fused["kept"] == s_unfused["kept"] and 0 < s_fused["kept"] < s_fused["total"]
    assert s_fused["adapted_calls"] == s_unfused["adapted_calls"] == s_fused["calls"] == 4 * 2  # CFG in one call
    # float32 rounding of another summation order, carried through 4 steps of a 4-block model
    torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-4)
    assert not torch.equal(fused, generate(pipe, steps=4))  # the adapter acts


@pytest.mark.parametrize("params", [dict(eta=1.0), dict(confidence="window"), dict(history=2), dict(heads="mean"),
                                    dict(shared_guidance_cache=True)])
def test_fused_refresh_steps_aside_where_it_does_not_apply(pipe, params):
    """eta = 1 (the bit-exact "adapter off"), matching options the compiled pass does not compute, and the
    guidance-shared cache: the model's kernel and the matcher run, as with fused_refresh=False, bit for bit."""
    images, stats = _adapted(pipe, **params)
    reference, _ = _adapted(pipe, fused_refresh=False, **params)
    assert stats["fused_refreshes"] == 0 and stats["matcher_refreshes"] > 0
    assert torch.equal(images, reference)  # exact: the same computation twice
