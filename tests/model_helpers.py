"""Helpers shared by the embedded-model tests (test_model.py, test_model_v2.py, the benchmark-script tests)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

import corrlab
from corrlab.model import plucker_ray_embeds
from corrlab.scenes import sample_cameras


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every weight nudged by seeded noise, in eval mode: zero-initialised output layers
    (adaLN-zero, zero output convs) would otherwise make the tests see a trivial function."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model.eval()


#: A tiny MultiViewUNet with the epipolar bias: tests of its options build on it (``tiny_unet``).
TINY_UNET = dict(sample_size=16, channels=[8, 16, 16], attention_levels=[1, 2], stem=2, num_heads=2, prompt_dim=8,
                 ray_freqs=2, epipolar_bias=True)


def tiny_unet(seed: int = 0, perturb: bool = True, **config) -> torch.nn.Module:
    """``MultiViewUNet(**TINY_UNET, **config)`` seeded; ``perturb`` makes its zero-initialised parts non-zero."""
    from corrlab.model import MultiViewUNet

    torch.manual_seed(seed)
    m = MultiViewUNet(**{**TINY_UNET, **config})
    return perturbed(m) if perturb else m.eval()


def random_inputs(B: int, V: int, size: int, seed: int, patch_size: int):
    """``(x (B, V, 3, S, S), t (B,), rays (B, V, 6, S/p, S/p))`` under the 'train' camera layout of ``seed + b``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, 3, size, size, generator=g)
    t = torch.rand(B, generator=g)
    rays = torch.stack([plucker_ray_embeds(sample_cameras(seed + b, V, size, "train"), size, patch_size)
                        for b in range(B)])
    return x, t, rays


def probe_unet_bit_identical(m, x, t, pe, rays):
    """Runs ``m`` before, inside and after ``corrlab.probe(m, heads="mean")``; asserts the three outputs are
    bit-identical (exact: the same forward pass three times) and returns the probe record."""
    with torch.no_grad():
        before = m(x, t, pe, rays)
        with corrlab.probe(m, heads="mean") as rec:
            during = m(x, t, pe, rays)
        after = m(x, t, pe, rays)
    assert torch.equal(before, during) and torch.equal(before, after)
    return rec


class KernelCapture:
    """A probing observer (``corrlab.probing.interception``) that keeps clones of the last kernel call's
    ``q`` and ``k`` and its softmax ``scale`` in ``self.seen``, and runs the kernel unchanged."""

    structural = False

    def __init__(self):
        self.seen: dict = {}

    def __call__(self, call, q, k, v, proceed):
        self.seen.update(q=q.clone(), k=k.clone(), scale=call.scale)
        return proceed(q, k, v)


def load_benchmark(name: str):
    """The script ``benchmarks/{name}.py`` imported as a module (its ``main`` not run)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
