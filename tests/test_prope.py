"""The relative projective camera encoding (PRoPE) option of MultiViewUNet: camera recovery from the ray map,
invariance to the world frame, view-permutation equivariance, and probing the attention it really computes."""
from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention

from corrlab.errors import ShapeError
from corrlab.geometry import Camera
from corrlab.model import MultiViewUNet, plucker_ray_embeds
from corrlab.model.prope import (
    PRoPEAttnProcessor,
    apply_projective,
    normalisation_matrix,
    projective_matrices_from_rays,
)
from corrlab.probing.interception import intercepting
from corrlab.scenes import sample_cameras
from model_helpers import KernelCapture, perturbed, probe_unet_bit_identical, random_inputs

TINY_PROPE = dict(sample_size=16, channels=[8, 16], attention_levels=[0, 1], stem=2, num_heads=1, prompt_dim=8,
                  ray_freqs=2, relative_encoding="prope")


def tiny_prope(seed: int = 0) -> MultiViewUNet:
    torch.manual_seed(seed)
    return perturbed(MultiViewUNet(**TINY_PROPE))


def rigid(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded rotation ``Q`` and translation ``s`` (a change of world frame ``X' = Q X + s``)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    if torch.det(Q) < 0:
        Q[:, 0] = -Q[:, 0]
    return Q, 0.5 * torch.randn(3, generator=g, dtype=torch.float64)


def moved(cam: Camera, Q: torch.Tensor, s: torch.Tensor) -> Camera:
    """The same camera in the world frame ``X' = Q X + s``: ``x_cam = R Q^T (X' - s) + t``."""
    return Camera(cam.K, cam.R @ Q.T, cam.t - cam.R @ Q.T @ s)


@pytest.mark.parametrize("size,layout", [(64, "train"), (32, "random")])
def test_projective_matrices_recover_the_cameras_exactly(size, layout):
    cams = sample_cameras(7, 4, size, layout)
    D = projective_matrices_from_rays(plucker_ray_embeds(cams, size, patch_size=1))
    N = normalisation_matrix(size, size)
    for i, cam in enumerate(cams):
        P = N @ cam.K @ torch.cat([cam.R, cam.t[:, None]], dim=1)
        P = P / P[2, :3].norm()
        torch.testing.assert_close(D[i, :3], P, atol=1e-6, rtol=0)  # float32 rays -> a float64 solve
        assert D[i, 3].tolist() == [0.0, 0.0, 0.0, 1.0]
    with pytest.raises(ShapeError, match="rays"):
        projective_matrices_from_rays(torch.zeros(2, 3, 8, 8))


def test_prope_attention_depends_only_on_relative_cameras():
    """Moving the world frame changes every D_i but no D_i D_j^-1: the processor's output is unchanged
    (tolerance 1e-4: the same product reached through other float32 factors)."""
    cams = sample_cameras(3, 3, 32, "random")
    Q, s = rigid(11)
    D = projective_matrices_from_rays(plucker_ray_embeds(cams, 32, patch_size=1))[None]
    D2 = projective_matrices_from_rays(plucker_ray_embeds([moved(c, Q, s) for c in cams], 32, patch_size=1))[None]
    assert (D - D2).abs().max() > 0.1  # the absolute cameras did change
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8, processor=PRoPEAttnProcessor(2))
    x = torch.randn(1, 3 * 5, 16)
    with torch.no_grad():
        out, out2 = attn(x, cameras=D, views=3), attn(x, cameras=D2, views=3)
    torch.testing.assert_close(out, out2, atol=1e-4, rtol=1e-4)
    with pytest.raises(ShapeError, match="cameras"):
        attn(x, cameras=D[:, :2], views=3)


def test_apply_projective_transforms_groups_of_four_per_view():
    x = torch.randn(1, 2, 2 * 3, 10)
    mats = torch.stack([torch.eye(4), 2 * torch.eye(4)])[None].double()
    y = apply_projective(x, mats, views=2, blocks=2)
    torch.testing.assert_close(y[:, :, :3], x[:, :, :3])  # view 0: identity
    torch.testing.assert_close(y[:, :, 3:, :8], 2 * x[:, :, 3:, :8])  # view 1: doubled, 8 channels
    torch.testing.assert_close(y[:, :, 3:, 8:], x[:, :, 3:, 8:])  # the rest untouched


def test_prope_changes_the_model_and_bad_option_is_refused():
    torch.manual_seed(0)
    plain = perturbed(MultiViewUNet(**{**TINY_PROPE, "relative_encoding": "none"}))
    m = tiny_prope()
    assert all(isinstance(b.attn.processor, PRoPEAttnProcessor) for b in m.blocks)
    assert plain.state_dict().keys() == m.state_dict().keys()  # PRoPE adds no parameters
    x, t, rays = random_inputs(1, 2, 16, 1, patch_size=1)
    pe = m.encode_prompt(["red striped box"])
    with torch.no_grad():
        assert not torch.allclose(plain(x, t, pe, rays), m(x, t, pe, rays), atol=1e-4)
    with pytest.raises(ShapeError, match="relative_encoding"):
        MultiViewUNet(**{**TINY_PROPE, "relative_encoding": "rope"})


def test_probe_reads_the_transformed_queries_and_keys_and_leaves_the_model_bit_identical():
    m = tiny_prope()
    x, t, rays = random_inputs(1, 2, 16, 2, patch_size=1)
    pe = m.encode_prompt(["blue dotted sphere"])
    capture = KernelCapture()
    seen = capture.seen

    attn = m.blocks[0].attn
    D = projective_matrices_from_rays(rays.reshape(2, 6, 16, 16)).reshape(1, 2, 4, 4)
    a = torch.randn(1, 2 * 64, 8)
    with torch.no_grad(), intercepting(attn, capture):
        attn(a, cameras=D, views=2)
        q = attn.to_q(a).reshape(1, -1, 1, 8).transpose(1, 2)
    torch.testing.assert_close(seen["q"], apply_projective(q, D.transpose(-1, -2), 2, 1))
    assert not torch.allclose(seen["q"], q, atol=1e-3)
    rec = probe_unet_bit_identical(m, x, t, pe, rays)
    assert rec.layers == [f"blocks.{i}.attn" for i in range(5)]


def test_consistency_training_on_a_prope_base(tmp_path, capsys):
    """CorrAdapter*'s eq14 LoRA trains through the PRoPE processor (peft wraps to_q / to_k / to_v / to_out.0);
    the attention-ce loss, which reads q and k before the camera transform, is refused with a clear error."""
    from corrlab.cli import main as cli_main
    from corrlab.model import CorrlabPipeline, load_lora

    base = tmp_path / "base"
    CorrlabPipeline(tiny_prope()).save_pretrained(base)
    common = ["train-consistency", "--base", str(base), "--sets-per-step", "1", "--rank", "2", "--steps", "1",
              "--no-progress"]
    assert cli_main([*common, "--loss", "attention-ce", "--out", str(tmp_path / "ce")]) != 0
    assert "relative_encoding='prope'" in capsys.readouterr().err
    assert cli_main([*common, "--loss", "eq14", "--out", str(tmp_path / "a")]) == 0
    pipe = CorrlabPipeline.from_pretrained(base)
    x, t, rays = random_inputs(1, 2, 16, 3, patch_size=1)
    pe = pipe.model.encode_prompt(["red striped box"])
    with torch.no_grad():
        before = pipe.model(x, t, pe, rays)
        with load_lora(pipe, tmp_path / "a" / "lora"):
            assert isinstance(pipe.model.blocks[0].attn.processor, PRoPEAttnProcessor)
            assert not torch.equal(pipe.model(x, t, pe, rays), before)
        assert torch.equal(pipe.model(x, t, pe, rays), before)
