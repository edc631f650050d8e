"""Kernel interception: thread isolation, restoration after exceptions, attach-only-on-request, fused kernel."""
from __future__ import annotations

import threading

import diffusers.models.attention_dispatch as attention_dispatch
import diffusers.models.attention_processor as attention_processor
import diffusers.models.transformers.transformer_wan as transformer_wan
import pytest
import torch
import torch.nn.functional as F

from corrlab.errors import CorrlabError
from corrlab.model import CorrlabPipeline, MultiViewDiT
from corrlab.probing import interception, probe
from corrlab.probing.extended_attention import extended_attention
from corrlab.probing.fused_attention import fused_attention_matches
from corrlab.probing.matcher import match_views, max_argmax
from corrlab.probing.taps import AttentionTaps
from matching_reference import logit_error_bound
from test_taps import run, tiny_unet, tiny_wan, unet_inputs, wan_inputs

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)

STEPS = 2
TIMEOUT = 60  # seconds a thread waits at a barrier before the test fails (a broken barrier)


def tiny_pipe(num_layers: int, num_heads: int, seed: int) -> CorrlabPipeline:
    torch.manual_seed(seed)
    model = MultiViewDiT(sample_size=16, patch_size=4, hidden_size=32, num_layers=num_layers, num_heads=num_heads,
                         mlp_ratio=2.0)
    with torch.no_grad():  # adaLN-zero layers start at 0: randomise them so attention matters
        for p in [model.proj_out.weight, model.ada_out[1].weight] + [b.ada[1].weight for b in model.blocks]:
            p.normal_(0.0, 0.2)
    return CorrlabPipeline(model)


def generate(pipe, num_views: int, seed: int = 4) -> torch.Tensor:
    return pipe("red striped box", num_views=num_views, num_inference_steps=STEPS, guidance_scale=2.0, seed=seed,
                progress=False).images


def assert_nothing_patched(*models) -> None:
    for model in models:
        for name, m in model.named_modules():
            assert not m._forward_hooks and not m._forward_pre_hooks, f"hooks left on {name!r}"
    assert attention_processor.F is torch.nn.functional
    assert transformer_wan.dispatch_attention_fn is attention_dispatch.dispatch_attention_fn
    assert interception.active_frames() == []
    assert interception._patch_counts == {}


def run_threads(*targets) -> None:
    """Run the targets in threads at once; re-raise the first error of any of them."""
    errors: list[BaseException] = []

    def wrap(fn):
        def body():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                errors.append(e)
        return body

    threads = [threading.Thread(target=wrap(fn)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 4)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]


def barrier_inside(module: torch.nn.Module, barrier: threading.Barrier):
    """A forward hook on ``module`` (inside an attention layer) that waits at ``barrier`` on every call."""
    def wait(mod, args, out):
        barrier.wait(TIMEOUT)

    return module.register_forward_hook(wait)


# ------------------------------------------------------------------------------------------ threads
def test_two_pipelines_probed_in_two_threads_see_only_their_own_calls():
    a, b = tiny_pipe(num_layers=2, num_heads=2, seed=0), tiny_pipe(num_layers=3, num_heads=4, seed=1)
    views = {"a": 3, "b": 2}
    ref = {"a": generate(a, views["a"]), "b": generate(b, views["b"])}  # unprobed, one after the other
    overlap = []

    def both_inside():  # runs once, when both threads wait inside their first tapped layer
        overlap.append((attention_processor.F is not torch.nn.functional, len(interception.active_frames()),
                        sum(c[0] for c in interception._patch_counts.values())))

    barrier = threading.Barrier(2, action=both_inside)
    hooks = [barrier_inside(p.model.blocks[0].attn.to_q, barrier) for p in (a, b)]
    results: dict = {}

    def work(name, pipe):
        def body():
            log = []
            with probe(pipe) as rec, AttentionTaps(pipe, None, lambda c: log.append(
                    (threading.get_ident(), c.layer, tuple(c.q.shape)))):
                out = generate(pipe, views[name])
            results[name] = (out, rec, log, threading.get_ident())
        return body

    try:
        run_threads(work("a", a), work("b", b))
    finally:
        for h in hooks:
            h.remove()
    # the forward passes overlapped: at each barrier both threads were inside an intercepted layer (the
    # shared F swapped, counted twice); the barrier's action runs in one thread, which has one active frame
    assert overlap and all(o == (True, 1, 2) for o in overlap)
    for name, pipe in (("a", a), ("b", b)):
        out, rec, log, ident = results[name]
        assert torch.equal(out, ref[name])  # exact: same computation twice (probes only observe)
        names = [f"blocks.{i}.attn" for i in range(len(pipe.model.blocks))]
        assert rec.layers == names and rec.steps == list(range(STEPS)) and rec.num_images == views[name]
        heads = pipe.model.config.num_heads
        # every call this thread's taps saw is its own model's: one per layer and step, its views and heads
        assert {entry[0] for entry in log} == {ident}
        assert [entry[1] for entry in log] == names * STEPS
        assert {entry[2] for entry in log} == {(2, views[name], heads, 4 * 4, 32 // heads)}
    assert_nothing_patched(a.model, b.model)


def test_a_model_shared_with_an_unprobed_thread_computes_that_thread_untouched():
    pipe = tiny_pipe(num_layers=2, num_heads=2, seed=0)
    ref = generate(pipe, 3)
    barrier = threading.Barrier(2)
    hook = barrier_inside(pipe.model.blocks[0].attn.to_q, barrier)
    log, outs = [], {}

    def probed():
        with AttentionTaps(pipe, None, lambda c: log.append(threading.get_ident())):
            outs["probed"] = generate(pipe, 3)

    def plain():
        outs["plain"] = generate(pipe, 3)

    try:
        run_threads(probed, plain)
    finally:
        hook.remove()
    assert torch.equal(outs["probed"], ref) and torch.equal(outs["plain"], ref)  # exact: same computation
    assert len(log) == 2 * STEPS and len(set(log)) == 1  # only the probing thread's calls were tapped
    assert_nothing_patched(pipe.model)


# ------------------------------------------------------------------------------------------ exceptions
class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("family", ["dit", "wan"])
def test_nothing_stays_patched_after_an_exception_inside_the_with(family):
    if family == "dit":
        pipe = tiny_pipe(num_layers=2, num_heads=2, seed=0)
        model, call = pipe.model, lambda: generate(pipe, 3)
        inner = model.blocks[1].attn.to_k  # runs inside an intercepted layer, after its frame is entered
    else:
        model = tiny_wan()
        call, inner = (lambda: run(model, wan_inputs())), model.blocks[1].attn1.to_k
    calls = {"n": 0}

    def explode(mod, args, out):
        calls["n"] += 1
        raise Boom("inside the layer")

    hook = inner.register_forward_hook(explode)
    with pytest.raises(Boom):
        with probe(model), AttentionTaps(model, None, lambda c: None):
            call()
    hook.remove()
    assert calls["n"] == 1
    assert_nothing_patched(model)
    with pytest.raises(Boom):  # raised in the with body, after the calls
        with probe(model):
            call()
            raise Boom("after")
    assert_nothing_patched(model)


# ------------------------------------------------------------------------------------------ handles
def test_nothing_attaches_before_with_or_attach():
    unet = tiny_unet()
    inputs = unet_inputs(batch=2)
    plain = run(unet, inputs)
    ext = extended_attention(unet, 2)  # constructing attaches nothing
    taps = AttentionTaps(unet, None, lambda c: None)
    assert_nothing_patched(unet)
    assert torch.equal(run(unet, inputs), plain)  # exact: same computation twice
    handle = ext.attach()
    assert handle is ext and ext.attached
    grouped = run(unet, inputs)
    assert not torch.allclose(grouped, plain, atol=1e-5)
    with pytest.raises(CorrlabError, match="already attached"):
        ext.attach()
    handle.remove()
    handle.remove()  # idempotent
    assert not ext.attached
    assert_nothing_patched(unet)
    with ext:  # the same object, now as a context
        assert torch.equal(run(unet, inputs), grouped)  # exact: same computation twice
    assert taps.attach() is taps and taps.attached
    taps.remove()
    assert_nothing_patched(unet)
    assert torch.equal(run(unet, inputs), plain)  # exact: same computation twice


# ------------------------------------------------------------------------------------------ fused kernel
#: Fused vs SDPA outputs: both are float32 softmax(scale q k^T) v over L <= 60 keys, summed in different
#: orders; the relative rounding of such a sum stays far below 1e-4 (L * 2^-24 ~ 4e-6), |v| ~ 1.
OUT_ATOL, OUT_RTOL = 1e-5, 1e-4
#: Fused vs exact-mode confidences: the same formula from differently rounded float32 exponentials.
CONF_ATOL = 1e-5


def random_qkv(H=2, V=3, grid=(4, 5), d=8, seed=0, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    return [torch.randn(H, V * n, d, generator=g) * spread for _ in range(3)]


def compare_with_exact(q, k, grid, scale, index, conf, kept, heads, confidence):
    """Fused matches vs :func:`match_views` on the same q / k. Rule: indices (and kept flags) equal for every
    source token whose float64 top-2 score gap exceeds float32 rounding (a near-tie may flip); confidences
    within CONF_ATOL everywhere the indices agree; at least 90 % of tokens are unambiguous."""
    H, L, d = q.shape
    n = grid[0] * grid[1]
    V = L // n
    bound = logit_error_bound(q, k, scale, heads)
    checked = total = 0
    for i in range(V):
        tgts = [j for j in range(V) if j != i]
        qi = q[:, i * n:(i + 1) * n]
        kt = k.view(H, V, n, d)[:, tgts]
        m = match_views(qi, kt, grid, scale=scale, heads=heads, confidence=confidence)
        sim = scale * torch.einsum("hnd,htmd->htnm", qi.double(), kt.double())
        if heads == "mean":
            sim = sim.mean(0, keepdim=True)
        top = sim.topk(2, dim=-1).values
        clear = (top[..., 0] - top[..., 1]) > bound  # (H', T, n)
        fi, fc, fk = index[:, i, tgts], conf[:, i, tgts], kept[:, i, tgts]
        assert torch.equal(fi[clear], m.index[clear])
        same = fi == m.index
        assert torch.allclose(fc[same], m.confidence[same], atol=CONF_ATOL, rtol=0)
        near = (m.confidence - 0.05).abs() <= CONF_ATOL
        assert torch.equal(fk[clear & ~near], m.kept[clear & ~near])
        checked, total = checked + int(clear.sum()), total + clear.numel()
    assert checked >= 0.9 * total, f"only {checked}/{total} unambiguous tokens: the comparison would say little"


@pytest.mark.parametrize("heads", ["per_head", "mean"])
@pytest.mark.parametrize("confidence", ["global", "window"])
@pytest.mark.parametrize("chunk_size", [7, 256])
def test_fused_kernel_equals_sdpa_and_the_exact_matches(heads, confidence, chunk_size):
    q, k, v = random_qkv()
    scale = 8 ** -0.5
    out, index, conf, kept = fused_attention_matches(q, k, v, (4, 5), scale=scale, heads=heads,
                                                     confidence=confidence, chunk_size=chunk_size, window_radius=1)
    ref = F.scaled_dot_product_attention(q[None], k[None], v[None], scale=scale)[0]
    assert torch.allclose(out, ref, atol=OUT_ATOL, rtol=OUT_RTOL)
    hp = 2 if heads == "per_head" else 1
    assert index.shape == conf.shape == kept.shape == (hp, 3, 3, 20)
    if confidence == "window":  # window matches of the exact matcher use the same radius
        H, n = 2, 20
        for i in range(3):
            tgts = [j for j in range(3) if j != i]
            m = match_views(q[:, i * n:(i + 1) * n], k.view(H, 3, n, 8)[:, tgts], (4, 5), scale=scale, heads=heads,
                            confidence="window", window_radius=1)
            same = index[:, i, tgts] == m.index
            assert same.float().mean() >= 0.9
            assert torch.allclose(conf[:, i, tgts][same], m.confidence[same], atol=CONF_ATOL, rtol=0)
    else:
        compare_with_exact(q, k, (4, 5), scale, index, conf, kept, heads, confidence)


def test_fused_kernel_recomputes_blocks_far_below_the_row_max():
    """A target image whose logits lie ~200 below the row max: exp underflows there, the fused kernel
    recomputes those blocks' confidences from fresh logits instead of dividing zeros."""
    q, k, v = random_qkv(H=1, V=3, grid=(2, 3), d=4, spread=0.3)
    n = 6
    q[..., 0] = 1.0
    k[:, :n, 0] = 100.0  # image 0: logits ~ +100
    k[:, 2 * n:, 0] = -100.0  # image 2: logits ~ -100
    out, index, conf, kept = fused_attention_matches(q, k, v, (2, 3), scale=1.0)
    assert torch.isfinite(conf).all()
    ref = F.scaled_dot_product_attention(q[None], k[None], v[None], scale=1.0)[0]
    assert torch.allclose(out, ref, atol=OUT_ATOL, rtol=OUT_RTOL)
    compare_with_exact(q, k, (2, 3), 1.0, index, conf, kept, "per_head", "global")


def test_max_argmax_equals_amax_and_the_first_argmax():
    g = torch.Generator().manual_seed(0)
    for x in (torch.randn(3, 4, 37, generator=g), torch.randint(0, 3, (5, 64), generator=g).float()):  # ties
        vals, idx = max_argmax(x)
        assert torch.equal(idx, x.argmax(-1)) and torch.equal(vals, x.amax(-1))  # exact: the same selection


def test_probe_fused_mode_records_the_exact_modes_matches_and_nearly_its_outputs():
    pipe = tiny_pipe(num_layers=2, num_heads=2, seed=0)
    captured = []

    def keep(c):
        if not captured:
            captured.append((c.q[0].clone(), c.k[0].clone(), c.scale))

    with probe(pipe) as exact, AttentionTaps(pipe, ["blocks.0.attn"], keep):
        ref = generate(pipe, 3)
    with probe(pipe, kernel="fused") as fused:
        out = generate(pipe, 3)
    # float rounding of a different summation order, carried through 2 steps of a 2-layer model
    assert torch.allclose(out, ref, atol=1e-4, rtol=0)
    assert fused.matching["kernel"] == "fused" and exact.matching["kernel"] == "exact"
    assert fused.layers == exact.layers and fused.steps == exact.steps
    # first call (layer 0, step 0): both modes matched identical q / k; the kernel-level rule applies
    q, k, scale = captured[0]  # (V, heads, n, d)
    V, H, n, d = q.shape
    qs, ks = q.transpose(0, 1).reshape(H, V * n, d), k.transpose(0, 1).reshape(H, V * n, d)
    _, index, conf, kept = fused_attention_matches(qs, ks, ks, (4, 4), scale=scale)
    compare_with_exact(qs, ks, (4, 4), scale, index, conf, kept, "per_head", "global")
    a = exact.ds.sel(layer="blocks.0.attn", step=0)
    b = fused.ds.sel(layer="blocks.0.attn", step=0)
    for i in range(V):
        for j in range(V):
            if i != j:
                rows = index[:, i, j].view(H, 4, 4) // 4
                assert torch.equal(torch.as_tensor(b["match_row"].values[i, j, :H]), rows.to(torch.int32))
    agree = (a["match_row"].values == b["match_row"].values) & (a["match_col"].values == b["match_col"].values)
    assert agree.mean() >= 0.9


def test_fused_mode_rejects_options_it_cannot_serve():
    pipe = tiny_pipe(num_layers=1, num_heads=2, seed=0)
    for options in ({"similarity": "dual_softmax"}, {"mutual": True}, {"history": 2}):
        with pytest.raises(CorrlabError, match="kernel"):
            with probe(pipe, kernel="fused", **options):
                pass
    with pytest.raises(CorrlabError, match="kernel"):
        with probe(pipe, kernel="approximate"):
            pass
    assert_nothing_patched(pipe.model)


def test_fused_kernel_general_path_for_float64_matches_sdpa_and_the_exact_matches():
    """float64 skips the flash-kernel fast path (float32 only): the block-wise softmax path serves per_head /
    global too; its output is float64 softmax(S) v summed in another order (far inside the float32 tolerance)."""
    q, k, v = (x.double() for x in random_qkv())
    scale = 8 ** -0.5
    out, index, conf, kept = fused_attention_matches(q, k, v, (4, 5), scale=scale, chunk_size=7)
    assert out.dtype == torch.float64
    ref = F.scaled_dot_product_attention(q[None], k[None], v[None], scale=scale)[0]
    assert torch.allclose(out, ref, atol=OUT_ATOL, rtol=OUT_RTOL)
    compare_with_exact(q, k, (4, 5), scale, index, conf, kept, "per_head", "global")
