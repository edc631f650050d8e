"""The fused probe's compiled kernel (corrlab.probing.match_kernel) against torch's SDPA and argmax."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from corrlab.errors import ShapeError
from corrlab.probing import fused_attention, match_kernel
from corrlab.probing.fused_attention import UNDERFLOW_GAP, fused_attention_matches
from corrlab.probing.match_kernel import _compile, attention_matches, load_match_kernel, match_kernel_status

OUT_ATOL, OUT_RTOL = 1e-5, 1e-4  # float32 rounding of another summation order (as tests/test_interception.py)
CONF_ATOL = 1e-5

needs_kernel = pytest.mark.skipif(load_match_kernel() is None, reason=f"no match kernel here: {match_kernel_status()}")


def reference(q, k, v, V):
    """float64 logits, SDPA output, first per-image argmax and the matcher's global confidence."""
    H, L, d = q.shape
    n = L // V
    S = (q.double() @ k.double().transpose(-1, -2)).view(H, L, V, n)
    top = S.topk(2, dim=-1).values
    gap = top[..., 0] - top[..., 1]
    conf = 1.0 / (S - S.amax(-1, keepdim=True)).exp().sum(-1)
    out = F.scaled_dot_product_attention(q[None], k[None], v[None], scale=1.0)[0]
    return out, S.argmax(-1), conf, gap


@needs_kernel
@pytest.mark.parametrize("H,V,grid,d,dv", [
    (2, 3, (4, 5), 8, 8),  # L = 60: keys padded to 64; dv = 8: the one-vector tile
    (3, 2, (4, 4), 20, 40),  # dv = 16 + 16 + 8
    (2, 2, (2, 3), 12, 20),  # dv = 16 + 4 scalar columns; L = 12 < one panel
    (4, 4, (8, 8), 32, 32),  # the embedded model's head size
    (1, 5, (3, 3), 16, 16),  # n = 9: blocks straddle vector lanes
])
def test_kernel_equals_sdpa_and_the_first_argmax(H, V, grid, d, dv):
    g = torch.Generator().manual_seed(H * 100 + d)
    n = grid[0] * grid[1]
    q = torch.randn(H, V * n, d, generator=g)
    k = torch.randn(H, V * n, d, generator=g)
    v = torch.randn(H, V * n, dv, generator=g)
    out, argmax, conf = attention_matches(q, k, v, V, UNDERFLOW_GAP)
    ref_out, ref_idx, ref_conf, gap = reference(q, k, v, V)
    assert out.shape == (H, V * n, dv) and argmax.shape == conf.shape == (H, V * n, V)
    assert torch.allclose(out, ref_out, atol=OUT_ATOL, rtol=OUT_RTOL)
    clear = gap > 1e-4 * (1 + ref_idx.abs())  # float32 rounding cannot flip these
    assert clear.float().mean() > 0.95
    assert torch.equal(argmax[clear], ref_idx[clear])
    assert torch.allclose(conf.double(), ref_conf, atol=CONF_ATOL, rtol=0)


@needs_kernel
def test_kernel_ties_resolve_to_the_first_index():
    """Identical keys give bit-identical logits: the argmax is the first of them, as torch.argmax's."""
    g = torch.Generator().manual_seed(1)
    H, V, n, d = 2, 2, 40, 8
    k = torch.randn(H, V * n, d, generator=g)
    k[:, 7] = k[:, 3]  # image 0: keys 3 and 7 equal
    k[:, n + 5] = k[:, n + 33] = k[:, n + 38] = k[:, 3]  # image 1: keys 5, 33 and 38 equal to it
    q = (4 * k[:, 3:4]).expand(H, V * n, d).contiguous()  # every query favours key 3 and its twins
    out, argmax, conf = attention_matches(q, k, torch.randn(H, V * n, d, generator=g), V, UNDERFLOW_GAP)
    S = (q @ k.transpose(-1, -2)).view(H, V * n, V, n)
    assert torch.equal(argmax, S.argmax(-1))
    assert (argmax[..., 0] == 3).all() and (argmax[..., 1] == 5).all()


@needs_kernel
def test_kernel_on_several_threads_equals_one_thread():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(5, 3 * 16, 16, generator=g) for _ in range(3))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = attention_matches(q, k, v, 3, UNDERFLOW_GAP)
        torch.set_num_threads(2)
        two = attention_matches(q, k, v, 3, UNDERFLOW_GAP)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):  # each head is computed by the same code on either thread: the same bits
        assert torch.equal(a, b)


@needs_kernel
def test_kernel_propagates_nan_instead_of_a_silent_number():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2 * 16, 8, generator=g) for _ in range(3))
    q[0, 5, 2] = float("nan")
    out, argmax, conf = attention_matches(q, k, v, 2, UNDERFLOW_GAP)
    assert torch.isnan(out[0, 5]).all() and torch.isnan(conf[0, 5]).all()
    assert torch.isfinite(out[0, :5]).all() and torch.isfinite(conf[0, 6:]).all()


@needs_kernel
def test_kernel_rejects_other_dtypes_and_shapes():
    q = torch.randn(2, 12, 8)
    with pytest.raises(ShapeError, match="float32"):
        attention_matches(q.double(), q.double(), q.double(), 3, UNDERFLOW_GAP)
    with pytest.raises(ShapeError, match="num_images=5"):
        attention_matches(q, q, q, 5, UNDERFLOW_GAP)
    with pytest.raises(ShapeError, match="v "):
        attention_matches(q, q, q[:, :6], 3, UNDERFLOW_GAP)


@pytest.mark.parametrize("compiled", [True, False])
def test_fused_attention_serves_the_same_matches_with_and_without_the_kernel(compiled, monkeypatch):
    """Without a C compiler the fused mode falls back to torch's flash kernel plus the logits again: the same
    output and matches within float rounding."""
    if compiled and load_match_kernel() is None:
        pytest.skip(match_kernel_status())
    if not compiled:
        monkeypatch.setattr(fused_attention, "load_match_kernel", lambda: None)
    g = torch.Generator().manual_seed(4)
    H, V, grid, d = 2, 3, (4, 4), 8
    q, k, v = (torch.randn(H, V * 16, d, generator=g) * 2 for _ in range(3))
    out, index, conf, kept = fused_attention_matches(q, k, v, grid, scale=0.3)
    ref_out, ref_idx, ref_conf, gap = reference(q * 0.3, k, v, V)
    assert torch.allclose(out, ref_out, atol=OUT_ATOL, rtol=OUT_RTOL)
    idx = index.permute(0, 1, 3, 2).reshape(H, V * 16, V)  # (H', src image, tgt image, N) -> (H, L, V)
    cf = conf.permute(0, 1, 3, 2).reshape(H, V * 16, V)
    clear = gap > 1e-4
    assert torch.equal(idx[clear], ref_idx[clear])
    assert torch.allclose(cf.double(), ref_conf, atol=CONF_ATOL, rtol=0)


def test_a_failed_build_says_why_and_leaves_no_file(tmp_path):
    out = tmp_path / "k.so"
    reason = _compile(str(tmp_path / "no-such-cc"), out)
    assert reason is not None and "no-such-cc" in reason
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_the_kernel_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("CORRLAB_MATCH_KERNEL", "0")
    monkeypatch.setitem(match_kernel._state, "tried", False)
    monkeypatch.setitem(match_kernel._state, "fn", None)
    monkeypatch.setitem(match_kernel._state, "status", "not built yet")
    assert load_match_kernel() is None
    assert "CORRLAB_MATCH_KERNEL=0" in match_kernel_status()
    with pytest.raises(RuntimeError, match="unavailable"):
        attention_matches(torch.randn(1, 4, 2), torch.randn(1, 4, 2), torch.randn(1, 4, 2), 2, UNDERFLOW_GAP)
