"""The Plücker epipolar attention bias option of MultiViewUNet (corrlab.model.ray_bias): the reciprocal product
vanishes on true correspondences, the processor's logits are q.k/sqrt(d) - lambda (product)^2, zero gains leave
the model's function unchanged, probes read the biased attention, and shipped weights initialise it."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention

from corrlab.errors import CorrlabError, ShapeError, ValueRangeError
from corrlab.geometry.correspondences import ground_truth_match_for
from corrlab.model import CorrlabPipeline, MultiViewUNet, plucker_ray_embeds
from corrlab.model.ray_bias import EpipolarBiasAttnProcessor, reciprocal_product, unit_rays
from corrlab.model.rays import token_centres
from corrlab.model.train import TrainConfig, Trainer
from corrlab.probing.interception import intercepting
from corrlab.scenes import render_scene
from model_helpers import KernelCapture, perturbed, probe_unet_bit_identical, random_inputs

TINY = dict(sample_size=16, channels=[8, 16], attention_levels=[0, 1], stem=2, num_heads=2, prompt_dim=8, ray_freqs=2)


def tiny(seed: int = 0, **config) -> MultiViewUNet:
    torch.manual_seed(seed)
    return perturbed(MultiViewUNet(**{**TINY, **config}))


def test_reciprocal_product_vanishes_on_true_correspondences_and_within_a_view():
    mvs = render_scene(1_000_800, 2, 32, "random")
    centres = token_centres(32, 32, 1)
    target, valid = ground_truth_match_for(mvs.depth[0], mvs.cameras[0], mvs.depth[1], mvs.cameras[1], centres)
    idx = torch.nonzero(valid, as_tuple=True)[0][:50]
    assert len(idx) > 10
    r0 = plucker_ray_embeds([mvs.cameras[0]], 32, patch_size=1)[0].reshape(6, -1).T.double()
    o1, d1 = mvs.cameras[1].rays(target[idx])
    r1 = unit_rays(torch.cat([d1, torch.linalg.cross(o1, d1)], dim=1))
    on_line = reciprocal_product(unit_rays(r0[idx]), r1).diagonal()
    assert on_line.abs().max() < 1e-4  # the rays through a point and its match meet
    off = reciprocal_product(unit_rays(r0[idx]), r1.roll(7, dims=0)).diagonal()
    assert off.abs().median() > 100 * on_line.abs().max()
    same_view = reciprocal_product(unit_rays(r0[:40]), unit_rays(r0[40:80]))
    assert same_view.abs().max() < 1e-5


def test_processor_logits_are_the_scaled_dot_product_minus_the_epipolar_penalty():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8, processor=EpipolarBiasAttnProcessor())
    x = torch.randn(1, 10, 16)
    rays = unit_rays(torch.randn(1, 10, 6))
    strength = torch.tensor([0.0, 30.0])
    capture = KernelCapture()
    seen = capture.seen

    with torch.no_grad(), intercepting(attn, capture):
        out = attn(x, rays=rays, strength=strength)
        q = attn.to_q(x).view(1, 10, 2, 8).transpose(1, 2)
        k = attn.to_k(x).view(1, 10, 2, 8).transpose(1, 2)
        v = attn.to_v(x).view(1, 10, 2, 8).transpose(1, 2)
    logits = seen["q"] @ seen["k"].transpose(-1, -2) * seen["scale"]
    penalty = strength[None, :, None, None] * reciprocal_product(rays, rays)[:, None] ** 2
    expected = q @ k.transpose(-1, -2) / math.sqrt(8) - penalty
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)  # float32, two factorisations of one sum
    ref = attn.to_out[0]((torch.softmax(expected, -1) @ v).transpose(1, 2).reshape(1, 10, 16))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ShapeError, match="strength"):
        attn(x, rays=rays, strength=torch.zeros(3))
    with pytest.raises(ShapeError, match="rays"):
        attn(x, rays=rays[:, :5], strength=strength)


def test_zero_gains_keep_the_function_and_gains_change_it():
    plain, epi = tiny(), tiny(epipolar_bias=True)
    missing, unexpected = epi.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.endswith("epipolar_gain") for k in missing)
    assert all(isinstance(b.attn.processor, EpipolarBiasAttnProcessor) for b in epi.blocks)
    x, t, rays = random_inputs(1, 3, 16, 0, patch_size=1)
    pe = plain.encode_prompt(["red striped box"])
    with torch.no_grad():
        for b in epi.blocks:
            b.epipolar_gain.zero_()
        torch.testing.assert_close(epi(x, t, pe, rays), plain(x, t, pe, rays), atol=1e-5, rtol=1e-5)
        for b in epi.blocks:
            b.epipolar_gain.fill_(0.5)
        assert not torch.allclose(epi(x, t, pe, rays), plain(x, t, pe, rays), atol=1e-3)
        slow = tiny(epipolar_bias=True, epipolar_gain_scale=10.0)
        slow.load_state_dict(epi.state_dict())
        for b in slow.blocks:
            b.epipolar_gain.fill_(0.5 * epi.config.epipolar_gain_scale / 10.0)  # the same strengths
        torch.testing.assert_close(slow(x, t, pe, rays), epi(x, t, pe, rays), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueRangeError, match="epipolar_gain_scale"):
        MultiViewUNet(**TINY, epipolar_bias=True, epipolar_gain_scale=0)
    with pytest.raises(ShapeError, match="epipolar_bias"):
        MultiViewUNet(**TINY, epipolar_bias=True, relative_encoding="prope")


@pytest.mark.parametrize("option, n_layers", [({}, 5), ({"channels": [8, 16, 16], "attention_levels": [1, 2],
                                                            "decoder_attention_levels": [0],
                                                            "decoder_attention_heads": 1}, 6)])
def test_probe_reads_the_biased_attention_and_leaves_the_model_bit_identical(option, n_layers):
    """Also with a decoder-only finer attention level (its block named last, ``blocks.5``)."""
    m = tiny(epipolar_bias=True, **option)
    with torch.no_grad():
        for b in m.blocks:
            b.epipolar_gain.fill_(0.2)
    x, t, rays = random_inputs(1, 2, 16, 1, patch_size=1)
    pe = m.encode_prompt(["blue dotted sphere"])
    rec = probe_unet_bit_identical(m, x, t, pe, rays)
    assert rec.layers == [f"blocks.{i}.attn" for i in range(n_layers)]


def test_init_from_shipped_weights_without_the_option_starts_the_gains_at_zero(tmp_path):
    base = tmp_path / "base"
    CorrlabPipeline(tiny()).save_pretrained(base)
    cfg = TrainConfig(arch="unet", model={**TINY, "epipolar_bias": True}, image_size=16, views=[2], view_probs=[1.0],
                      views_per_batch=2, steps=1, threads=1, eval_every=0, checkpoint_every=1)
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.init_from(base)
    shipped = MultiViewUNet.from_pretrained(base / "model").state_dict()
    state = trainer.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in shipped.items())
    assert all(float(state[k].abs().max()) == 0.0 for k in state if k.endswith("epipolar_gain"))
    other = tmp_path / "other"
    CorrlabPipeline(tiny(channels=[8, 8])).save_pretrained(other)
    with pytest.raises(CorrlabError, match="does not match the run's model"):
        Trainer(cfg, tmp_path / "run2").init_from(other)


def test_consistency_training_refuses_attention_ce_on_an_epipolar_bias_base(tmp_path, capsys):
    """attention-ce scores q.k from to_q / to_k, without the bias the kernel adds: refused, naming the option."""
    from corrlab.cli import main as cli_main

    base = tmp_path / "base"
    CorrlabPipeline(tiny(epipolar_bias=True)).save_pretrained(base)
    common = ["train-consistency", "--base", str(base), "--sets-per-step", "1", "--rank", "2", "--steps", "1",
              "--no-progress"]
    assert cli_main([*common, "--loss", "attention-ce", "--out", str(tmp_path / "ce")]) != 0
    assert "epipolar_bias=True" in capsys.readouterr().err
    assert not (tmp_path / "ce" / "lora").exists()


# ------------------------------------------------------------- the bias normalised by the baseline (per view pair)
def _camera_rays(centre, target, n=6, seed=0):
    """Unit Plücker rays of ``n`` random directions around ``target - centre`` from ``centre``: ``(n, 6)``."""
    g = torch.Generator().manual_seed(seed)
    c = torch.tensor(centre, dtype=torch.float64)
    d = torch.tensor(target, dtype=torch.float64) - c
    d = d / d.norm() + 0.2 * torch.randn(n, 3, generator=g, dtype=torch.float64)
    d = d / d.norm(dim=1, keepdim=True)
    return torch.cat([d, torch.linalg.cross(c.expand_as(d), d)], dim=1), c


def test_baseline_normalisers_turn_the_product_into_the_angle_from_the_epipolar_plane():
    """p * sqrt(factor) / reference = -sin phi = -d_j . n_i; the token's own view gets 0; the factor does not depend on
    the baseline's length, so the normalised penalty of a pair scaled about the origin is unchanged."""
    from corrlab.model.ray_bias import baseline_normalisers

    for s in (1.0, 0.05):  # a pair, and the same pair 20 times closer together (all camera positions scaled)
        ra, ca = _camera_rays([4.0 * s, 0.0, 1.0 * s], [0.0, 0.0, 0.0], seed=1)
        rb, cb = _camera_rays([3.0 * s, 2.5 * s, 1.2 * s], [0.0, 0.0, 0.0], seed=2)
        rays = torch.cat([ra, rb])[None]  # (1, 12, 6), view-major: 6 tokens a view
        w = baseline_normalisers(rays, torch.stack([ca, cb])[None], reference=0.5)  # (1, 12, 2); floor 0.05: not hit
        assert torch.equal(w[0, :6, 0], torch.zeros(6)) and torch.equal(w[0, 6:, 1], torch.zeros(6))  # exact: masked
        p = reciprocal_product(ra, rb)  # (6, 6): token i of view a against token j of view b
        normal = torch.linalg.cross((cb - ca).expand(6, 3), ra[:, :3])
        normal_len = normal.norm(dim=1)
        normal = normal / normal_len[:, None]
        sin_phi = normal @ rb[:, :3].T
        assert normal_len.min() > 0.05
        torch.testing.assert_close(p * w[0, :6, 1:2].sqrt() / 0.5, -sin_phi, rtol=1e-9, atol=1e-12)  # p = -b.(d_i x d_j)
        penalty = p ** 2 * w[0, :6, 1:2]
        if s == 1.0:
            wide = penalty
        else:  # the unnormalised product shrank with the baseline; the normalised penalty did not
            torch.testing.assert_close(penalty, wide, rtol=1e-9, atol=1e-12)
            assert p.abs().max() < 0.1 * reciprocal_product(*(_camera_rays(c, [0, 0, 0], seed=k)[0] for c, k in
                                                              (([4.0, 0.0, 1.0], 1), ([3.0, 2.5, 1.2], 2)))).abs().max()


def test_normalised_processor_logits_carry_the_normalised_penalty():
    """The q / k channels per view reproduce ``q.k/sqrt(d) - lambda_h * factor(i, view of j) * p_ij^2``."""
    from corrlab.model.ray_bias import baseline_normalisers

    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8, processor=EpipolarBiasAttnProcessor())
    x = torch.randn(1, 12, 16)
    rays = torch.cat([r for r, _ in (_camera_rays([4.0, 0.0, 1.0], [0, 0, 0], 4, 1), _camera_rays([3.0, 2.5, 1.2], [0, 0, 0], 4, 2),
                                     _camera_rays([0.5, 4.0, 0.3], [0, 0, 0], 4, 3))]).float()[None]
    centres = torch.tensor([[[4.0, 0.0, 1.0], [3.0, 2.5, 1.2], [0.5, 4.0, 0.3]]])
    strength = torch.tensor([5.0, 30.0])
    capture = KernelCapture()
    with torch.no_grad(), intercepting(attn, capture):
        out = attn(x, rays=rays, strength=strength, centres=centres, reference=3.0)
        q = attn.to_q(x).view(1, 12, 2, 8).transpose(1, 2)
        k = attn.to_k(x).view(1, 12, 2, 8).transpose(1, 2)
        v = attn.to_v(x).view(1, 12, 2, 8).transpose(1, 2)
    seen = capture.seen
    assert seen["q"].shape[-1] == 8 + 21 * 3  # 21 channels per view
    logits = seen["q"] @ seen["k"].transpose(-1, -2) * seen["scale"]
    w = baseline_normalisers(rays, centres, 3.0)  # (1, 12, 3)
    factor = w[:, :, torch.arange(12) // 4]  # (1, 12, 12): token i's factor for token j's view
    penalty = strength[None, :, None, None] * (factor * reciprocal_product(rays, rays) ** 2)[:, None]
    expected = q @ k.transpose(-1, -2) / math.sqrt(8) - penalty
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=2e-4)  # float32, two factorisations of one sum
    ref = attn.to_out[0]((torch.softmax(expected, -1) @ v).transpose(1, 2).reshape(1, 12, 16))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ShapeError, match="centres"):
        attn(x, rays=rays, strength=strength, centres=centres[:, :2] * 0 + centres[:, :2], reference=None)
    with pytest.raises(ShapeError, match="centres"):
        attn(x, rays=rays, strength=strength, centres=torch.zeros(1, 5, 3), reference=3.0)


def test_unet_option_recovers_the_centres_and_keeps_the_weights():
    """epipolar_normalise=True: the same parameters (shipped weights load unchanged), the camera centres recovered
    from the ray maps, a different function where views differ; it needs the bias itself."""
    from corrlab.model.prope import camera_centres_from_rays

    base, normed = tiny(epipolar_bias=True), tiny(epipolar_bias=True, epipolar_normalise=True)
    normed.load_state_dict(base.state_dict())  # strict: no parameter added
    with torch.no_grad():
        for b in (base, normed):
            b.blocks[0].epipolar_gain.fill_(0.05)
    mvs = render_scene(1_000_801, 3, 16, "random")
    rays = plucker_ray_embeds(mvs.cameras, 16, patch_size=1)  # (V, 6, H, W)
    centres = camera_centres_from_rays(rays)
    torch.testing.assert_close(centres, torch.stack([c.center for c in mvs.cameras]).double(), atol=1e-4, rtol=1e-4)
    x = torch.randn(1, 3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    pe = base.encode_prompt(["red striped box"])
    with torch.no_grad():
        a = base(x, 0.5, pe, rays[None])
        b = normed(x, 0.5, pe, rays[None])
    assert torch.isfinite(b).all() and not torch.allclose(a, b, atol=1e-4)
    with pytest.raises(ShapeError, match="epipolar_normalise"):
        tiny(epipolar_normalise=True)
    with pytest.raises(ValueRangeError, match="epipolar_reference"):
        tiny(epipolar_bias=True, epipolar_normalise=True, epipolar_reference=0.0)


def test_baseline_normalisers_are_bounded_where_a_ray_points_at_the_other_camera():
    from corrlab.model.ray_bias import baseline_normalisers

    centres = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.0, 5.0]]])
    d = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])  # token 0 looks straight at camera 1, token 1 sideways
    rays = torch.cat([d, torch.zeros(2, 3)], dim=1)
    rays = torch.cat([rays, torch.cat([-d, torch.linalg.cross(centres[0, 1].expand(2, 3), -d)], 1)])[None]
    w = baseline_normalisers(rays, centres, reference=2.0)
    assert w[0, 0, 1] == 100.0  # exact: (2 / (2 / 10))^2, the floor
    torch.testing.assert_close(w[0, 1, 1], torch.tensor((2.0 / 5.0) ** 2))  # |b x d| = 5
