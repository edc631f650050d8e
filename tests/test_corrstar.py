"""CorrAdapter* (issue 12, item 6): consistency losses at exact correspondences, the attention LoRA tied to its
base, `corrlab train-consistency` (2 steps + resume on a tiny model), and the shipped LoRA on the shipped base."""
from __future__ import annotations

import json
import math

import pytest
import torch

from corrlab.cli import main as cli_main
from corrlab.errors import CorrlabError
from corrlab.model import CorrlabPipeline, MultiViewUNet, DATA_DIR
from corrlab.model.consistency import (
    PairCorrespondences,
    attention_ce_loss,
    correspondence_psnr,
    feature_consistency_loss,
    token_correspondences,
)
from corrlab.model.lora import (
    add_lora,
    base_fingerprint,
    has_lora,
    load_lora,
    read_lora_metadata,
    remove_lora,
    save_lora,
)
from corrlab.scenes import render_scene
from model_helpers import perturbed, random_inputs

TINY_UNET = dict(sample_size=16, channels=[8, 16], attention_levels=[0, 1], stem=2, num_heads=2, prompt_dim=8,
                 ray_freqs=2)


def tiny_unet(seed: int = 0) -> MultiViewUNet:
    torch.manual_seed(seed)
    return perturbed(MultiViewUNet(**TINY_UNET))


def forward(model, seed: int = 0):
    x, t, rays = random_inputs(1, 3, 16, seed, patch_size=1)
    pe = model.encode_prompt(["red striped box"])
    with torch.no_grad():
        return model(x, t, pe, rays, given=torch.tensor([[True, False, False]]))


# ------------------------------------------------------------------------------------------ losses
def test_feature_consistency_loss_hand_case_and_gradient():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(1, 2, 2, 3, 3, generator=g, dtype=torch.float64)
    # token 0 of view 0 -> token (col 1, row 0) of view 1; token 4 -> between (col 2, row 1) and (col 2, row 2)
    pc = PairCorrespondences(0, 1, torch.tensor([0, 4]), torch.tensor([[1.0, 0.0], [2.0, 1.5]]), torch.tensor([1, 5]))
    corr = [[pc]]
    # zero when view 1 holds view 0's features at the matches
    f0 = f.clone()
    f0[0, 1, :, 0, 1] = f0[0, 0, :, 0, 0]
    f0[0, 1, :, 1, 2] = f0[0, 0, :, 1, 1]
    f0[0, 1, :, 2, 2] = f0[0, 0, :, 1, 1]
    assert float(feature_consistency_loss(f0, corr)) == pytest.approx(0.0, abs=1e-24)  # float64 rounding only
    # by hand: mean over 2 matches x 2 channels; the second target is the mean of two tokens (bilinear, half way)
    t1 = f[0, 1, :, 0, 1]
    t2 = 0.5 * (f[0, 1, :, 1, 2] + f[0, 1, :, 2, 2])
    expected = ((f[0, 0, :, 0, 0] - t1).pow(2).sum() + (f[0, 0, :, 1, 1] - t2).pow(2).sum()) / 4
    assert float(feature_consistency_loss(f, corr)) == pytest.approx(float(expected), rel=1e-12)  # float64, 8 terms
    # gradient: analytic on the source side, and torch.autograd.gradcheck on everything
    x = f.clone().requires_grad_(True)
    feature_consistency_loss(x, corr).backward()
    assert torch.allclose(x.grad[0, 0, :, 0, 0], 2 * (f[0, 0, :, 0, 0] - t1) / 4, rtol=1e-12, atol=0)
    assert torch.allclose(x.grad[0, 1, :, 1, 2], -(f[0, 0, :, 1, 1] - t2) / 4, rtol=1e-12, atol=0)  # 2 * 0.5 * ... / 4
    assert torch.autograd.gradcheck(lambda y: feature_consistency_loss(y, corr), (f.clone().requires_grad_(True),))


def test_attention_ce_loss_is_minimal_at_the_true_token():
    N, d = 9, 9
    keys = torch.eye(N, d, dtype=torch.float64)  # orthonormal keys of view 1
    k = torch.zeros(1, 2, 1, N, d, dtype=torch.float64)
    k[0, 1, 0] = keys
    pc = PairCorrespondences(0, 1, torch.tensor([2]), torch.tensor([[1.0, 1.0]]), torch.tensor([4]))

    def ce(target_token: int, strength: float) -> float:
        q = torch.zeros(1, 2, 1, N, d, dtype=torch.float64)
        q[0, 0, 0, 2] = strength * keys[target_token]
        return float(attention_ce_loss(q, k, [[pc]], scale=1.0))

    uniform = ce(4, 0.0)
    assert uniform == pytest.approx(math.log(N), rel=1e-6)  # equal logits: -log(1/N); the CE runs in float32
    at_truth = [ce(4, s) for s in (1.0, 4.0, 16.0)]
    assert at_truth[0] < uniform and at_truth[1] < at_truth[0] and at_truth[2] < at_truth[1]
    assert at_truth[1] == pytest.approx(math.log1p((N - 1) * math.exp(-4.0)), rel=1e-5)  # by hand (float32 CE)
    assert ce(7, 4.0) > uniform  # attention on a wrong token costs more than none
    # gradient flows to q and k
    q = torch.randn(1, 2, 1, N, d, dtype=torch.float64, requires_grad=True)
    kk = k.clone().requires_grad_(True)
    attention_ce_loss(q, kk, [[pc]], scale=0.5).backward()
    assert q.grad[0, 0, 0, 2].abs().sum() > 0 and kk.grad[0, 1, 0].abs().sum() > 0


def test_token_correspondences_and_correspondence_psnr_on_a_rendered_scene():
    mvs = render_scene(1_070_000, 3, 32, "train")
    same = token_correspondences(mvs, (8, 8), pairs=[(0, 0)])[0]  # a view with itself: every match is the token
    assert len(same.src) > 0 and torch.equal(same.tgt, same.src)
    assert torch.allclose(same.tgt_xy, torch.stack([same.src % 8, same.src // 8], 1).float(), atol=1e-4)  # float32 coords
    pairs = token_correspondences(mvs, (8, 8))
    assert [(p.i, p.j) for p in pairs] == [(i, j) for i in range(3) for j in range(3) if i != j]
    for p in pairs:  # the target token holds the (sub-token) target location
        assert ((p.tgt_xy[:, 0].round().long().clamp(0, 7) - p.tgt % 8).abs() <= 1).all()
    with pytest.raises(CorrlabError, match="grid"):
        token_correspondences(mvs, (5, 8))
    # the rendered truth is more consistent at its own true correspondences than copies of one view
    psnr_truth, n = correspondence_psnr(mvs.images, mvs)
    psnr_copy, _ = correspondence_psnr(mvs.images[[0, 0, 0]], mvs)
    assert n > 0 and psnr_truth > psnr_copy + 3


# ------------------------------------------------------------------------------------------ LoRA
def test_lora_load_changes_outputs_and_unload_restores_bit_identically(tmp_path):
    model = tiny_unet()
    before = forward(model)
    fp = base_fingerprint(model)
    flags = add_lora(model, rank=2)
    assert torch.equal(forward(model), before)  # peft's init (B = 0) computes exactly the base
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    path = save_lora(model, tmp_path / "adapter", {"rank": 2, "alpha": 2.0, "base_sha256": fp,
                                                   "target_modules": r".*blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)"})
    with_lora = forward(model)
    remove_lora(model, flags)
    assert not has_lora(model) and base_fingerprint(model) == fp
    assert torch.equal(forward(model), before)
    # load from the file: same outputs as when trained; unload: the base bit for bit, twice over
    handle = load_lora(CorrlabPipeline(model), path.parent)
    assert has_lora(model) and torch.equal(forward(model), with_lora)
    assert (forward(model) - before).abs().max() > 1e-3
    handle.unload()
    assert torch.equal(forward(model), before)
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    with load_lora(model, path) as h:
        assert h.metadata["rank"] == 2
        assert torch.equal(forward(model), with_lora)
    assert not has_lora(model) and torch.equal(forward(model), before)


def test_lora_on_the_wrong_base_errors(tmp_path):
    a, b = tiny_unet(0), tiny_unet(1)
    flags = add_lora(a, rank=2)
    save_lora(a, tmp_path / "adapter", {"rank": 2, "alpha": 2.0, "base_sha256": "0" * 64, "base_step": 7,
                                        "target_modules": r".*blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)"})
    remove_lora(a, flags)
    before = forward(b)
    with pytest.raises(CorrlabError, match="belongs to the base") as e:
        load_lora(b, tmp_path / "adapter")
    assert "step 7" in str(e.value)
    assert not has_lora(b) and torch.equal(forward(b), before)  # nothing half-loaded
    with pytest.raises(CorrlabError, match="no LoRA adapter"):
        load_lora(b, tmp_path / "missing")


# ------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("loss", ["eq14", "attention-ce"])
def test_train_consistency_two_steps_resumes_exactly(tmp_path, loss, capsys):
    base = tmp_path / "base"
    CorrlabPipeline(tiny_unet()).save_pretrained(base)
    common = ["train-consistency", "--base", str(base), "--loss", loss, "--sets-per-step", "1", "--rank", "2",
              "--checkpoint-every", "1", "--no-progress"]
    assert cli_main([*common, "--steps", "2", "--out", str(tmp_path / "a")]) == 0
    assert cli_main([*common, "--steps", "1", "--out", str(tmp_path / "b")]) == 0
    assert cli_main([*common, "--steps", "2", "--out", str(tmp_path / "b")]) != 0  # checkpoints there, no --resume
    assert "pass --resume" in capsys.readouterr().err
    assert cli_main([*common, "--steps", "2", "--out", str(tmp_path / "b"), "--resume"]) == 0
    la = [json.loads(x) for x in (tmp_path / "a" / "loss.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "b" / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in la] == [2] and [r["step"] for r in lb] == [1, 2]
    assert all(math.isfinite(r["consistency"]) and r["consistency"] > 0 for r in la + lb)
    # resumed run == uninterrupted run (same computation: same seeds, restored optimiser state)
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "a" / "lora" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "lora" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(float(wa[k].abs().max()) > 0 for k in wa if "lora_B" in k)  # training moved the LoRA
    meta = read_lora_metadata(tmp_path / "a" / "lora")
    assert meta["loss"] == loss and meta["steps"] == 2 and meta["lambda"] == 0.1
    # the adapter loads onto its base and changes the output
    pipe = CorrlabPipeline.from_pretrained(base)
    before = forward(pipe.model)
    with load_lora(pipe, tmp_path / "a" / "lora"):
        assert not torch.equal(forward(pipe.model), before)
    assert torch.equal(forward(pipe.model), before)


# ------------------------------------------------------------------------------------------ shipped
SHIPPED = DATA_DIR / "corrlab-mvunet-s-corrstar" / "adapter_model.safetensors"


@pytest.mark.skipif(not SHIPPED.is_file(), reason="the shipped CorrAdapter* LoRA is not in data/")
def test_shipped_corrstar_on_the_shipped_base():
    from corrlab.model import load_default
    from corrlab.model.lora import load_corrstar
    from corrlab.model.rays import plucker_ray_embeds

    pipe = load_default("corrlab-mvunet-s")
    truth = render_scene(1_070_000, 4, 64, "train")
    x = torch.randn(1, 4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    x[0, 0] = truth.images[0] * 2 - 1
    rays = plucker_ray_embeds(truth.cameras, 64, 1, float(pipe.model.config.scene_scale))[None]
    given = torch.tensor([[True, False, False, False]])

    def run():
        with torch.no_grad():
            return pipe.model(x, torch.tensor([0.5]), pipe.encode_prompt([truth.prompt]), rays, given=given)

    before = run()
    handle = load_corrstar(pipe)
    assert handle.metadata["base_sha256"] == read_lora_metadata(SHIPPED)["base_sha256"]
    assert (run() - before).abs().max() > 1e-4
    handle.unload()
    assert torch.equal(run(), before)
