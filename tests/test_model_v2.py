"""Tests of the embedded model v2: MultiViewUNet, reference views (image conditioning), training with
references, the image-conditioned evaluation, and `corrlab generate --reference`."""
from __future__ import annotations

import json
import re

import pytest
import torch

import corrlab
from corrlab.cli import main as cli_main
from corrlab.errors import CorrlabError, ShapeError, ValueRangeError
from corrlab.model import CorrlabPipeline, MultiViewDiT, MultiViewUNet
from corrlab.model.conditioned import native_hits, pool_hits, psnr, reconstruction, ssim
from corrlab.model.train import TrainConfig, Trainer, flow_matching_loss, sample_given
from corrlab.scenes import render_scene
from corrlab.sets import load_set, save_set
from model_helpers import perturbed, probe_unet_bit_identical, random_inputs

TINY_UNET = dict(sample_size=16, channels=[8, 16], attention_levels=[0, 1], stem=2, num_heads=2, prompt_dim=8,
                 ray_freqs=2)


def tiny_unet(seed: int = 0, **config) -> MultiViewUNet:
    torch.manual_seed(seed)
    return perturbed(MultiViewUNet(**{**TINY_UNET, **config}))


def unet_inputs(B=1, V=3, size=16, seed=0):
    return random_inputs(B, V, size, seed, patch_size=1)  # the UNet takes per-pixel rays


def test_unet_forward_grids_and_bad_input():
    m = tiny_unet()
    x, t, rays = unet_inputs(B=2)
    pe = m.encode_prompt(["red striped box", "blue dotted sphere"])
    v = m(x, t, pe, rays)
    assert v.shape == x.shape and torch.isfinite(v).all()
    # stem 2: level 0 at 8x8, level 1 at 4x4; attention down(0), down(1), mid(1), up(1), up(0)
    assert m.attention_grids() == {
        "blocks.0.attn": (8, 8), "blocks.1.attn": (4, 4), "blocks.2.attn": (4, 4),
        "blocks.3.attn": (4, 4), "blocks.4.attn": (8, 8),
    }
    with pytest.raises(ShapeError, match="ray_embeds"):
        m(x, t, pe, rays[..., ::4, ::4])  # token-resolution rays: the UNet takes per-pixel rays
    with pytest.raises(ShapeError, match="given"):
        m(x, t, pe, rays, given=torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(ShapeError, match="divisible"):
        m(x[..., :14, :14], t, pe, rays[..., :14, :14])


@pytest.mark.parametrize("option", [{}, {"relative_encoding": "prope"}, {"epipolar_bias": True}])
def test_unet_permutation_equivariant_over_views(option):
    """Position reaches attention only through camera rays (and, with PRoPE or the epipolar bias, the relative
    cameras): permuting views with their rays permutes the output. Tolerance 1e-5: attention sums the same
    terms in another order (float32 reassociation)."""
    m = tiny_unet(num_heads=1, **option)
    if option.get("epipolar_bias"):
        with torch.no_grad():
            for b in m.blocks:
                b.epipolar_gain.fill_(0.3)
    x, t, rays = unet_inputs(B=1, V=4)
    pe = m.encode_prompt(["green checkered cone"])
    given = torch.tensor([[True, False, False, True]])
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        v = m(x, t, pe, rays, given=given)
        vp = m(x[:, perm], t, pe, rays[:, perm], given=given[:, perm])
    torch.testing.assert_close(vp, v[:, perm], atol=1e-5, rtol=1e-5)


def test_given_flag_changes_the_output():
    m = tiny_unet()
    x, t, rays = unet_inputs(B=1, V=2)
    pe = m.encode_prompt(["red striped box"])
    with torch.no_grad():
        a = m(x, t, pe, rays, given=torch.tensor([[False, False]]))
        b = m(x, t, pe, rays, given=torch.tensor([[True, False]]))
    assert (a - b).abs().max() > 1e-4


def test_loss_ignores_given_views():
    """The loss is the mean squared error over the generated views only: changing the truth's given view
    changes the model's INPUT, so compare against the loss computed by hand on the non-given views."""
    m = tiny_unet()
    x0, t, rays = unet_inputs(B=2, V=3)
    x0 = x0.clamp(-1, 1)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    pe = m.encode_prompt(["red striped box", "blue dotted sphere"])
    given = torch.tensor([[True, False, False], [False, True, True]])
    loss = flow_matching_loss(m, x0, pe, rays, t, noise, given)
    tt = t.view(-1, 1, 1, 1, 1)
    x_in = torch.where(given[:, :, None, None, None], x0, (1 - tt) * x0 + tt * noise)
    v = m(x_in, t, pe, rays, given=given)
    err = (v - (noise - x0)).pow(2).mean(dim=(2, 3, 4))
    manual = err[~given].mean()
    torch.testing.assert_close(loss, manual, atol=1e-6, rtol=1e-6)  # same terms, another summation order


def test_sample_given_caps_and_mixes():
    cfg = TrainConfig(arch="unet", model=TINY_UNET, image_size=16, reference_probs=(0.2, 0.5, 0.3), views=(2, 4),
                      view_probs=(0.5, 0.5), views_per_batch=4)
    g = torch.Generator().manual_seed(0)
    counts4 = sample_given(cfg, 4000, 4, g).sum(dim=1)
    share = torch.bincount(counts4, minlength=4).double() / 4000
    assert share[3] == 0  # never more than 2 references with reference_probs of length 3
    torch.testing.assert_close(share[:3], torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64), atol=0.03, rtol=0)  # 4000 draws: sd ~0.008
    counts2 = sample_given(cfg, 2000, 2, g).sum(dim=1)
    assert counts2.max() == 1  # capped at V - 1: one view is always generated
    with pytest.raises(CorrlabError, match="reference_probs"):
        TrainConfig(reference_probs=(0.5, 0.2))
    with pytest.raises(CorrlabError, match="arch"):
        TrainConfig(arch="transformer")


def test_unet_training_with_references_runs_and_resumes(tmp_path):
    cfg = TrainConfig(arch="unet", model=TINY_UNET, image_size=16, reference_probs=(0.2, 0.5, 0.3), views=(2,),
                      view_probs=(1.0,), views_per_batch=4, steps=3, checkpoint_every=2, eval_every=0, log_every=1,
                      warmup_steps=1)
    tr = Trainer(cfg, tmp_path / "run")
    tr.run(progress=False)
    assert tr.step == 3
    tr2 = Trainer(cfg, tmp_path / "run")
    assert tr2.resume() and tr2.step == 3
    for a, b in zip(tr.model.parameters(), tr2.model.parameters()):
        assert torch.equal(a, b)  # exact: the same saved tensors read back (safetensors round trip)


def test_pipeline_reference_views_are_kept_and_condition_the_rest():
    pipe = CorrlabPipeline(tiny_unet())
    truth = render_scene(7, 3, 16, "train")
    ref = {0: truth.images[0]}
    a = pipe(truth.prompt, cameras=truth.cameras, reference=ref, num_inference_steps=3, seed=1, progress=False)
    b = pipe(truth.prompt, cameras=truth.cameras, reference=ref, num_inference_steps=3, seed=1, progress=False)
    plain = pipe(truth.prompt, cameras=truth.cameras, num_inference_steps=3, seed=1, progress=False)
    assert torch.equal(a.images[0], truth.images[0])  # exact: the given image is copied through unchanged
    assert torch.equal(a.images, b.images)  # exact: the same seeded computation twice
    assert a.meta["given_views"] == [0] and "given_views" not in plain.meta
    assert (a.images[1:] - plain.images[1:]).abs().max() > 1e-3  # the reference changes the generated views
    with pytest.raises(CorrlabError, match="view indices"):
        pipe(truth.prompt, cameras=truth.cameras, reference={3: truth.images[0]}, num_inference_steps=1, progress=False)
    with pytest.raises(ShapeError, match=r"reference\[0\]"):
        pipe(truth.prompt, cameras=truth.cameras, reference={0: truth.images[0][:, :8]}, num_inference_steps=1,
             progress=False)
    with pytest.raises(CorrlabError, match="every one"):
        pipe(truth.prompt, cameras=truth.cameras, reference={i: truth.images[i] for i in range(3)},
             num_inference_steps=1, progress=False)


def test_reference_guidance_is_the_documented_combination_of_branches():
    """Image guidance r: v = v_cond + (g - 1)(v_cond - v_text_null) + (r - 1)(v_cond - v_ref_null), where the
    reference-null branch sees no given view and the given views noised to level t with the supplied noise
    (branches computed one by one here; batched in the pipeline: tolerance 1e-5). r = 1 is the old path, bit for
    bit (the same computation)."""
    model = tiny_unet()
    pipe = CorrlabPipeline(model)
    x, t, rays = unet_inputs(B=2, V=3)
    pe = model.encode_prompt(["red striped box", "blue sphere"])
    given = torch.tensor([[True, False, False], [False, True, False]])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    g5, tb = given[:, :, None, None, None], t[:, None, None, None, None]
    with torch.no_grad():
        v_cond = model(x, t, pe, rays, given=given)
        v_text_null = model(x, t, model.null_prompt_embeds(2), rays, given=given)
        v_ref_null = model(torch.where(g5, (1 - tb) * x + tb * noise, x), t, pe, rays, given=torch.zeros_like(given))
        assert (v_cond - v_ref_null).abs().max() > 1e-3  # the branch differs: the check below can fail
        for g, r in ((1.0, 2.5), (3.0, 2.0), (1.0, 0.0)):
            expected = v_cond + (g - 1) * (v_cond - v_text_null) + (r - 1) * (v_cond - v_ref_null)
            got = pipe.velocity(x, t, pe, rays, g, given=given, reference_guidance=r, reference_noise=noise)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(pipe.velocity(x, t, pe, rays, 3.0, given=given, reference_guidance=1.0),
                           pipe.velocity(x, t, pe, rays, 3.0, given=given))
        for bad in (-1.0, float("nan"), float("inf"), True, "2"):
            with pytest.raises(ValueRangeError, match="reference_guidance"):
                pipe.velocity(x, t, pe, rays, 1.0, given=given, reference_guidance=bad, reference_noise=noise)
        for bad in (-1.0, float("nan"), float("inf"), True, "2"):
            with pytest.raises(ValueRangeError, match="guidance_scale"):
                pipe.velocity(x, t, pe, rays, bad, given=given)
        with pytest.raises(CorrlabError, match="reference_guidance"):
            pipe.velocity(x, t, pe, rays, 1.0, reference_guidance=2.0, reference_noise=noise)
        with pytest.raises(ShapeError, match="reference_noise"):
            pipe.velocity(x, t, pe, rays, 1.0, given=given, reference_guidance=2.0, reference_noise=noise[:, :2])


def test_pipeline_reference_guidance_changes_only_generated_views_and_is_seeded():
    pipe = CorrlabPipeline(tiny_unet())
    truth = render_scene(7, 3, 16, "train")
    ref = {0: truth.images[0]}
    kw = dict(cameras=truth.cameras, reference=ref, num_inference_steps=3, seed=1, progress=False)
    plain = pipe(truth.prompt, **kw)
    assert torch.equal(pipe(truth.prompt, reference_guidance=1.0, **kw).images, plain.images)
    a = pipe(truth.prompt, reference_guidance=2.0, **kw)
    b = pipe(truth.prompt, reference_guidance=2.0, **kw)
    assert torch.equal(a.images, b.images)  # exact: the same seeded computation twice
    assert torch.equal(a.images[0], truth.images[0])  # the reference is copied through
    assert (a.images[1:] - plain.images[1:]).abs().max() > 1e-3
    assert a.meta["reference_guidance"] == 2.0 and "reference_guidance" not in plain.meta
    with pytest.raises(CorrlabError, match="reference_guidance"):
        pipe(truth.prompt, cameras=truth.cameras, reference_guidance=2.0, num_inference_steps=1, progress=False)
    with pytest.raises(ValueRangeError, match="reference_guidance"):
        pipe(truth.prompt, reference_guidance=-0.5, **{**kw, "num_inference_steps": 1})
    for bad in (float("nan"), float("inf"), False):
        with pytest.raises(ValueRangeError, match="guidance_scale"):
            pipe(truth.prompt, guidance_scale=bad, **{**kw, "num_inference_steps": 1})


def test_dit_without_reference_conditioning_refuses_references():
    dit = MultiViewDiT(sample_size=16, patch_size=4, hidden_size=32, num_layers=1, num_heads=2, prompt_dim=8,
                       ray_freqs=2)
    pipe = CorrlabPipeline(dit.eval())
    truth = render_scene(3, 2, 16, "train")
    with pytest.raises(CorrlabError, match="not trained with reference views"):
        pipe(truth.prompt, cameras=truth.cameras, reference={0: truth.images[0]}, num_inference_steps=1, progress=False)
    dit_ref = MultiViewDiT(sample_size=16, patch_size=4, hidden_size=32, num_layers=1, num_heads=2, prompt_dim=8,
                           ray_freqs=2, reference_conditioning=True)
    out = CorrlabPipeline(dit_ref.eval())(truth.prompt, cameras=truth.cameras, reference={0: truth.images[0]},
                                          num_inference_steps=2, progress=False)
    assert torch.equal(out.images[0], truth.images[0])  # exact: copied through


def test_probe_reads_the_unet_at_each_layers_grid_and_leaves_it_bit_identical():
    m = tiny_unet()
    x, t, rays = unet_inputs(B=1, V=2)
    pe = m.encode_prompt(["red striped box"])
    layers = dict((e.name, e.grid) for e in corrlab.probe.layers(m)) if hasattr(corrlab.probe.layers(m)[0], "name") else None
    rec = probe_unet_bit_identical(m, x, t, pe, rays)
    assert rec.layers == [f"blocks.{i}.attn" for i in range(5)]
    assert rec.grid("blocks.0.attn") == (8, 8) and rec.grid("blocks.2.attn") == (4, 4)
    if layers is not None:
        assert layers["blocks.0.attn"] == (8, 8)


def test_image_conditioned_evaluation_tables():
    m = tiny_unet()
    df = pool_hits(native_hits(m, n_sets=2, t=0.5, seed_start=1_000_500))
    assert {"native", "chance", "same position", "camera geometry only", "appearance NN (noisy input)",
            "appearance NN (clean)", "epipolar + appearance NN (noisy input)",
            "epipolar + appearance NN (clean)"} <= set(df.method)
    assert ((df.share >= 0) & (df.share <= 1)).all()
    rec = reconstruction(CorrlabPipeline(m), n_sets=2, views=2, steps=2, seed_start=1_000_600)
    assert set(rec.method) == {"generated", "copy reference", "mean image"} and len(rec) == 6
    img = render_scene(1, 1, 16).images[0]
    assert psnr(img, img) == float("inf")
    assert ssim(img, img) == pytest.approx(1.0, abs=1e-9)  # SSIM(x, x) = 1 up to float64 rounding
    assert psnr(img, (img + 0.1).clamp(0, 1)) < 30


def test_cli_generate_with_reference(tmp_path, capsys):
    pipe = CorrlabPipeline(tiny_unet())
    pipe.save_pretrained(tmp_path / "model")
    truth = render_scene(11, 3, 16, "train")
    save_set(truth, tmp_path / "truth")
    out = tmp_path / "gen"
    rc = cli_main(["generate", "--prompt", truth.prompt, "--seed", "2", "--model", str(tmp_path / "model"),
                   "--reference", str(tmp_path / "truth"), "--reference-views", "0", "2", "--steps", "2",
                   "--out", str(out), "--no-progress"])
    assert rc == 0
    gen = load_set(out)
    header = json.loads((out / "cameras.json").read_text())
    assert header["meta"]["given_views"] == [0, 2]
    # PNG round trip: the given views come back as the same 8-bit images
    assert torch.equal((gen.images[0] * 255).round(), (truth.images[0] * 255).round())  # exact: same 8-bit PNG data
    assert torch.equal((gen.images[2] * 255).round(), (truth.images[2] * 255).round())  # exact: same 8-bit PNG data
    capsys.readouterr()
    assert cli_main(["generate", "--prompt", "red striped box", "--model", str(tmp_path / "model"),
                     "--reference-views", "0", "--out", str(tmp_path / "x")]) != 0
    assert "--reference-views: expected together with --reference" in capsys.readouterr().err
    assert cli_main(["generate", "--prompt", "red striped box", "--model", str(tmp_path / "model"),
                     "--reference", str(tmp_path / "truth"), "--reference-views", "5", "--out", str(tmp_path / "y")]) != 0
    assert "--reference-views: expected indices in [0, 3)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert cli_main(["generate", "--prompt", truth.prompt, "--seed", "2", "--model", str(tmp_path / "model"),
                     "--reference", str(tmp_path / "truth"), "--reference-views", "0", "2", "--steps", "2",
                     "--reference-guidance", "2.5", "--out", str(tmp_path / "g2"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "g2" / "cameras.json").read_text())["meta"]["reference_guidance"] == 2.5
    assert (load_set(tmp_path / "g2").images[1] - gen.images[1]).abs().max() > 1e-2  # 8-bit PNGs: a visible change
    capsys.readouterr()
    assert cli_main(["generate", "--prompt", "red striped box", "--model", str(tmp_path / "model"),
                     "--reference-guidance", "2", "--out", str(tmp_path / "z")]) != 0
    assert "--reference-guidance: expected together with --reference" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()


def test_shipped_image_conditioned_model_generates_from_a_reference():
    """The shipped v2 weights (data/corrlab-mvunet-s) load as a MultiViewUNet and keep the given view."""
    from corrlab.errors import WeightsNotFoundError
    from corrlab.model import load_default

    try:
        pipe = load_default("corrlab-mvunet-s")
    except WeightsNotFoundError:
        pytest.skip("the v2 weights are not in data/ yet")
    assert isinstance(pipe.model, MultiViewUNet) and pipe.supports_reference
    truth = render_scene(1_000_123, 2, pipe.sample_size, "train")
    mvs = pipe(truth.prompt, cameras=truth.cameras, reference={0: truth.images[0]}, num_inference_steps=2,
               seed=0, progress=False)
    assert torch.equal(mvs.images[0], truth.images[0])  # exact: the given view is copied through
    assert mvs.images.shape == truth.images.shape and torch.isfinite(mvs.images).all()


def test_shipped_reference_path_variant_loads_generates_and_refuses_the_default_models_lora():
    """data/corrlab-mvunet-s-ref: the gated reference-path fine-tune (not the default). It loads by name with its
    path and gate, samples an image-conditioned set with image guidance (given view copied through), its weight
    file stays <= 16 MiB, and the CorrAdapter* LoRA of the default model refuses it (another base)."""
    from pathlib import Path

    from corrlab.model import load_default

    root = Path(corrlab.__file__).resolve().parent.parent / "data" / "corrlab-mvunet-s-ref"
    assert (root / "model" / "diffusion_pytorch_model.safetensors").stat().st_size <= 16 * 2**20
    pipe = load_default("corrlab-mvunet-s-ref")
    cfg = pipe.model.config
    assert isinstance(pipe.model, MultiViewUNet) and cfg.reference_concat and cfg.reference_gate_degrees == 20.0
    assert float(pipe.model.conv_in_reference.weight.abs().mean()) > 1e-3  # the path was trained (zero-initialised)
    truth = render_scene(1_000_123, 3, pipe.sample_size, "random")
    mvs = pipe(truth.prompt, cameras=truth.cameras, reference={0: truth.images[0]}, guidance_scale=1.0,
               reference_guidance=3.0, num_inference_steps=2, seed=0, progress=False)
    assert torch.equal(mvs.images[0], truth.images[0])  # exact: the given view is copied through
    assert mvs.images.shape == truth.images.shape and torch.isfinite(mvs.images).all()
    with pytest.raises(CorrlabError, match="base"):
        load_default("corrlab-mvunet-s-ref", lora="corrlab-mvunet-s-corrstar")


def test_the_default_model_is_v2(monkeypatch):
    """Without --model / $CORRLAB_MODEL every entry point loads the embedded model v2 (a reference-conditioned
    MultiViewUNet with the epipolar bias), not the v1 DiT."""
    from corrlab.model import DATA_DIR, DEFAULT_MODEL_NAME, resolve_model_path

    monkeypatch.delenv("CORRLAB_MODEL", raising=False)
    assert DEFAULT_MODEL_NAME == "corrlab-mvunet-s"
    path = resolve_model_path()
    assert path == DATA_DIR / "corrlab-mvunet-s"
    cfg = json.loads((path / "model" / "config.json").read_text())
    assert cfg["_class_name"] == "MultiViewUNet" and cfg["epipolar_bias"] is True


def test_init_from_shipped_weights_continues_the_step_count(tmp_path):
    from corrlab.model.train import export_pipeline

    cfg = TrainConfig(arch="unet", model=TINY_UNET, image_size=16, reference_probs=(0.5, 0.5), views=(2,),
                      view_probs=(1.0,), views_per_batch=2, steps=2, checkpoint_every=2, eval_every=0,
                      warmup_steps=4)
    tr = Trainer(cfg, tmp_path / "run")
    tr.run(progress=False)
    shipped = export_pipeline(tr.checkpoint_dirs()[-1], tmp_path / "shipped")
    fresh = Trainer(cfg, tmp_path / "run2")
    fresh.init_from(shipped)
    assert fresh.step == 2
    for a, b in zip(tr.ema.parameters(), fresh.model.parameters()):
        assert torch.equal(a, b)  # exact: the shipped EMA tensors read back (safetensors round trip)
    assert fresh.lr_at(2) == pytest.approx(cfg.lr / 4)  # warm-up restarts with the fresh optimiser
    dit_cfg = TrainConfig(image_size=16, model=dict(sample_size=16, patch_size=4, hidden_size=16, num_layers=1,
                                                    num_heads=2, prompt_dim=8, ray_freqs=2))
    with pytest.raises(CorrlabError, match="arch"):
        Trainer(dit_cfg, tmp_path / "run3").init_from(shipped)


def test_probe_generations_image_conditioned_records_the_scene_and_its_references(tmp_path):
    """The demo's image-conditioned setting: the seed's rendered scene gives view 0 and the cameras; the probe
    records the generated set's cameras itself, and those are the scene's."""
    from corrlab.probing import ProbeRecord, probe_generations

    pipe = CorrlabPipeline(tiny_unet())
    seed = 1_000_123
    dirs = probe_generations(pipe, [seed], tmp_path, num_views=3, num_inference_steps=2, progress=False,
                             reference_views=[0], steps=[1])
    truth = render_scene(seed, 3, pipe.sample_size, "train")
    out = load_set(dirs[0])
    assert out.meta["given_views"] == [0]
    # exact: the given view is the rendered image, written and read back through the same PNG quantisation
    assert torch.equal(out.images[0], load_set(save_set(truth, tmp_path / "truth")).images[0])
    rec = ProbeRecord.load(dirs[0] / "record.nc")
    for cam, ref in zip(rec.cameras, truth.cameras):
        assert torch.allclose(torch.as_tensor(cam.K), torch.as_tensor(ref.K), atol=1e-12)  # JSON/netCDF float64
        assert torch.allclose(torch.as_tensor(cam.R), torch.as_tensor(ref.R), atol=1e-12)
    assert rec.steps == [1] and rec.prompt == truth.prompt
    with pytest.raises(CorrlabError, match="reference_views"):
        probe_generations(pipe, [seed], tmp_path / "bad", num_views=3, reference_views=[0, 1, 2], progress=False)
    with pytest.raises(CorrlabError, match="reference_views"):
        probe_generations(CorrlabPipeline(MultiViewDiT(sample_size=16, patch_size=4, hidden_size=32, num_layers=1,
                                                       num_heads=2, prompt_dim=8, ray_freqs=2)),
                          [seed], tmp_path / "dit", num_views=3, reference_views=[0], progress=False)


def test_resume_under_a_new_schedule_keeps_the_model(tmp_path, capsys):
    """`corrlab train --resume --config NEW`: a cool-down continues the run; a different model is refused."""
    base = dict(arch="unet", model=TINY_UNET, image_size=16, reference_probs=[0.5, 0.5], views=[2], view_probs=[1.0],
                views_per_batch=2, steps=2, checkpoint_every=2, eval_every=0, log_every=1, warmup_steps=1, threads=1)
    (tmp_path / "a.json").write_text(json.dumps(base))
    (tmp_path / "cool.json").write_text(json.dumps({**base, "steps": 4, "decay_steps": 2, "final_lr_ratio": 0.1}))
    (tmp_path / "other.json").write_text(json.dumps({**base, "model": {**TINY_UNET, "channels": [8, 8]}}))
    run = tmp_path / "run"
    assert cli_main(["train", "--config", str(tmp_path / "a.json"), "--out", str(run), "--no-progress"]) == 0
    assert cli_main(["train", "--config", str(tmp_path / "other.json"), "--out", str(run), "--resume", "--no-progress"]) != 0
    assert re.search(r"--config: model is .* but the run .* was trained with", capsys.readouterr().err)
    assert json.loads((run / "config.json").read_text())["model"]["channels"] == [8, 16]  # untouched
    assert cli_main(["train", "--config", str(tmp_path / "cool.json"), "--out", str(run), "--resume", "--no-progress"]) == 0
    lrs = [json.loads(line)["lr"] for line in (run / "loss.jsonl").read_text().splitlines()]
    assert len(lrs) == 4 and lrs[:2] == [base_lr := TrainConfig().lr, base_lr]
    assert lrs[2] == pytest.approx(base_lr) and lrs[3] == pytest.approx(base_lr * 0.5)  # (4 - 3) / 2 of the way down
    assert json.loads((run / "config.json").read_text())["decay_steps"] == 2


def test_epipolar_appearance_nn_picks_the_best_patch_near_the_epipolar_line():
    """Each pick lies within one token of the query's epipolar line (where any token does) and is the
    cheapest patch there: never cheaper than the unrestricted nearest neighbour, equal to it when that one
    is in the band."""
    from corrlab.geometry.epipolar import epipolar_lines, fundamental_matrix
    from corrlab.model.native import appearance_nn, epipolar_appearance_nn
    from corrlab.model.rays import token_centres

    mvs = render_scene(1_000_700, 2, 32, "train")
    p = 4
    pick = epipolar_appearance_nn(mvs.images, mvs.cameras, 1, 0, p)
    free = appearance_nn(mvs.images, 1, 0, p)
    centres = token_centres(32, 32, p)
    lines = epipolar_lines(centres, fundamental_matrix(mvs.cameras[1], mvs.cameras[0]))
    dist = ((lines[:, None, :2] * centres[None]).sum(-1) + lines[:, None, 2]).abs()
    band = dist <= p
    assert band.any(dim=1).float().mean() > 0.5  # the lines cross the image for most tokens
    rows = torch.arange(len(pick))
    assert band[rows, pick][band.any(dim=1)].all()

    def patches(img):
        return img.reshape(3, 8, p, 8, p).permute(1, 3, 0, 2, 4).reshape(64, -1).double()

    cost = torch.cdist(patches(mvs.images[1]), patches(mvs.images[0]))
    assert (cost[rows, pick] >= cost[rows, free] - 1e-12).all()
    in_band = band[rows, free]
    assert torch.equal(cost[rows, pick][in_band], cost[rows, free][in_band])
    masked = torch.where(band, cost, torch.full_like(cost, float("inf"))).min(dim=1).values
    has = band.any(dim=1)
    assert torch.equal(cost[rows, pick][has], masked[has])


def test_train_config_layout_mix_renders_each_seed_in_its_layout():
    """``layout`` may list several camera layouts: scene seed s is rendered in layout[s % len(layout)]."""
    from corrlab.model.train import render_batch

    cfg = TrainConfig.from_dict(dict(layout=["train", "random"]))
    assert cfg.layout == ("train", "random")
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).layout == cfg.layout  # JSON round trip
    seeds = [10, 11]
    x, prompts, rays = render_batch(seeds, 2, 16, cfg.layout, 4, 1.0)
    for i, s in enumerate(seeds):
        want = render_scene(s, 2, 16, cfg.layout[s % 2])
        assert torch.equal(x[i], (want.images * 2.0 - 1.0).float())  # exact: the same rendering twice
        assert prompts[i] == want.prompt
    single, _, single_rays = render_batch([11], 2, 16, "train", 4, 1.0)
    assert not torch.equal(rays[1], single_rays[0])  # seed 11 came from the 'random' layout, not 'train'
    for bad in (["train", "nope"], [], "nope"):
        with pytest.raises(CorrlabError, match="layout"):
            TrainConfig.from_dict(dict(layout=bad))
