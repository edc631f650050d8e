"""``MultiViewUNet(reference_concat=True)``: each view's input also carries its nearest given view."""
from __future__ import annotations

import math

import pytest
import torch

from corrlab.errors import CorrlabError, ShapeError, ValueRangeError
from corrlab.model import CorrlabPipeline, MultiViewUNet
from corrlab.model.rays import plucker_ray_embeds
from corrlab.model.train import HELD_OUT_SEED_START, TrainConfig, Trainer
from corrlab.model.unet import nearest_reference_input
from corrlab.scenes.cameras import sample_cameras
from model_helpers import TINY_UNET, load_benchmark, random_inputs, tiny_unet

BASE = TINY_UNET
model = tiny_unet


@pytest.mark.parametrize("layout", ["train", "random"])
def test_nearest_reference_input_takes_the_given_view_with_the_nearest_camera(layout):
    V, S = 5, 16
    sets = [sample_cameras(seed, V, S, layout) for seed in (3, 4)]
    rays = torch.stack([plucker_ray_embeds(cams, S, 1) for cams in sets])
    x = torch.randn(2, V, 3, S, S, generator=torch.Generator().manual_seed(0))
    given = torch.tensor([[False, True, False, True, False], [False] * V])
    out = nearest_reference_input(x, rays, given)
    assert out.shape == (2, V, 10, S, S)
    centres = torch.stack([c.center.to(torch.float64) for c in sets[0]])
    for v in range(V):
        d = {g: float((centres[v] - centres[g]).norm()) for g in (1, 3)}
        ref = 1 if d[1] <= d[3] + 1e-7 else 3  # equal distances (evenly spaced cameras) go to the lower index
        assert torch.equal(out[0, v, :3], x[0, ref]), (v, d)
        assert torch.equal(out[0, v, 3], torch.ones(S, S))
        assert torch.equal(out[0, v, 4:], rays[0, ref])
    assert torch.equal(out[0, 1, :3], x[0, 1]) and torch.equal(out[0, 3, :3], x[0, 3])  # a given view: itself
    assert float(out[1].abs().max()) == 0.0  # no given view in the set: zeros
    with pytest.raises(ShapeError, match="given"):
        nearest_reference_input(x, rays, given[:, :3])
    with pytest.raises(ShapeError, match="rays"):
        nearest_reference_input(x, rays[:, :, :3], given)


def test_reference_concat_starts_neutral_and_then_reads_the_reference():
    """Weights of a model without the option load into one with it and compute the same output (the new convolution
    adds exact zeros: tolerance 1e-6 for float32 rounding); once its weights are non-zero the generated views'
    output depends on the nearest reference's pixels through it, and sets without references are unchanged."""
    plain = model()
    refcat = model(seed=1, perturb=False, reference_concat=True)
    missing, unexpected = refcat.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == ["conv_in_reference.bias", "conv_in_reference.weight"]
    x, t, rays = random_inputs(1, 3, 16, 0, patch_size=1)
    pe = plain.encode_prompt(["red striped box"])
    given = torch.tensor([[True, False, False]])
    with torch.no_grad():
        torch.testing.assert_close(refcat(x, t, pe, rays, given), plain(x, t, pe, rays, given), atol=1e-6, rtol=0)
        refcat.conv_in_reference.weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(refcat(x, t, pe, rays), plain(x, t, pe, rays), atol=1e-6, rtol=0)
        assert (refcat(x, t, pe, rays, given) - plain(x, t, pe, rays, given)).abs().max() > 1e-3
    with pytest.raises(ValueRangeError, match="reference_concat: expected True or False, got 'yes'"):
        model(reference_concat="yes")


def test_init_from_weights_without_reference_concat(tmp_path):
    base = tmp_path / "base"
    CorrlabPipeline(model()).save_pretrained(base)
    cfg = TrainConfig(arch="unet", model={**BASE, "reference_concat": True}, image_size=16, views=[2],
                      view_probs=[1.0], views_per_batch=2, reference_probs=[0.0, 1.0], steps=1, threads=1,
                      eval_every=0, checkpoint_every=1)
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.init_from(base)
    shipped = MultiViewUNet.from_pretrained(base / "model").state_dict()
    state = trainer.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in shipped.items())
    assert float(trainer.model.conv_in_reference.weight.detach().abs().max()) == 0.0
    trainer.train_step()  # and it trains: the new convolution moves
    assert float(trainer.model.conv_in_reference.weight.detach().abs().max()) > 0.0


def test_lr_scales_give_named_parameters_their_own_lr(tmp_path):
    """``TrainConfig.lr_scales``: the parameters a prefix names form their own optimiser group whose lr is the
    schedule's times the scale; the rest keep the schedule's lr; a run resumes with the same groups and refuses
    other ones clearly; no scales = one group (older checkpoints resume as before)."""
    def config(**kw):
        return TrainConfig(arch="unet", model={**BASE, "reference_concat": True}, image_size=16, views=[2],
                           view_probs=[1.0], views_per_batch=2, reference_probs=[0.0, 1.0], steps=2, threads=1,
                           eval_every=0, checkpoint_every=1, lr=1e-4, warmup_steps=1, **kw)

    scales = {"conv_in_reference.": 10.0, "conv_in_reference.bias": 3.0}
    trainer = Trainer(config(lr_scales=scales), tmp_path / "run")
    base, conv, bias = trainer.opt.param_groups
    m = trainer.model
    assert [id(p) for p in conv["params"]] == [id(m.conv_in_reference.weight)]  # the longest prefix wins
    assert [id(p) for p in bias["params"]] == [id(m.conv_in_reference.bias)]
    assert len(base["params"]) == len(list(m.parameters())) - 2
    trainer.train_step()
    assert (base["lr"], conv["lr"], bias["lr"]) == pytest.approx((1e-4, 1e-3, 3e-4))
    trainer.save_checkpoint()
    again = Trainer(config(lr_scales=scales), tmp_path / "run")
    assert again.resume() and again.step == 1 and len(again.opt.param_groups) == 3
    with pytest.raises(CorrlabError, match="resume: .* other lr_scales"):
        Trainer(config(), tmp_path / "run").resume()
    assert len(Trainer(config(), tmp_path / "one").opt.param_groups) == 1
    with pytest.raises(ValueRangeError, match="lr_scales: prefix 'conv_out_reference.' names no parameter"):
        Trainer(config(lr_scales={"conv_out_reference.": 10.0}), tmp_path / "two")
    for bad in ({"conv_in.": 0}, {"conv_in.": -1.0}, {"conv_in.": float("inf")}, {"conv_in.": True},
                {"conv_in.": "10"}, {"": 2.0}, [("conv_in.", 2.0)]):
        with pytest.raises(ValueRangeError, match="lr_scales: expected"):
            config(lr_scales=bad)


@pytest.mark.parametrize("layout", ["train", "random"])
def test_reference_gate_fades_the_reference_with_the_angle_between_the_views(layout):
    """``gate_degrees = sigma``: the nearest given view's channels are those without the gate times
    ``exp(-(theta / sigma)^2)``, theta the angle between the two cameras' optical axes (from ``R``, independently of
    the ray maps: the mean ray direction of a centred pinhole is its axis, to 0.5 degrees at 16 px); a given view's
    own entry is not faded."""
    V, S, sigma = 5, 16, 20.0
    cams = sample_cameras(11, V, S, layout)
    rays = plucker_ray_embeds(cams, S, 1)[None]
    x = torch.randn(1, V, 3, S, S, generator=torch.Generator().manual_seed(5))
    given = torch.tensor([[True, False, False, True, False]])
    plain = nearest_reference_input(x, rays, given)
    gated = nearest_reference_input(x, rays, given, gate_degrees=sigma)
    axes = torch.stack([c.R.to(torch.float64).T @ torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64) for c in cams])
    for v in range(V):
        ref = int(torch.nonzero(torch.all(plain[0, v, :3] == x[0], dim=(1, 2, 3)))[0])
        theta = float(torch.rad2deg(torch.acos((axes[v] @ axes[ref]).clamp(-1, 1))))
        expected = torch.exp(torch.tensor(-((theta / sigma) ** 2)))
        gate = gated[0, v, 3, 0, 0]  # the flag channel carries the gate
        assert abs(float(gate) - float(expected)) < 0.03, (v, ref, theta, float(gate))
        torch.testing.assert_close(gated[0, v], plain[0, v] * gate, atol=1e-6, rtol=1e-6)
        if v in (0, 3):
            assert float(gate) > 1 - 1e-5  # acos of a float32 cosine near 1
    for bad in (0, -3.0, float("nan"), float("inf"), True, "20"):
        with pytest.raises(ValueRangeError, match="gate_degrees"):
            nearest_reference_input(x, rays, given, gate_degrees=bad)


def test_reference_gate_is_a_config_of_the_concatenation():
    """The gate changes what the reference convolution sees: with sigma = 1 degree a reference 30+ degrees away
    arrives as exact zeros (exp(-900)), without the gate it arrives as is; the option needs reference_concat and a
    positive angle."""
    x, t, rays = random_inputs(1, 3, 16, 0, patch_size=1)  # 'train' layout: views >= 30 degrees apart
    given = torch.tensor([[True, False, False]])
    seen = {}
    for name, gate in (("gated", 1.0), ("open", None)):
        m = model(seed=1, reference_concat=True, reference_gate_degrees=gate)
        hook = m.conv_in_reference.register_forward_hook(lambda mod, args, out, name=name: seen.update({name: args[0]}))
        with torch.no_grad():
            m(x, t, m.encode_prompt(["red striped box"]), rays, given)
        hook.remove()
    gated, open_ = (seen[k].reshape(1, 3, *seen[k].shape[1:]) for k in ("gated", "open"))  # (B, V, C', h, w)
    assert float(gated[:, 1:].abs().max()) == 0.0 and float(open_[:, 1:].abs().max()) > 0.1
    torch.testing.assert_close(gated[:, 0], open_[:, 0], atol=1e-5, rtol=0)  # the given view: itself, not faded
    for kw in (dict(reference_gate_degrees=20.0), dict(reference_concat=True, reference_gate_degrees=0.0),
               dict(reference_concat=True, reference_gate_degrees=True)):
        with pytest.raises(ValueRangeError, match="reference_gate_degrees"):
            model(**kw)


def test_reference_path_effect_benchmark(tmp_path, capsys):
    """benchmarks/reference_path_effect.py on a tiny model: view angles from the camera centres (view 0 itself: 0
    degrees), a zero reference path changes nothing (dv = 0, the same loss), a non-zero one changes the generated views;
    a model without the path is refused."""
    bench = load_benchmark("reference_path_effect")
    ang = bench.view_angles(HELD_OUT_SEED_START, 4, 16, "random")
    assert ang[0] < 1e-3 and all(0 <= a <= 180 for a in ang)
    cams = sample_cameras(HELD_OUT_SEED_START, 4, 16, "random")
    c0, c2 = cams[0].center, cams[2].center
    assert abs(ang[2] - math.degrees(math.acos(float(c0 @ c2 / (c0.norm() * c2.norm()))))) < 1e-4
    m = model(seed=1, reference_concat=True)
    with torch.no_grad():
        m.conv_in_reference.weight.zero_()
        m.conv_in_reference.bias.zero_()
    CorrlabPipeline(m).save_pretrained(tmp_path / "zero")
    argv = ["--n-sets", "3", "--timesteps", "0.5", "--layout", "random"]
    assert bench.main(["--model", str(tmp_path / "zero"), *argv]) == 0
    kv = dict(x.split("=") for x in capsys.readouterr().out.strip().splitlines()[-1].split())
    dv = {k: float(v) for k, v in kv.items() if k.startswith("dv_")}
    assert dv and all(v == 0.0 for v in dv.values())
    with torch.no_grad():
        m.conv_in_reference.weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(3))
    CorrlabPipeline(m).save_pretrained(tmp_path / "acting")
    assert bench.main(["--model", str(tmp_path / "acting"), *argv]) == 0
    kv = dict(x.split("=") for x in capsys.readouterr().out.strip().splitlines()[-1].split())
    assert max(float(v) for k, v in kv.items() if k.startswith("dv_")) > 1e-3
    CorrlabPipeline(model(seed=1, perturb=False)).save_pretrained(tmp_path / "plain")
    with pytest.raises(CorrlabError, match="reference_concat=True"):
        bench.main(["--model", str(tmp_path / "plain"), *argv])
