"""The chunked native-correspondence matcher against a naive full-matrix reference."""
import itertools
import math

import pytest
import torch

from corrlab.errors import CorrlabError, ShapeError, ValueRangeError
from corrlab.probing.matcher import HistoryMax, match_tokens, match_views

from matching_reference import CONF_ATOL, CONF_RTOL, assert_unambiguous, naive_match


OPTIONS = list(itertools.product(("softmax", "dual_softmax"), ("per_head", "mean"), ("global", "window"), (False, True)))


@pytest.mark.parametrize("similarity,heads,confidence,mutual", OPTIONS)
def test_chunked_equals_naive_reference(similarity, heads, confidence, mutual):
    g = torch.Generator().manual_seed(OPTIONS.index((similarity, heads, confidence, mutual)))
    n_heads, n_src, d, grid = 3, 23, 8, (4, 5)
    q = torch.randn(n_heads, n_src, d, generator=g)
    k = torch.randn(n_heads, grid[0] * grid[1], d, generator=g)
    scale = 1.7 / math.sqrt(d)
    # a threshold half-way between the two middle confidences, so it splits the tokens
    _, conf, _ = naive_match(q, k, grid, scale, similarity, heads, confidence, 0.0, 1, False)
    middle = conf.flatten().sort().values[conf.numel() // 2 - 1: conf.numel() // 2 + 1]
    threshold = float(middle.mean())
    ref_index, ref_conf, ref_kept = naive_match(q, k, grid, scale, similarity, heads, confidence, threshold, 1, mutual)
    assert ref_kept.any() and not (ref_conf >= threshold).all(), "the threshold should split the tokens"
    # float32 chunked matcher vs float64 reference: different computations. Indices and kept flags are
    # compared exactly because this case has no near-tie that rounding could flip (checked here).
    assert_unambiguous(q, k, grid, scale, similarity, heads, confidence, threshold, 1, mutual)
    for chunk_size in (1, 4, 7, 23, 256):  # 4 and 7 do not divide Ns = 23
        m = match_tokens(q, k, grid, scale=scale, similarity=similarity, heads=heads, confidence=confidence,
                         threshold=threshold, window_radius=1, mutual=mutual, chunk_size=chunk_size)
        assert m.index.shape == (n_heads if heads == "per_head" else 1, n_src)
        assert torch.equal(m.index, ref_index), chunk_size
        # float32 vs float64: a few float32 ulps of the confidences
        torch.testing.assert_close(m.confidence.double(), ref_conf, rtol=CONF_RTOL, atol=CONF_ATOL)
        assert torch.equal(m.kept, ref_kept), chunk_size


def test_several_targets_equal_one_at_a_time():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 12, 4, generator=g)
    k = torch.randn(2, 3, 9, 4, generator=g)
    opts = dict(scale=0.9, similarity="dual_softmax", confidence="window", window_radius=1, mutual=True, chunk_size=5)
    together = match_views(q, k, (3, 3), **opts)
    for t in range(3):
        alone = match_tokens(q, k[:, t], (3, 3), **opts)
        # one batched matmul over 3 targets vs one target: BLAS may round differently, so indices and
        # kept flags are compared exactly only because no near-tie exists (checked); confidences with
        # torch's float32 default tolerance (rtol 1.3e-6, atol 1e-5)
        assert_unambiguous(q, k[:, t], (3, 3), opts["scale"], opts["similarity"], "per_head", opts["confidence"],
                           0.05, opts["window_radius"], opts["mutual"])
        assert torch.equal(together.index[:, t], alone.index)
        assert torch.equal(together.kept[:, t], alone.kept)
        torch.testing.assert_close(together.confidence[:, t], alone.confidence)


@pytest.mark.parametrize("similarity,confidence", [("softmax", "global"), ("dual_softmax", "window")])
def test_known_permutation_recovered_exactly(similarity, confidence):
    g = torch.Generator().manual_seed(7)
    n_heads, grid, d = 2, (6, 7), 16
    n = grid[0] * grid[1]
    k_tgt = torch.nn.functional.normalize(torch.randn(n_heads, n, d, generator=g), dim=-1)
    perm = torch.randperm(n, generator=g)
    q_src = k_tgt[:, perm] * 50.0  # source token p looks exactly like target token perm[p]
    m = match_tokens(q_src, k_tgt, grid, scale=1.0, similarity=similarity, confidence=confidence, mutual=True,
                     chunk_size=5)
    # exact: integer indices; the true match scores 50 against at most 50 * (largest cosine of two other
    # random unit vectors, well below 1), a gap far beyond float32 rounding
    assert torch.equal(m.index, perm.expand(n_heads, n))
    assert m.kept.all()
    assert (m.confidence > 0.9).all()


def test_threshold_semantics_global():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 30, 4, generator=g), torch.randn(1, 16, 4, generator=g)
    base = match_tokens(q, k, (4, 4), scale=1.0, threshold=0.0)
    assert base.kept.all()
    for thr in base.confidence.flatten().tolist():
        m = match_tokens(q, k, (4, 4), scale=1.0, threshold=thr)
        # exact: same computation twice (the threshold only changes kept, so m.confidence is base.confidence)
        assert torch.equal(m.kept, base.confidence >= thr)  # kept iff confidence >= threshold (inclusive)
        assert torch.equal(m.index, base.index)  # the threshold never changes where a token points


def test_uniform_attention_confidences():
    # All-zero queries: every softmax is uniform, the first token wins the argmax.
    q, k = torch.zeros(1, 5, 4), torch.randn(1, 36, 4)
    m = match_tokens(q, k, (6, 6), scale=1.0, threshold=1 / 36 - 1e-6)
    torch.testing.assert_close(m.confidence, torch.full((1, 5), 1 / 36))
    assert m.kept.all()
    assert not match_tokens(q, k, (6, 6), scale=1.0, threshold=1 / 36 + 1e-6).kept.any()
    # Window at the corner token 0 with r = 1: only 4 of 9 window entries lie inside the image.
    w = match_tokens(q, k, (6, 6), scale=1.0, confidence="window", window_radius=1, threshold=0.25 - 1e-6)
    # exact: indices; zero queries give logits that are all exactly 0 (0 * x = 0), an exact tie that
    # argmax resolves to the first token
    assert torch.equal(w.index, torch.zeros(1, 5, dtype=torch.long))
    torch.testing.assert_close(w.confidence, torch.full((1, 5), 0.25))
    assert w.kept.all()
    assert not match_tokens(q, k, (6, 6), scale=1.0, confidence="window", window_radius=1,
                            threshold=0.26).kept.any()


def test_half_precision_inputs_match_float32():
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 10, 8, generator=g), torch.randn(2, 12, 8, generator=g)
    q16, k16 = q.to(torch.bfloat16), k.to(torch.bfloat16)
    a = match_tokens(q16, k16, (3, 4), scale=0.35)
    b = match_tokens(q16.float(), k16.float(), (3, 4), scale=0.35)
    assert a.confidence.dtype == torch.float32
    # exact: same computation twice (half inputs are upcast to float32 first; the upcast itself is exact)
    assert torch.equal(a.index, b.index) and torch.equal(a.confidence, b.confidence)


def test_bad_input_raises_named_errors():
    q, k = torch.randn(2, 4, 3), torch.randn(2, 6, 3)
    with pytest.raises(ShapeError, match="grid_tgt"):
        match_tokens(q, k, (2, 2), scale=1.0)
    with pytest.raises(ShapeError, match="k_tgt"):
        match_tokens(q, torch.randn(3, 6, 3), (2, 3), scale=1.0)
    with pytest.raises(ShapeError, match="q_src"):
        match_tokens(q[0], k, (2, 3), scale=1.0)
    with pytest.raises(CorrlabError, match="similarity"):
        match_tokens(q, k, (2, 3), scale=1.0, similarity="cosine")
    with pytest.raises(ValueRangeError, match="threshold"):
        match_tokens(q, k, (2, 3), scale=1.0, threshold=1.5)
    with pytest.raises(ValueRangeError, match="chunk_size"):
        match_tokens(q, k, (2, 3), scale=1.0, chunk_size=0)
    with pytest.raises(ValueRangeError, match="scale"):
        match_tokens(q, k, (2, 3), scale=float("nan"))


def test_history_max_keeps_last_n():
    hist = HistoryMax(n=2)
    a, b, c = torch.tensor([1.0, 5.0]), torch.tensor([3.0, 0.0]), torch.tensor([0.0, 1.0])
    # exact: an element-wise max selects stored values, no arithmetic
    assert torch.equal(hist.update("l", a, -a)[0], a)
    q, k = hist.update("l", b, -b)
    assert torch.equal(q, torch.tensor([3.0, 5.0])) and torch.equal(k, torch.tensor([-1.0, 0.0]))
    q, _ = hist.update("l", c, -c)  # a dropped out of the history
    assert torch.equal(q, torch.tensor([3.0, 1.0]))
    assert torch.equal(hist.update("other", c, c)[0], c)  # layers are independent
    with pytest.raises(ShapeError, match="q, k"):
        hist.update("l", torch.zeros(3), torch.zeros(3))


def test_never_materialises_the_full_similarity_map():
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestOutput(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            return out

    g = torch.Generator().manual_seed(11)
    n_heads, n_src, grid = 2, 24, (6, 6)
    q, k = torch.randn(n_heads, n_src, 4, generator=g), torch.randn(n_heads, 36, 4, generator=g)
    ref = match_tokens(q, k, grid, scale=0.5, similarity="dual_softmax", confidence="window", mutual=True)
    # other chunk sizes are other matmul shapes (rounding may differ): exact index / kept comparison is
    # valid because no near-tie exists (checked)
    assert_unambiguous(q, k, grid, 0.5, "dual_softmax", "per_head", "window", 0.05, 3, True)
    for chunk in (1, 5):
        with LargestOutput() as mode:
            m = match_tokens(q, k, grid, scale=0.5, similarity="dual_softmax", confidence="window", mutual=True,
                             chunk_size=chunk)
        assert torch.equal(m.index, ref.index) and torch.equal(m.kept, ref.kept)
        # the largest temporary is one block of heads x chunk x max(Nt, window of 7 x 7) values (or an input),
        # far below the heads x Ns x Nt of the full similarity map
        assert mode.largest <= max(n_heads * chunk * 49, q.numel(), k.numel()) < n_heads * n_src * 36
