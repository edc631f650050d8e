"""benchmarks/corr_adapter_conditioned.py and corr_adapter_blur_control.py: the CorrAdapter settings they compare, and the blur control."""
import pytest
import torch
from model_helpers import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("corr_adapter_conditioned")


@pytest.fixture(scope="module")
def tiny(bench):
    return bench.tiny_pipeline()


def test_all_layers_means_every_multi_view_attention_layer(bench, tiny):
    params = bench.adapter_params(tiny, {"eta": 0.1, "layers": "all"})
    assert params["layers"] == list(tiny.model.attention_grids())
    assert len(params["layers"]) == len(tiny.model.blocks)
    assert bench.adapter_params(tiny, {"eta": 0.5}) == {"eta": 0.5}


@pytest.mark.parametrize("name", ["decoder eta0 r1", "finest eta0.1 keep-all", "all eta0.1"])
def test_candidate_settings_adapt_the_generation_and_restore_the_model(bench, tiny, name):
    from corrlab.interventions import CorrAdapterHandle
    from corrlab.scenes import render_scene

    truth = render_scene(5, 2, tiny.sample_size, "train")
    kw = dict(cameras=truth.cameras, reference={0: truth.images[0]}, num_inference_steps=2, guidance_scale=1.0,
              seed=0, progress=False)
    before = tiny(truth.prompt, **kw).images
    ca = CorrAdapterHandle(tiny, image_conditioned=True, **bench.adapter_params(tiny, bench.CANDIDATES[name]))
    ca.enable()
    try:
        adapted = tiny(truth.prompt, **kw).images
        stats = dict(ca.stats)
    finally:
        ca.disable()
    after = tiny(truth.prompt, **kw).images
    assert torch.equal(before, after)  # the same computation run twice: the handle restored the model
    assert stats["total"] > 0
    if name.endswith("keep-all"):  # threshold 0: every match slot is kept
        assert stats["kept"] == stats["total"]
    if stats["kept"]:  # an adapted layer changed the generated view (the given view 0 stays the reference)
        assert not torch.equal(adapted[1], before[1])
        assert torch.equal(adapted[0], before[0])


@pytest.fixture(scope="module")
def blur_control():
    return load_benchmark("corr_adapter_blur_control")


def test_the_blur_control_blurs_without_shifting_or_scaling(blur_control):
    flat = torch.full((2, 3, 16, 16), 0.3)
    torch.testing.assert_close(blur_control.gaussian_blur(flat, 1.0), flat)  # weights sum to 1, border replicated
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g)
    y = blur_control.gaussian_blur(x, 0.75)
    assert y.shape == x.shape
    assert blur_control.mean_gradient(y) < 0.5 * blur_control.mean_gradient(x)
    # a centred impulse spreads symmetrically: its centre of mass stays put (no half-pixel shift)
    impulse = torch.zeros(1, 1, 15, 15)
    impulse[0, 0, 7, 7] = 1.0
    out = blur_control.gaussian_blur(impulse, 1.0)[0, 0]
    idx = torch.arange(15, dtype=out.dtype)
    assert float((out.sum(1) * idx).sum() / out.sum()) == pytest.approx(7.0, abs=1e-5)
    assert float((out.sum(0) * idx).sum() / out.sum()) == pytest.approx(7.0, abs=1e-5)
    assert blur_control.mean_gradient(torch.zeros(1, 3, 8, 8)) == 0.0
