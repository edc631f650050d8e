"""``MultiViewUNet(decoder_attention_levels=...)``: multi-view attention at a finer level, in the decoder only."""
from __future__ import annotations

import pytest
import torch

from corrlab.errors import CorrlabError, ShapeError
from corrlab.model import CorrlabPipeline, MultiViewUNet
from corrlab.model.train import TrainConfig, Trainer
from model_helpers import TINY_UNET, perturbed, random_inputs, tiny_unet

BASE = TINY_UNET
model = tiny_unet


def test_decoder_only_blocks_come_last_and_keep_the_other_names():
    plain, fine = model(), model(decoder_attention_levels=[0])
    # stem 2: level 0 at 8x8, level 1 at 4x4, level 2 at 2x2
    assert plain.attention_grids() == {"blocks.0.attn": (4, 4), "blocks.1.attn": (2, 2), "blocks.2.attn": (2, 2),
                                       "blocks.3.attn": (2, 2), "blocks.4.attn": (4, 4)}
    assert fine.attention_grids() == {**plain.attention_grids(), "blocks.5.attn": (8, 8)}
    assert fine.decoder_only_blocks() == ["blocks.5"] and plain.decoder_only_blocks() == []
    with pytest.raises(ShapeError, match="decoder_attention_levels"):
        model(decoder_attention_levels=[1])  # already an attention level
    with pytest.raises(ShapeError, match="decoder_attention_levels"):
        model(channels=[8, 16, 16, 16], attention_levels=[1, 3], decoder_attention_levels=[2])  # not finer than all
    with pytest.raises(ShapeError, match="decoder_attention_levels"):
        model(decoder_attention_levels=[3])
    one = model(decoder_attention_levels=[0], decoder_attention_heads=1)
    assert [b.attn.heads for b in one.blocks] == [2, 2, 2, 2, 2, 1]
    with pytest.raises(ShapeError, match="decoder_attention_heads.*got 3"):
        model(decoder_attention_levels=[0], decoder_attention_heads=3)


def test_decoder_only_block_starts_neutral_and_then_acts():
    """Weights of a model without the block load into one with it and compute the same output (the new block
    adds exact zeros at its start; tolerance 0 up to float32 rounding of the same operations: 1e-6); once its
    output projection is non-zero the new block changes the output and mixes views."""
    plain = model()
    fine = model(seed=1, perturb=False, decoder_attention_levels=[0], decoder_attention_heads=1)
    missing, unexpected = fine.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("blocks.5.") for k in missing)
    x, t, rays = random_inputs(1, 3, 16, 0, patch_size=1)
    pe = plain.encode_prompt(["red striped box"])
    with torch.no_grad():
        torch.testing.assert_close(fine(x, t, pe, rays), plain(x, t, pe, rays), atol=1e-6, rtol=0)
        perturbed(fine.blocks[5])
        out = fine(x, t, pe, rays)
        assert (out - plain(x, t, pe, rays)).abs().max() > 1e-3
        # the new block itself attends across views: view 0's output moves when only view 1's input does
        block = fine.blocks[5]
        feats = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(3))
        block_rays = torch.nn.functional.avg_pool2d(rays[0, :2], 2)
        y = block(feats, block_rays, 2)
        feats2 = feats.clone()
        feats2[1] = torch.randn(8, 8, 8, generator=torch.Generator().manual_seed(4))
        y2 = block(feats2, block_rays, 2)
        assert (y2[0] - y[0]).abs().max() > 1e-4

def test_init_from_weights_without_the_block(tmp_path):
    base = tmp_path / "base"
    CorrlabPipeline(model()).save_pretrained(base)
    cfg = TrainConfig(arch="unet", model={**BASE, "decoder_attention_levels": [0]}, image_size=16, views=[2],
                      view_probs=[1.0], views_per_batch=2, steps=1, threads=1, eval_every=0, checkpoint_every=1)
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.init_from(base)
    shipped = MultiViewUNet.from_pretrained(base / "model").state_dict()
    state = trainer.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in shipped.items())
    block = trainer.model.blocks[5]
    assert float(block.attn.to_out[0].weight.detach().abs().max()) == 0.0
    assert float(block.mlp[-1].weight.detach().abs().max()) == 0.0
    trainer.train_step()  # and it trains: the new block's output projection moves
    assert float(trainer.model.blocks[5].attn.to_out[0].weight.detach().abs().max()) > 0.0
    other = tmp_path / "other"
    CorrlabPipeline(model(channels=[8, 8, 16])).save_pretrained(other)
    with pytest.raises(CorrlabError, match="does not match the run's model"):
        Trainer(cfg, tmp_path / "run2").init_from(other)


def test_at_grid_picks_the_finest_or_the_named_grid():
    import pandas as pd

    from corrlab.errors import ValueRangeError
    from corrlab.model.conditioned import at_grid

    df = pd.DataFrame({"layer": ["blocks.1.attn", "blocks.4.attn", "blocks.5.attn"], "grid": ["8x8", "16x16", "32x32"]})
    assert list(at_grid(df).layer) == ["blocks.5.attn"]
    assert list(at_grid(df, "16x16").layer) == ["blocks.4.attn"]
    with pytest.raises(ValueRangeError, match=r"grid: expected one of .*'64x64'"):
        at_grid(df, "64x64")


def test_seed_epipolar_gain_script_starts_the_new_block_with_the_learned_prior(tmp_path):
    """scripts/seed_epipolar_gain.py: the new block's gains take the source block's largest, every other weight
    is the shipped one, the function is unchanged (the block's output is still zero; float32 rounding: 1e-6),
    and the folder is what ``Trainer.init_from`` takes."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "seed_epipolar_gain", Path(__file__).resolve().parents[1] / "scripts" / "seed_epipolar_gain.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    plain = model()
    with torch.no_grad():
        plain.blocks[4].epipolar_gain.copy_(torch.tensor([0.01, 0.07]))
    base = tmp_path / "base"
    CorrlabPipeline(plain).save_pretrained(base)
    (base / "checkpoint.json").write_text(json.dumps({"step": 7, "wall_s": 1.0, "cpu_s": 2.0}))
    cfg = TrainConfig(arch="unet", model={**BASE, "decoder_attention_levels": [0]}, image_size=16, views=[2],
                      view_probs=[1.0], views_per_batch=2, steps=9, threads=1, eval_every=0, checkpoint_every=1)
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    out = script.seed_epipolar_gain(base, cfg_path, tmp_path / "init")
    seeded = MultiViewUNet.from_pretrained(out / "model")
    torch.testing.assert_close(seeded.blocks[5].epipolar_gain.detach(), torch.full((2,), 0.07))
    state, shipped = seeded.state_dict(), plain.state_dict()
    assert all(torch.equal(state[k], v) for k, v in shipped.items())
    x, t, rays = random_inputs(1, 3, 16, 0, patch_size=1)
    pe = plain.encode_prompt(["red striped box"])
    with torch.no_grad():
        torch.testing.assert_close(seeded.eval()(x, t, pe, rays), plain(x, t, pe, rays), atol=1e-6, rtol=0)
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.init_from(out)
    assert trainer.step == 7
    torch.testing.assert_close(trainer.model.blocks[5].epipolar_gain.detach(), torch.full((2,), 0.07))
    with pytest.raises(CorrlabError, match=r"target: 'blocks.9' has no epipolar_gain; expected one of"):
        script.seed_epipolar_gain(base, cfg_path, tmp_path / "bad", target="blocks.9")
    assert not (tmp_path / "bad").exists()
