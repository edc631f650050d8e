"""Complete tiny diffusers pipelines, saved and loaded from disk, run through their OWN ``__call__`` under
corrlab's probe, scoring, CorrAdapter and segment transport (the ``tiny_pipeline_dir`` fixture builds them
once per session, offline, from configs with random weights)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import corrlab
from corrlab.errors import CorrlabError, WeightsNotFoundError
from corrlab.interventions import corr_adapter, segment_transport
from corrlab.interventions.velocity_adapters import FluxVelocity, WanVelocity, pack_latents, unpack_latents
from corrlab.pipelines import MultiViewUNetPipeline, UnsupportedPipelineError, check_supported
from corrlab.evaluation import score_record
from corrlab.probing import probe
from corrlab.probing.extended_attention import MultiViewAttnProcessor, extended_attention
from corrlab.tiny_pipelines import TINY_CALL

PROMPT = "a red striped box"
EXPECTED_CLASS = {"wan": "WanPipeline", "flux": "FluxPipeline", "sd": "StableDiffusionPipeline",
                  "unet_mv": "MultiViewUNetPipeline"}
# images per generation: Wan's 9 frames are 3 latent frames; extended attention over 2 images (Flux, SD);
# the multi-view UNet pipeline's num_views
NUM_IMAGES = {"wan": 3, "flux": 2, "sd": 2, "unet_mv": 4}


@pytest.fixture(scope="module")
def pipes(tiny_pipeline_dir):
    cache = {}

    def get(kind):
        if kind not in cache:
            pipe = corrlab.load_pipeline(tiny_pipeline_dir[kind])
            pipe.set_progress_bar_config(disable=True)
            cache[kind] = pipe
        return cache[kind]

    return get


def generate(pipe, kind, steps=2, seed=0, output_type="latent", **kw):
    """One generation through the pipeline's own __call__; returns latents (or images) as a tensor."""
    args = dict(TINY_CALL[kind])
    if kind in ("flux", "sd"):
        args["num_images_per_prompt"] = NUM_IMAGES[kind]
    args.update(kw)
    out = pipe(prompt=PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
               output_type=output_type, **args)
    x = out.frames if hasattr(out, "frames") else out.images
    return torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x


def multi_image(pipe, kind):
    """The context that makes a single-image pipeline multi-image (a no-op for Wan and the multi-view UNet)."""
    from contextlib import nullcontext

    return extended_attention(pipe, NUM_IMAGES[kind]) if kind in ("flux", "sd") else nullcontext()


def processors(pipe) -> set[str]:
    denoiser = pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet
    return {type(p).__name__ for p in denoiser.attn_processors.values()}


# ------------------------------------------------------------------------------------------ loading
@pytest.mark.parametrize("kind", list(EXPECTED_CLASS))
def test_load_pipeline_reads_the_class_from_model_index(pipes, tiny_pipeline_dir, kind):
    index = json.loads((tiny_pipeline_dir[kind] / "model_index.json").read_text())
    pipe = pipes(kind)
    assert index["_class_name"] == EXPECTED_CLASS[kind] == type(pipe).__name__
    assert check_supported(pipe) == {"wan": "video", "flux": "extended", "sd": "extended", "unet_mv": "multiview"}[kind]
    # weights are read from the folder: a parameter equals the saved safetensors tensor
    from safetensors.torch import load_file

    sub = "unet" if kind in ("sd", "unet_mv") else "transformer"
    saved = load_file(next((tiny_pipeline_dir[kind] / sub).glob("*.safetensors")))
    name, tensor = next(iter(sorted(saved.items())))
    assert torch.equal(getattr(pipe, sub).state_dict()[name], tensor)


def test_multiview_unet_pipeline_round_trips_its_views_and_processors(pipes):
    pipe = pipes("unet_mv")
    assert isinstance(pipe, MultiViewUNetPipeline) and pipe.num_views == 4
    attn1 = {k: p for k, p in pipe.unet.attn_processors.items() if k.endswith("attn1.processor")}
    assert attn1 and all(isinstance(p, MultiViewAttnProcessor) and p.num_views == 4 for p in attn1.values())
    with pytest.raises(CorrlabError, match="num_images_per_prompt"):
        pipe(prompt=PROMPT, num_inference_steps=1, num_images_per_prompt=3, output_type="latent", height=16, width=16)


def test_load_pipeline_never_downloads_and_says_how_to_get_weights(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="hf download corrlab-tests/no-such-pipeline"):
        corrlab.load_pipeline("corrlab-tests/no-such-pipeline", cache_dir=tmp_path / "empty-cache")
    (tmp_path / "plain").mkdir()
    with pytest.raises(CorrlabError, match="model_index.json"):
        corrlab.load_pipeline(tmp_path / "plain")


def test_load_pipeline_finds_a_hub_id_in_the_local_cache(tiny_pipeline_dir, tmp_path):
    """The Hugging Face cache layout (models--owner--name/snapshots/REV, refs/main): found offline by id."""
    repo = tmp_path / "hub" / "models--corrlab-tests--tiny-sd"
    rev = "0" * 40
    shutil.copytree(tiny_pipeline_dir["sd"], repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    pipe = corrlab.load_pipeline("corrlab-tests/tiny-sd", cache_dir=tmp_path / "hub")
    assert type(pipe).__name__ == "StableDiffusionPipeline"


def test_unsupported_pipeline_type_names_the_supported_ones_and_the_extension_point(tmp_path, tiny_pipeline_dir):
    folder = tmp_path / "other"
    shutil.copytree(tiny_pipeline_dir["sd"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UnsupportedPipelineError) as e:
        corrlab.load_pipeline(folder)
    msg = str(e.value)
    assert "StableDiffusionXLPipeline" in msg and "WanPipeline" in msg and "FluxPipeline" in msg
    assert "extension point for custom attention modules" in msg
    with pytest.raises(UnsupportedPipelineError, match="MultiViewUNetPipeline"):
        check_supported(object())


# ------------------------------------------------------------------------------------------ probe
_UNET_LAYERS = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1": (8, 8),
    "mid_block.attentions.0.transformer_blocks.0.attn1": (4, 4),
    "up_blocks.1.attentions.0.transformer_blocks.0.attn1": (8, 8),
    "up_blocks.1.attentions.1.transformer_blocks.0.attn1": (8, 8),
}
LAYOUT = {  # {layer: grid (tokens per image)} in forward order, image size (pixels)
    "wan": ({"blocks.0.attn1": (4, 4), "blocks.1.attn1": (4, 4)}, (64, 64)),
    "flux": ({"transformer_blocks.0.attn": (8, 8), "single_transformer_blocks.0.attn": (8, 8)}, (32, 32)),
    "sd": (_UNET_LAYERS, (16, 16)),
    "unet_mv": (_UNET_LAYERS, (16, 16)),
}
PROCESSORS = {  # the diffusers attention processors the probe sees in each pipeline
    "wan": {"WanAttnProcessor"},
    "flux": {"FluxAttnProcessor"},
    "sd": {"AttnProcessor2_0"},
    "unet_mv": {"AttnProcessor2_0", "MultiViewAttnProcessor"},
}


@pytest.mark.parametrize("kind", list(LAYOUT))
def test_probe_through_the_pipeline_call_records_every_layer_and_step(pipes, kind):
    pipe = pipes(kind)
    assert processors(pipe) == PROCESSORS[kind]
    with multi_image(pipe, kind):
        plain = generate(pipe, kind)
        with probe(pipe) as rec:
            probed = generate(pipe, kind)
    assert torch.equal(plain, probed)  # observing changes nothing (same computation run twice)
    layers, size = LAYOUT[kind]
    assert rec.layers == list(layers)
    assert rec.steps == [0, 1]
    assert rec.num_images == NUM_IMAGES[kind]
    assert {name: rec.grid(name) for name in rec.layers} == layers
    assert rec.image_size == size
    # every ordered image pair of every (layer, step) holds a match for every head and source token
    ds = rec.ds
    off_diagonal = ~np.eye(rec.num_images, dtype=bool)
    for li, name in enumerate(rec.layers):
        (gh, gw), hp = rec.grid(name), int(ds["num_heads"].values[li])
        assert (ds["match_row"].values[li][:, off_diagonal][..., :hp, :gh, :gw] >= 0).all()
    # the recorded timesteps are the scheduler's (the step detection followed the pipeline's loop)
    expected = pipe.scheduler.timesteps.float().numpy()
    if kind == "flux":
        expected = expected / 1000.0  # the Flux pipeline passes timestep / 1000 to its transformer
    np.testing.assert_allclose(ds["timestep"].values, expected, rtol=1e-6)  # float32 round trip
    # memory the record adds (README, GPU recipe): 9 bytes (int32 match, float32 confidence, bool kept) per
    # source token, target image and matched head, i.e. 9 V H' bytes per token of the layer, per recorded step
    tokens = {name: rec.num_images * grid[0] * grid[1] for name, grid in layers.items()}
    heads = dict(zip(rec.layers, ds["num_heads"].values.tolist()))
    assert rec.nbytes == sum(9 * rec.num_images * heads[n] * tokens[n] * len(rec.steps) for n in rec.layers)


@pytest.mark.parametrize("kind", ["sd", "unet_mv"])
def test_score_a_probed_unet_generation_under_cameras(pipes, kind):
    """Random weights: the numbers mean nothing, but the rows must count exactly the kept matches."""
    from corrlab.scenes import sample_cameras

    pipe = pipes(kind)
    with multi_image(pipe, kind), probe(pipe) as rec:
        generate(pipe, kind)
    V = rec.num_images
    rec.set_meta(prompt=PROMPT, seed=0, cameras=sample_cameras(0, V, 16, layout="even"))
    df = score_record(rec, thresholds=[2, 8])
    assert len(df) == len(rec.layers) * len(rec.steps) * V * (V - 1) * 2
    kept = rec.ds["kept"].values.sum(axis=(4, 5, 6))  # (layer, step, src, tgt), heads pooled
    per_pair = df[df.threshold == 2].set_index(["layer", "step", "src", "tgt"])["n_matches"]
    for li, layer in enumerate(rec.layers):
        for si, step in enumerate(rec.steps):
            for i in range(V):
                for j in range(V):
                    if i != j:
                        assert per_pair[(layer, step, i, j)] == kept[li, si, i, j]
    assert (df["precision"].dropna().between(0, 1)).all()


# ------------------------------------------------------------------------------------------ CorrAdapter
@pytest.mark.parametrize("kind", list(LAYOUT))
def test_corr_adapter_on_and_off_through_the_pipeline_call(pipes, kind):
    pipe = pipes(kind)
    with multi_image(pipe, kind):
        plain = generate(pipe, kind)
        with corr_adapter(pipe, eta=1.0, active_steps=None) as h:
            off = generate(pipe, kind)
        assert h.stats["adapted_calls"] > 0
        assert torch.equal(plain, off)  # eta = 1 reproduces the plain model bit for bit
        with corr_adapter(pipe, eta=0.1, threshold=0.0, active_steps=None) as h:
            on = generate(pipe, kind)
        assert h.stats["kept"] == h.stats["total"] > 0  # threshold 0 keeps every match
        again = generate(pipe, kind)
    assert not torch.allclose(plain, on)  # the adapter changed the generation
    assert torch.equal(plain, again)  # and was removed on exit


# ------------------------------------------------------------------------------------------ segment transport
def _flux_reference(pipe, noise, steps):
    pe_a, pool_a, _ = pipe.encode_prompt("a red striped box", prompt_2=None, max_sequence_length=16)
    pe_b, pool_b, _ = pipe.encode_prompt("a blue dotted sphere", prompt_2=None, max_sequence_length=16)
    ref = pipe(prompt_embeds=pe_a, pooled_prompt_embeds=pool_a, latents=pack_latents(noise[None]),
               num_inference_steps=steps, output_type="latent", height=32, width=32, guidance_scale=1.0).images
    return unpack_latents(ref, *noise.shape[1:])[0], (pe_a[0], pool_a[0]), (pe_b[0], pool_b[0])


def _wan_reference(pipe, noise, steps):
    pe_a, _ = pipe.encode_prompt("a red striped box", do_classifier_free_guidance=False, max_sequence_length=16)
    pe_b, _ = pipe.encode_prompt("a blue dotted sphere", do_classifier_free_guidance=False, max_sequence_length=16)
    ref = pipe(prompt_embeds=pe_a, latents=noise[None], num_inference_steps=steps, output_type="latent",
               height=64, width=64, num_frames=9, guidance_scale=1.0).frames
    return ref[0], pe_a[0], pe_b[0]


@pytest.mark.parametrize("kind", ["flux", "wan"])
def test_segment_transport_through_the_velocity_adapters_matches_the_pipeline(pipes, kind):
    pipe = pipes(kind)
    g = torch.Generator().manual_seed(3)
    steps = 3
    if kind == "flux":
        noise = torch.randn((4, 16, 16), generator=g)  # unpacked latents of a 32 x 32 image
        ref, cond_a, cond_b = _flux_reference(pipe, noise, steps)
        fn = FluxVelocity(pipe.transformer)
    else:
        noise = torch.randn((16, 3, 8, 8), generator=g)  # 3 latent frames of a 64 x 64 video
        ref, cond_a, cond_b = _wan_reference(pipe, noise, steps)
        fn = WanVelocity(pipe.transformer)
    sigmas = pipe.scheduler.sigmas.clone()  # the schedule the pipeline's own call just used (ends at 0)
    assert sigmas.numel() == steps + 1 and float(sigmas[-1]) == 0.0
    ind = segment_transport(fn, noise, cond_a, cond_b, sigmas, mode="independent", progress=False)
    # The adapter's one batched call per step = the pipeline's Euler loop; only the timestep's float32 round
    # trip (sigma -> 1000 sigma [-> / 1000]) and batching differ: 1e-4 is far below the latents' scale (~1).
    torch.testing.assert_close(ind.x_a, ref.float(), atol=1e-4, rtol=1e-4)
    full = segment_transport(fn, noise, cond_a, cond_b, sigmas, mode="full", k=3, progress=False)
    assert torch.isfinite(full.x_a).all() and torch.isfinite(full.x_b).all()
    assert not torch.allclose(full.x_a, ind.x_a, atol=1e-4)  # the joint segment couples the endpoints
    same = segment_transport(fn, noise, cond_a, cond_a, sigmas, mode="full", k=3, progress=False)
    assert torch.equal(same.x_a, same.x_b)  # identical conditions: the segment stays a point


# ------------------------------------------------------------------------------------------ CLI
def test_cli_probe_and_score_a_video_pipeline_folder(tiny_pipeline_dir, tmp_path, capsys):
    from corrlab.cli import main
    from corrlab.pipelines import load_pipeline_output

    out = tmp_path / "wan_probe"
    argv = ["probe", "--model", str(tiny_pipeline_dir["wan"]), "--prompt", PROMPT, "--seed", "1", "--num-steps", "2",
            "--height", "64", "--width", "64", "--frames", "9", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    frames, header = load_pipeline_output(out)
    assert header["pipeline"] == "WanPipeline" and header["kind"] == "video"
    assert frames.shape == (9, 3, 64, 64) and header["record_frames"] == [0, 4, 8]
    rec = corrlab.ProbeRecord.load(out / "record.nc")
    assert rec.num_images == 3 and rec.steps == [0, 1] and rec.seed == 1
    capsys.readouterr()
    assert main(["score", str(out), "--json", "--thresholds", "2", "8"]) == 0
    rows = json.loads(capsys.readouterr().out)
    # one row per (layer, step, ordered frame pair, threshold), frames named by their video index
    assert len(rows) == 2 * 2 * 6 * 2
    assert {(r["src"], r["tgt"]) for r in rows} == {(a, b) for a in (0, 4, 8) for b in (0, 4, 8) if a != b}
    for r in rows:
        assert r["kind"] == "flow" and 0 <= r["n_correct"] <= r["n_matches"] <= 16 * 2  # 4 x 4 tokens, 2 heads
        assert r["n_matches"] == 0 or r["precision"] == pytest.approx(r["n_correct"] / r["n_matches"])
    by_t = {}
    for r in rows:  # more pixels of tolerance never score fewer correct matches
        by_t.setdefault((r["layer"], r["step"], r["src"], r["tgt"]), {})[r["threshold"]] = r["n_correct"]
    assert all(v[2.0] <= v[8.0] for v in by_t.values())


def test_cli_generate_with_a_pipeline_folder_and_corr_adapter(tiny_pipeline_dir, tmp_path, capsys):
    from corrlab.cli import main
    from corrlab.pipelines import load_pipeline_output

    common = ["--model", str(tiny_pipeline_dir["flux"]), "--prompt", PROMPT, "--steps", "2", "--views", "2",
              "--height", "32", "--width", "32", "--no-progress"]
    assert main(["generate", *common, "--out", str(tmp_path / "plain")]) == 0
    assert main(["generate", *common, "--corr-adapter", "--eta", "1", "--active-steps", "0",
                 "--out", str(tmp_path / "off")]) == 0
    plain, h_plain = load_pipeline_output(tmp_path / "plain")
    off, h_off = load_pipeline_output(tmp_path / "off")
    assert plain.shape == (2, 3, 32, 32) and h_plain["pipeline"] == "FluxPipeline"
    assert h_off["corr_adapter"]["eta"] == 1.0 and h_off["corr_adapter"]["layers"] == ["single_transformer_blocks.0.attn"]
    assert torch.equal(plain, off)  # eta = 1: the saved images are identical
    capsys.readouterr()
    assert main(["score", str(tmp_path / "plain"), "--json"]) == 2  # images without cameras: a clear error
    assert "no cameras" in capsys.readouterr().err


def test_cli_rejects_an_unsupported_pipeline_folder(tiny_pipeline_dir, tmp_path, capsys):
    from corrlab.cli import main

    folder = tmp_path / "xl"
    shutil.copytree(tiny_pipeline_dir["sd"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    assert main(["probe", "--model", str(folder), "--prompt", PROMPT, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "StableDiffusionXLPipeline" in err and "supported" in err and "custom attention modules" in err
