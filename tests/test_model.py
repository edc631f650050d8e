"""Tests of the embedded model: MultiViewDiT, prompt encoder, rays, pipeline, training, CLI."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from corrlab.errors import CorrlabError, ShapeError, WeightsNotFoundError
from corrlab.model import CorrlabPipeline, MultiViewDiT, load_default, plucker_ray_embeds, token_centres
from corrlab.model.dit import scene_vocabulary
from corrlab.model.train import TrainConfig, Trainer, flow_matching_loss, render_batch
from corrlab.scenes import sample_cameras
from model_helpers import perturbed, random_inputs

TINY = dict(sample_size=16, patch_size=4, hidden_size=32, num_layers=2, num_heads=2, mlp_ratio=2.0,
            prompt_dim=8, ray_freqs=2, scene_scale=1.0)


def tiny_model(seed: int = 0) -> MultiViewDiT:
    torch.manual_seed(seed)
    return perturbed(MultiViewDiT(**TINY))


def inputs(B=2, V=3, size=16, seed=0):
    return random_inputs(B, V, size, seed, patch_size=4)


def test_forward_shapes_and_bad_input():
    m = tiny_model()
    x, t, rays = inputs()
    pe = m.encode_prompt(["red striped box", "blue dotted sphere"])
    v = m(x, t, pe, rays)
    assert v.shape == x.shape and torch.isfinite(v).all()
    with pytest.raises(ShapeError, match="ray_embeds"):
        m(x, t, pe, rays[:, :2])
    with pytest.raises(ShapeError, match="prompt_embeds"):
        m(x, t, pe[:, :3], rays)


def test_view_count_agnostic_and_permutation_equivariant():
    """No shared position embedding: reordering views (with their rays) reorders the output exactly."""
    m = tiny_model()
    pe = m.encode_prompt(["green checkered cone"])
    for V in (1, 2, 5):
        x, t, rays = inputs(B=1, V=V)
        assert m(x, t, pe, rays).shape == (1, V, 3, 16, 16)
    x, t, rays = inputs(B=1, V=4)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        v = m(x, t, pe, rays)
        v_perm = m(x[:, perm], t, pe, rays[:, perm])
    torch.testing.assert_close(v_perm, v[:, perm], atol=1e-5, rtol=1e-5)


def test_attention_layers_are_diffusers_attention():
    m = tiny_model()
    names = dict(m.named_modules())
    for i in range(TINY["num_layers"]):
        layer = names[f"blocks.{i}.attn"]
        assert isinstance(layer, Attention)
        assert isinstance(layer.processor, AttnProcessor2_0)
    assert f"blocks.{i}.attn.processor" in m.attn_processors


def test_prompt_embedding_is_mean_of_words_and_linear():
    m = tiny_model()
    vocab = m.config.vocabulary
    assert vocab == scene_vocabulary()
    W = m.prompt_encoder.word_embeddings.weight
    e = m.encode_prompt(["red striped box", "blue box"])
    ids = [vocab.index(w) for w in ("red", "striped", "box")]
    torch.testing.assert_close(e[0], W[ids].mean(0))
    # linear: scaling the word table scales the embedding; mixing two tables mixes embeddings
    with torch.no_grad():
        W.mul_(3.0)
    torch.testing.assert_close(m.encode_prompt(["red striped box"])[0], 3.0 * e[0])
    torch.testing.assert_close(m.encode_prompt([""])[0], m.null_prompt_embeds(1)[0])
    with pytest.raises(CorrlabError, match="unknown word 'teapot'.*vocabulary"):
        m.encode_prompt(["red teapot"])


def test_rays_are_plucker_of_token_centres():
    cams = sample_cameras(3, 2, 16, "train")
    r = plucker_ray_embeds(cams, 16, 4, scene_scale=2.0)
    assert r.shape == (2, 6, 4, 4)
    d, m = r[:, :3].double(), r[:, 3:].double()
    torch.testing.assert_close(d.norm(dim=1), torch.ones(2, 4, 4, dtype=torch.float64), atol=1e-6, rtol=0)
    # the moment does not depend on the point on the ray: centre + 5 d gives the same moment
    c = cams[1].center
    o2 = (c[:, None, None] + 5.0 * d[1])
    m2 = torch.linalg.cross(o2, d[1], dim=0) / 2.0
    torch.testing.assert_close(m2, m[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(token_centres(8, 8, 4).double(), torch.tensor([[1.5, 1.5], [5.5, 1.5], [1.5, 5.5], [5.5, 5.5]],
                               dtype=torch.float64), rtol=0, atol=1e-12)  # computed centres: rounding tolerance


def test_cfg_guidance_one_equals_conditional_and_formula():
    pipe = CorrlabPipeline(tiny_model())
    x, t, rays = inputs(B=2, V=2)
    pe = pipe.encode_prompt(["red striped box", "pink dotted cylinder"])
    with torch.no_grad():
        cond = pipe.model(x, t, pe, rays)
        null = pipe.model(x, t, pipe.model.null_prompt_embeds(2), rays)
        torch.testing.assert_close(pipe.velocity(x, t, pe, rays, 1.0), cond)
        torch.testing.assert_close(pipe.velocity(x, t, pe, rays, 3.0), null + 3.0 * (cond - null), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cond, null)


def test_same_seed_same_output_and_round_trip(tmp_path):
    pipe = CorrlabPipeline(tiny_model())
    a = pipe("red striped box", num_views=2, num_inference_steps=3, seed=5, progress=False)
    b = pipe("red striped box", num_views=2, num_inference_steps=3, seed=5, progress=False)
    c = pipe("red striped box", num_views=2, num_inference_steps=3, seed=6, progress=False)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)  # exact: same computation twice
    assert a.images.shape == (2, 3, 16, 16) and a.prompt == "red striped box" and a.seed == 5
    pipe.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = CorrlabPipeline.from_pretrained(tmp_path / "m")
    for k, v in pipe.model.state_dict().items():
        assert torch.equal(v, loaded.model.state_dict()[k]), k  # exact: safetensors round trip, no arithmetic
    d = loaded("red striped box", num_views=2, num_inference_steps=3, seed=5, progress=False)
    assert torch.equal(a.images, d.images)  # exact: same computation twice (bit-identical weights, same seed)
    sets = pipe(["red box", "blue cone"], num_views=2, num_inference_steps=2, seed=1, progress=False)
    assert [s.prompt for s in sets] == ["red box", "blue cone"]


def test_training_reduces_loss_on_fixed_batch():
    torch.manual_seed(0)
    m = MultiViewDiT(**TINY).train()
    x0, prompts, rays = render_batch([1, 2], 2, 16, "train", 4, 1.0)
    g = torch.Generator().manual_seed(0)
    noise, t = torch.randn(x0.shape, generator=g), torch.full((2,), 0.5)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = flow_matching_loss(m, x0, m.encode_prompt(prompts), rays, t, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]


def test_trainer_resume_is_deterministic(tmp_path):
    cfg = dict(model=TINY, image_size=16, views=[2], view_probs=[1.0], views_per_batch=4, steps=4,
               checkpoint_every=2, eval_every=0, warmup_steps=1)
    straight = Trainer(TrainConfig.from_dict(cfg), tmp_path / "a")
    straight.run(progress=False)
    first = Trainer(TrainConfig.from_dict({**cfg, "steps": 2}), tmp_path / "b")
    first.run(progress=False)
    resumed = Trainer(TrainConfig.from_dict(cfg), tmp_path / "b")
    assert resumed.resume() and resumed.step == 2
    resumed.run(progress=False)
    # exact: same computation twice (the resumed run repeats the straight run's steps 2-3 from a lossless
    # checkpoint of weights, EMA and optimiser; each step's batch is a function of the step number)
    for k, v in straight.ema.state_dict().items():
        assert torch.equal(v, resumed.ema.state_dict()[k]), k
    lines = (tmp_path / "a" / "loss.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 4


def test_train_config_rejects_held_out_seeds():
    with pytest.raises(CorrlabError, match="train_seeds"):
        TrainConfig(train_seeds=(0, 2_000_000))
    with pytest.raises(CorrlabError, match="unknown keys"):
        TrainConfig.from_dict({"stepz": 3})
    assert TrainConfig.from_dict(json.loads(json.dumps(TrainConfig().to_dict()))) == TrainConfig()


def test_layer_matches_are_the_matchers_head_mean_on_the_tapped_tensors():
    """The tracking evaluation reads attention through the taps and matches with the matcher's
    ``heads="mean"``; the model is unchanged afterwards."""
    from corrlab.model.native import layer_matches
    from corrlab.probing.matcher import match_views
    from corrlab.probing.taps import AttentionTaps

    m = tiny_model()
    x, t, rays = inputs(B=1, V=2)
    pe = m.encode_prompt(["red box"])
    before = m(x, t, pe, rays)
    seen = {}

    def keep(call):
        seen[call.layer] = (call.q[0].clone(), call.k[0].clone(), call.scale, call.layout.grid)

    with torch.no_grad(), AttentionTaps(m, None, keep):
        m(x, t, pe, rays)
    got = layer_matches(m, x[0], float(t[0]), pe, rays, src=0, dst=1)
    assert list(got) == ["blocks.0.attn", "blocks.1.attn"] == list(seen)
    for layer, (q, k, scale, grid) in seen.items():
        want = match_views(q[0], k[1][:, None], grid, scale=scale, heads="mean").index[0, 0]
        # exact: the same matcher call on the same tapped tensors
        assert got[layer][1] == grid == (4, 4) and torch.equal(got[layer][0], want)
        # the definition, written out: argmax over view 1's keys of the head-averaged logits (float64;
        # ties of the float32 matcher within 1e-5 of the top logit may pick either token)
        logits = (torch.einsum("hnd,hmd->hnm", q[0].double(), k[1].double()) * scale).mean(0)
        top = logits.max(dim=1).values
        assert bool((logits.gather(1, want[:, None])[:, 0] >= top - 1e-5).all())
    assert torch.equal(m(x, t, pe, rays), before)  # exact: same computation, nothing left attached


def test_missing_weights_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CORRLAB_MODEL", str(tmp_path / "nope"))
    with pytest.raises(WeightsNotFoundError, match="corrlab train"):
        load_default()


def test_generate_command(tmp_path, monkeypatch):
    from corrlab.cli import main
    from corrlab.sets import load_set

    CorrlabPipeline(tiny_model()).save_pretrained(tmp_path / "m")
    monkeypatch.setenv("CORRLAB_MODEL", str(tmp_path / "m"))
    assert main(["generate", "--prompt", "red box", "--seed", "3", "--views", "2", "--steps", "2",
                 "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    s = load_set(tmp_path / "s")
    assert s.num_views == 2 and s.prompt == "red box" and s.seed == 3
    assert main(["generate", "--prompt", "blue cone", "--seed", "4", "--steps", "2", "--cameras",
                 str(tmp_path / "s" / "cameras.json"), "--out", str(tmp_path / "t"), "--no-progress"]) == 0
    t = load_set(tmp_path / "t")
    assert all(torch.equal(a.R, b.R) for a, b in zip(s.cameras, t.cameras))  # exact: cameras.json round trip
    assert main(["generate", "--prompt", "red teapot", "--out", str(tmp_path / "u"), "--no-progress"]) == 2


def test_shipped_default_generates():
    try:
        pipe = load_default()
    except WeightsNotFoundError:
        pytest.skip("the default weights are not in data/ yet")
    mvs = pipe("red striped box", num_views=2, num_inference_steps=2, seed=0, progress=False)
    assert mvs.images.shape == (2, 3, pipe.sample_size, pipe.sample_size)
    assert 0.0 <= float(mvs.images.min()) and float(mvs.images.max()) <= 1.0


def test_export_pipeline_from_checkpoint(tmp_path):
    from corrlab.model.train import export_pipeline

    cfg = TrainConfig.from_dict(dict(model=TINY, image_size=16, views=[2], view_probs=[1.0], views_per_batch=2,
                                     steps=1, checkpoint_every=1, eval_every=0))
    tr = Trainer(cfg, tmp_path / "run")
    tr.run(progress=False)
    out = export_pipeline(tmp_path / "run" / "checkpoints" / "step_0000001", tmp_path / "ship")
    pipe = load_default(out)
    for k, v in tr.ema.state_dict().items():
        assert torch.equal(v, pipe.model.state_dict()[k]), k  # exact: exported copy of the weights, no arithmetic
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 1
    assert (out / "train_config.json").is_file()


def test_dominant_colour_word_on_renders():
    from corrlab.model.adherence import dominant_colour_word
    from corrlab.scenes import render_scene

    for seed in range(1_000_000, 1_000_006):
        mvs = render_scene(seed, 1, 32, "train")
        assert dominant_colour_word(mvs.images[0]) == mvs.prompt.split()[0]
    assert dominant_colour_word(torch.full((3, 8, 8), 0.5)) is None


def test_lr_schedule_warmup_constant_decay(tmp_path):
    cfg = TrainConfig.from_dict(dict(model=TINY, steps=100, warmup_steps=10, decay_steps=20, final_lr_ratio=0.1, lr=1.0))
    tr = Trainer(cfg, tmp_path)
    assert tr.lr_at(0) == pytest.approx(0.1) and tr.lr_at(50) == pytest.approx(1.0)
    assert tr.lr_at(90) == pytest.approx(0.5) and tr.lr_at(99) == pytest.approx(0.1)
