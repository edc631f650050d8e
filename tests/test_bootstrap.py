"""corrlab.evaluation.bootstrap_mean_ci: the benchmarks' one CI of a mean over scenes."""
import numpy as np
import pytest

from corrlab.errors import CorrlabError
from corrlab.evaluation import MeanCI, bootstrap_mean_ci


def test_matches_a_direct_percentile_bootstrap():
    x = np.random.default_rng(3).normal(0.2, 1.0, size=40)
    ci = bootstrap_mean_ci(x, n_boot=500, seed=7)
    means = np.random.default_rng(7).choice(x, size=(500, 40), replace=True).mean(axis=1)
    assert ci.mean == pytest.approx(x.mean(), rel=1e-12)
    assert ci.lo == pytest.approx(np.percentile(means, 2.5), rel=1e-12)
    assert ci.hi == pytest.approx(np.percentile(means, 97.5), rel=1e-12)
    assert ci.n == 40 and ci.lo < ci.mean < ci.hi


def test_same_seed_same_interval_and_level_nests():
    x = np.linspace(-1.0, 2.0, 25) ** 2
    assert bootstrap_mean_ci(x, seed=1) == bootstrap_mean_ci(x, seed=1)
    wide, narrow = bootstrap_mean_ci(x, level=0.95), bootstrap_mean_ci(x, level=0.5)
    assert wide.lo < narrow.lo < narrow.hi < wide.hi


def test_non_finite_values_are_dropped_before_resampling():
    x = np.array([0.1, np.nan, 0.3, np.inf, -0.2, 0.5, -np.inf])
    assert bootstrap_mean_ci(x) == bootstrap_mean_ci(np.array([0.1, 0.3, -0.2, 0.5]))
    assert bootstrap_mean_ci(x).n == 4


def test_too_few_values_give_no_interval():
    one = bootstrap_mean_ci([np.nan, 2.5])
    assert one.mean == 2.5 and one.n == 1 and np.isnan(one.lo) and np.isnan(one.hi)
    none = bootstrap_mean_ci([np.nan])
    assert none.n == 0 and all(np.isnan(v) for v in none[:3])
    const = bootstrap_mean_ci(np.full(10, 0.25))
    assert const.lo == const.mean == const.hi == 0.25


def test_format_and_bad_input():
    assert MeanCI(0.1234, -0.01, 0.25, 3).format(2) == "+0.12 [-0.01, +0.25]"
    with pytest.raises(CorrlabError, match=r"x must be 1-D.*\(2, 2\)"):
        bootstrap_mean_ci(np.zeros((2, 2)))
    with pytest.raises(CorrlabError, match="n_boot.*0"):
        bootstrap_mean_ci([1.0, 2.0], n_boot=0)
    with pytest.raises(CorrlabError, match="level.*1.5"):
        bootstrap_mean_ci([1.0, 2.0], level=1.5)
