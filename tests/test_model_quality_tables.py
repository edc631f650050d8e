"""benchmarks/model_quality.py: SIFT precision by the pair's true view angle; epipolar_bias_scale.py."""
import pandas as pd
import pytest
from model_helpers import load_benchmark


@pytest.fixture(scope="module")
def model_quality():
    return load_benchmark("model_quality")


def _row(method, pair, angle, threshold, correct, matches, set_=0):
    return {"method": method, "set": set_, "src": pair[0], "tgt": pair[1], "view_angle": angle,
            "threshold": threshold, "n_correct": correct, "n_matches": matches}


def test_pairs_are_bucketed_by_their_true_view_angle(model_quality):
    rows = [
        _row("rendered", (0, 1), 10.0, 2.0, 8, 10), _row("rendered", (0, 2), 100.0, 2.0, 1, 10),
        _row("rendered", (0, 1), 10.0, 1.0, 5, 10),  # another threshold: left out
        # under another scene's cameras the same pairs have other angles; they stay in their true bucket
        _row("rendered, shuffled cameras", (0, 1), 150.0, 2.0, 2, 10),
        _row("rendered, shuffled cameras", (0, 2), 5.0, 2.0, 3, 10),
        _row("generated", (0, 1), 10.0, 2.0, 3, 4), _row("generated", (0, 2), 100.0, 2.0, 0, 6),
        _row("generated", (0, 1), 12.0, 2.0, 1, 4, set_=1),
        _row("rendered", (0, 1), 12.0, 2.0, 2, 2, set_=1),
    ]
    table = model_quality.precision_by_view_angle(pd.DataFrame(rows), threshold=2.0, edges=(0, 30, 180))
    low, high = pd.Interval(0, 30), pd.Interval(30, 180)
    approx = lambda x: pytest.approx(x, abs=5e-4)  # noqa: E731 (the table rounds precision to 3 decimals)
    assert table.loc[low, ("precision", "rendered")] == approx(10 / 12)
    assert table.loc[low, ("precision", "rendered, shuffled cameras")] == approx(0.2)
    assert table.loc[high, ("precision", "rendered, shuffled cameras")] == approx(0.3)
    assert table.loc[low, ("precision", "generated")] == approx(0.5)  # (3 + 1) / (4 + 4), both sets pooled
    assert table.loc[high, ("precision", "generated")] == 0.0
    assert table.loc[low, ("n_matches", "generated")] == 8


def test_psnr_by_view_angle_pairs_generated_and_copy_on_the_same_views(model_quality):
    rows = []
    for scene, view, angle, gen, copy in ((1, 1, 10.0, 20.0, 22.0), (1, 2, 100.0, 18.0, 12.0), (2, 1, 25.0, 21.0, 20.0)):
        for method, value in (("generated", gen), ("copy reference", copy), ("mean image", 15.0)):
            rows.append({"scene": scene, "view": view, "view_angle": angle, "method": method, "psnr": value})
    table = model_quality.psnr_by_view_angle(pd.DataFrame(rows), edges=(0, 30, 180))
    low, high = pd.Interval(0, 30), pd.Interval(30, 180)
    assert table.loc[low, "generated - copy reference"] == pytest.approx(-0.5)  # (-2 + 1) / 2
    assert table.loc[high, "generated - copy reference"] == pytest.approx(6.0)
    assert table.loc[low, "n"] == 2 and table.loc[high, "n"] == 1
    assert table.loc[low, "generated"] == pytest.approx(20.5)


def test_epipolar_bias_scale_benchmark_shows_the_baseline_dependence(capsys):
    """benchmarks/epipolar_bias_scale.py on the shipped weights (a few camera sets): the bias's penalty for leaving
    the epipolar line grows with the view angle in the 'random' layout up to 60-120 degrees, and dividing by the
    baseline lifts the close-view penalty above the wide one."""
    assert load_benchmark("epipolar_bias_scale").main(["--n-sets", "12", "--layouts", "train", "random"]) == 0
    kv = dict(x.split("=") for x in capsys.readouterr().out.strip().splitlines()[-1].split())
    c = {k: float(v) for k, v in kv.items()}
    assert c["lambda_max"] > 10
    assert c["contrast_random_0-15"] < 0.25 * c["contrast_random_60-120"]
    assert c["normalised_random_0-15"] > c["normalised_random_60-120"]
