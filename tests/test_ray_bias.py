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


def test_probe_reads_the_biased_attention_and_leaves_the_model_bit_identical():
    m = tiny(epipolar_bias=True)
    with torch.no_grad():
        for b in m.blocks:
            b.epipolar_gain.fill_(0.2)
    x, t, rays = random_inputs(1, 2, 16, 1, patch_size=1)
    pe = m.encode_prompt(["blue dotted sphere"])
    rec = probe_unet_bit_identical(m, x, t, pe, rays)
    assert rec.layers == [f"blocks.{i}.attn" for i in range(5)]


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
