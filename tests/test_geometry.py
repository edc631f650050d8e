"""Epipolar geometry and ground-truth correspondences: tests that fail if a convention is off.

The analytic scenes (tilted plane, sphere) are ray-cast here with small numpy code, independent of
corrlab's camera helpers, so a convention error in corrlab cannot cancel out.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from corrlab.errors import CorrlabError, ShapeError, ValueRangeError
from corrlab.geometry import (
    Camera,
    epipolar_distance,
    epipolar_lines,
    fundamental_matrix,
    ground_truth_correspondences,
    ground_truth_match_for,
    look_at,
    relative_view_angle,
    sample_depth,
)

H = W = 48


def _K(f: float, cx: float = (W - 1) / 2, cy: float = (H - 1) / 2) -> np.ndarray:
    return np.array([[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]])


def _skew(v) -> np.ndarray:
    x, y, z = v
    return np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])


def _same_up_to_scale(A, B) -> float:
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    A = A / np.linalg.norm(A)
    B = B / np.linalg.norm(B)
    return min(np.abs(A - B).max(), np.abs(A + B).max())


# ----------------------------------------------------------------------------- analytic scenes
def _rays(cam: Camera, pix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World origins and directions of pixel rays, scaled so the ray parameter equals z_cam."""
    K, R, t = cam.K.numpy(), cam.R.numpy(), cam.t.numpy()
    n = pix.shape[0]
    if cam.model == "perspective":
        d_cam = np.stack([(pix[:, 0] - K[0, 2]) / K[0, 0], (pix[:, 1] - K[1, 2]) / K[1, 1], np.ones(n)], axis=1)
        origin = np.broadcast_to(-R.T @ t, (n, 3))
        return origin, d_cam @ R
    xy = np.stack([(pix[:, 0] - K[0, 2]) / K[0, 0], (pix[:, 1] - K[1, 2]) / K[1, 1]], axis=1)
    o_cam = np.concatenate([xy, np.zeros((n, 1))], axis=1)
    return (o_cam - t) @ R, np.broadcast_to(R[2], (n, 3))


def _hit_plane(o, d, normal, offset):
    denom = d @ normal
    with np.errstate(divide="ignore", invalid="ignore"):
        s = (offset - o @ normal) / denom
    return np.where(np.abs(denom) > 1e-12, s, np.inf)


def _hit_sphere(o, d, centre, radius):
    oc = o - centre
    a = np.einsum("ij,ij->i", d, d)
    b = 2 * np.einsum("ij,ij->i", oc, d)
    c = np.einsum("ij,ij->i", oc, oc) - radius**2
    disc = b * b - 4 * a * c
    with np.errstate(invalid="ignore"):
        s = (-b - np.sqrt(disc)) / (2 * a)
    return np.where(disc >= 0, s, np.inf)


class Scene:
    """A tilted plane behind a sphere: first hit along a ray, as the ray parameter (= z_cam)."""

    def __init__(self, sphere=True, plane=True):
        self.sphere = sphere
        self.plane = plane
        self.centre = np.array([0.0, 0.0, 0.0])
        self.radius = 0.8
        self.normal = np.array([0.2, -0.3, -1.0]) / np.linalg.norm([0.2, -0.3, -1.0])
        self.offset = -1.5  # plane n.X = offset, about 1.5 units behind the origin along +z

    def first_hit(self, o, d):
        s = np.full(o.shape[0], np.inf)
        if self.plane:
            sp = _hit_plane(o, d, self.normal, self.offset)
            s = np.where(sp > 1e-9, np.minimum(s, sp), s)
        if self.sphere:
            ss = _hit_sphere(o, d, self.centre, self.radius)
            s = np.where(ss > 1e-9, np.minimum(s, ss), s)
        return s

    def depth(self, cam: Camera, height=H, width=W) -> np.ndarray:
        yy, xx = np.mgrid[0:height, 0:width]
        pix = np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.float64)
        o, d = _rays(cam, pix)
        return self.first_hit(o, d).reshape(height, width)


def _persp(eye, target=(0.0, 0.0, 0.0), f=40.0, roll=0.0) -> Camera:
    R, t = look_at(eye, target, roll_deg=roll)
    return Camera(K=_K(f), R=R, t=t)


def _ortho(eye, target=(0.0, 0.0, 0.0), scale=14.0, roll=0.0) -> Camera:
    R, t = look_at(eye, target, roll_deg=roll)
    return Camera(K=_K(scale), R=R, t=t, model="orthographic")


def _project_np(cam: Camera, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    K, R, t = cam.K.numpy(), cam.R.numpy(), cam.t.numpy()
    Xc = X @ R.T + t
    if cam.model == "perspective":
        return (Xc[:, :2] / Xc[:, 2:3]) * np.diag(K)[:2] + K[:2, 2], Xc[:, 2]
    return Xc[:, :2] * np.diag(K)[:2] + K[:2, 2], Xc[:, 2]


PAIRS = {
    "perspective": (_persp((0.3, -1.0, -4.0), roll=5.0), _persp((2.5, -1.8, -3.2), (0.1, 0.2, 0.0), f=44.0, roll=-12.0)),
    "orthographic": (_ortho((0.3, -1.0, -4.0), roll=5.0), _ortho((2.5, -1.8, -3.2), (0.1, 0.2, 0.0), roll=-12.0)),
    "mixed": (_persp((0.3, -1.0, -4.0), roll=5.0), _ortho((2.5, -1.8, -3.2), (0.1, 0.2, 0.0), roll=-12.0)),
}


# ----------------------------------------------------------------------------- cameras
def test_look_at_up_appears_up_and_right_appears_right():
    cam = _persp((0.0, 0.0, -5.0))
    pix, z = cam.project(torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64))
    centre = (W - 1) / 2
    assert pix[0, 1] < centre - 1  # world -y (the default up) is above the image centre
    assert pix[1, 0] > centre + 1  # world +x is to the right for this viewpoint
    assert torch.allclose(z, torch.tensor([5.0, 5.0], dtype=torch.float64))


@settings(max_examples=40, deadline=None)
@given(
    eye=st.tuples(*[st.floats(-6, 6)] * 3),
    target=st.tuples(*[st.floats(-0.5, 0.5)] * 3),
    roll=st.floats(-180, 180),
    f=st.floats(10, 500),
    orthographic=st.booleans(),
    cam_pts=st.lists(st.tuples(st.floats(-3, 3), st.floats(-3, 3), st.floats(0.2, 20)), min_size=1, max_size=12),
)
def test_project_then_unproject_roundtrip(eye, target, roll, f, orthographic, cam_pts):
    # look_at needs a viewing direction not parallel to the default up (world y)
    assume(math.hypot(eye[0] - target[0], eye[2] - target[2]) > 0.2)
    R, t = look_at(eye, target, roll_deg=roll)
    cam = Camera(K=_K(f, 20.0, 30.0), R=R, t=t, model="orthographic" if orthographic else "perspective")
    Xc = torch.tensor(cam_pts, dtype=torch.float64)
    X = (Xc - cam.t) @ cam.R  # world points in front of the camera
    pix, depth = cam.project(X)
    assert torch.allclose(depth, Xc[:, 2], atol=1e-9)
    back = cam.unproject(pix, depth)
    assert torch.allclose(back, X, atol=1e-8 * (1 + X.abs().max()))


def test_relative_view_angle():
    a = _persp((0.0, 0.0, -4.0))
    b = _persp((4.0, 0.0, 0.0))
    c = _persp((0.0, 0.0, 4.0))
    assert relative_view_angle(a, b) == pytest.approx(90.0, abs=1e-9)
    assert relative_view_angle(a, c) == pytest.approx(180.0, abs=1e-6)
    assert relative_view_angle(a, a) == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- fundamental matrix
def _translation_pair(f1=100.0, f2=100.0, baseline=0.5):
    """Camera 1 at the origin, camera 2 moved by +baseline along world x, both R = I."""
    c1 = Camera(K=_K(f1, 32.0, 24.0), R=np.eye(3), t=np.zeros(3))
    c2 = Camera(K=_K(f2, 32.0, 24.0), R=np.eye(3), t=np.array([-baseline, 0.0, 0.0]))
    return c1, c2


def test_fundamental_pure_x_translation_matches_analytic_and_lines_are_rows():
    c1, c2 = _translation_pair()
    F = fundamental_matrix(c1, c2)
    Kinv = np.linalg.inv(c1.K.numpy())
    F_expected = Kinv.T @ _skew([-0.5, 0.0, 0.0]) @ Kinv
    assert _same_up_to_scale(F, F_expected) < 1e-9
    assert float(F.norm()) == pytest.approx(1.0)
    lines = epipolar_lines(np.array([[5.0, 7.0], [40.0, 30.5]]), F)
    assert torch.allclose(lines[:, 0], torch.zeros(2, dtype=torch.float64), atol=1e-12)  # horizontal: a = 0
    # line (0, b, c) with b^2 = 1 is y = -c/b: the same row
    assert torch.allclose(-lines[:, 2] / lines[:, 1], torch.tensor([7.0, 30.5], dtype=torch.float64))


@pytest.mark.parametrize("kind", list(PAIRS))
def test_fundamental_satisfies_x2_F_x1_for_projected_points(kind):
    c1, c2 = PAIRS[kind]
    F = fundamental_matrix(c1, c2).numpy()
    X = np.random.default_rng(0).uniform(-1, 1, size=(50, 3))
    p1, _ = _project_np(c1, X)
    p2, _ = _project_np(c2, X)
    h1 = np.concatenate([p1, np.ones((50, 1))], axis=1)
    h2 = np.concatenate([p2, np.ones((50, 1))], axis=1)
    residual = np.einsum("ni,ij,nj->n", h2, F, h1)
    assert np.abs(residual).max() < 1e-10
    # the transposed convention would be wrong for these non-symmetric pairs
    assert np.abs(np.einsum("ni,ij,nj->n", h1, F, h2)).max() > 1e-4


def test_fundamental_general_perspective_pair_matches_essential_formula():
    c1, c2 = PAIRS["perspective"]
    R1, t1, R2, t2 = (x.numpy() for x in (c1.R, c1.t, c2.R, c2.t))
    R_rel = R2 @ R1.T
    t_rel = t2 - R_rel @ t1
    F_expected = np.linalg.inv(c2.K.numpy()).T @ _skew(t_rel) @ R_rel @ np.linalg.inv(c1.K.numpy())
    assert _same_up_to_scale(fundamental_matrix(c1, c2), F_expected) < 1e-9


def test_orthographic_fundamental_is_affine():
    F = fundamental_matrix(*PAIRS["orthographic"])
    assert torch.allclose(F[:2, :2], torch.zeros(2, 2, dtype=torch.float64), atol=1e-12)
    assert torch.linalg.matrix_rank(F) == 2


def test_degenerate_pairs_raise():
    a = _persp((0.0, 0.0, -4.0))
    b = _persp((0.0, 0.0, -4.0), target=(1.0, 0.0, 0.0))  # same centre, rotated
    with pytest.raises(ValueRangeError, match="cam1, cam2"):
        fundamental_matrix(a, b)
    o1 = _ortho((0.0, 0.0, -4.0))
    o2 = _ortho((1.0, 0.0, -4.0), target=(1.0, 0.0, 0.0))  # parallel viewing directions
    with pytest.raises(ValueRangeError, match="cam1, cam2"):
        fundamental_matrix(o1, o2)


# ----------------------------------------------------------------------------- distances
def test_distance_kinds_hand_computed_identity_like():
    c1, c2 = _translation_pair()
    F = fundamental_matrix(c1, c2)
    p1 = torch.tensor([[10.0, 20.0], [50.0, 3.0]], dtype=torch.float64)
    p2 = p1 + torch.tensor([[-4.0, 3.0], [7.0, -3.0]], dtype=torch.float64)  # 3 px off the row, slid along it
    assert torch.allclose(epipolar_distance(p1, p2, F, "line"), torch.full((2,), 3.0, dtype=torch.float64))
    assert torch.allclose(epipolar_distance(p1, p2, F, "symmetric"), torch.full((2,), math.sqrt(18), dtype=torch.float64))
    assert torch.allclose(epipolar_distance(p1, p2, F, "sampson"), torch.full((2,), 3 / math.sqrt(2), dtype=torch.float64))
    assert float(epipolar_distance(p1, p2, F)[0]) == pytest.approx(math.sqrt(18))  # default is symmetric (rel 1e-6)
    on_line = p1 + torch.tensor([[9.0, 0.0], [-2.0, 0.0]], dtype=torch.float64)
    for kind in ("line", "symmetric", "sampson"):
        assert float(epipolar_distance(p1, on_line, F, kind).abs().max()) < 1e-9


def test_distance_kinds_hand_computed_different_focal_lengths():
    # f2 = 2 f1: a 3 px offset in image 2 is a 1.5 px offset in image 1 (derived by hand):
    # line = 3, symmetric = sqrt(3^2 + 1.5^2), sampson = d1 d2 / sqrt(d1^2 + d2^2).
    c1, c2 = _translation_pair(f1=100.0, f2=200.0)
    F = fundamental_matrix(c1, c2)
    p1 = np.array([[30.0, 40.0]])
    row2 = 24.0 + (40.0 - 24.0) * 2.0
    p2 = np.array([[5.0, row2 + 3.0]])
    assert float(epipolar_distance(p1, p2, F, "line")[0]) == pytest.approx(3.0)
    assert float(epipolar_distance(p1, p2, F, "symmetric")[0]) == pytest.approx(math.hypot(3.0, 1.5))
    assert float(epipolar_distance(p1, p2, F, "sampson")[0]) == pytest.approx(4.5 / math.hypot(3.0, 1.5))
    # swapping the images swaps the roles: the line distance in image 1 is 1.5
    assert float(epipolar_distance(p2, p1, F.T, "line")[0]) == pytest.approx(1.5)


def test_epipolar_lines_are_unit_and_give_line_distance():
    c1, c2 = PAIRS["perspective"]
    F = fundamental_matrix(c1, c2)
    rng = np.random.default_rng(1)
    p1 = rng.uniform(0, W, size=(20, 2))
    p2 = rng.uniform(0, W, size=(20, 2))
    lines = epipolar_lines(p1, F)
    assert torch.allclose(lines[:, :2].norm(dim=1), torch.ones(20, dtype=torch.float64))
    d = (lines[:, :2] * torch.as_tensor(p2)).sum(1) + lines[:, 2]
    assert torch.allclose(d.abs(), epipolar_distance(p1, p2, F, "line"))


def test_distance_accepts_torch_and_empty():
    c1, c2 = _translation_pair()
    F = fundamental_matrix(c1, c2)
    out = epipolar_distance(torch.zeros(0, 2), torch.zeros(0, 2), F)
    assert out.shape == (0,) and out.dtype == torch.float64


# ----------------------------------------------------------------------------- ground truth
@pytest.mark.parametrize("kind", list(PAIRS))
def test_ground_truth_correspondences_are_epipolar_and_on_the_surface(kind):
    c1, c2 = PAIRS[kind]
    scene = Scene()
    d1, d2 = scene.depth(c1), scene.depth(c2)
    pts1, pts2 = ground_truth_correspondences(d1, c1, d2, c2, stride=2)
    assert pts1.dtype == torch.float64 and pts1.shape == pts2.shape
    assert pts1.shape[0] > 100
    F = fundamental_matrix(c1, c2)
    for dist_kind in ("line", "symmetric", "sampson"):
        assert float(epipolar_distance(pts1, pts2, F, dist_kind).max()) < 1e-3
    # independent check: the analytic surface point of each source pixel projects onto pts2 ...
    p1 = pts1.numpy()
    o, d = _rays(c1, p1)
    X = o + scene.first_hit(o, d)[:, None] * d
    proj, z2 = _project_np(c2, X)
    assert np.abs(proj - pts2.numpy()).max() < 1e-6
    # ... and is the first surface seen from camera 2 there (visible, not occluded)
    o2, dir2 = _rays(c2, pts2.numpy())
    assert np.abs(scene.first_hit(o2, dir2) - z2).max() < 1e-6 * np.abs(z2).max()


@pytest.mark.parametrize("kind", ["perspective", "orthographic"])
def test_occluded_points_are_removed_and_visible_points_kept(kind):
    c1, c2 = PAIRS[kind]
    scene = Scene()
    d1, d2 = scene.depth(c1), scene.depth(c2)
    yy, xx = np.mgrid[0:H, 0:W]
    pix = np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.float64)
    finite = np.isfinite(d1.ravel())
    target, valid = ground_truth_match_for(d1, c1, d2, c2, pix[finite])
    # analytic visibility of each source surface point in camera 2
    o, d = _rays(c1, pix[finite])
    X = o + d1.ravel()[finite][:, None] * d
    proj, z2 = _project_np(c2, X)
    inside = (proj >= -0.5).all(1) & (proj[:, 0] <= W - 0.5) & (proj[:, 1] <= H - 0.5)
    o2, dir2 = _rays(c2, proj)
    visible = inside & (np.abs(scene.first_hit(o2, dir2) - z2) < 1e-6 * np.abs(z2).max())
    occluded = inside & ~visible
    assert occluded.sum() > 20  # the sphere hides part of the plane
    assert not valid.numpy()[occluded].any()
    assert valid.numpy()[visible].mean() > 0.9  # only depth-edge pixels may be dropped conservatively
    assert torch.isnan(target[~valid]).all()
    assert np.abs(target[valid].numpy() - proj[valid.numpy()]).max() < 1e-6


def test_hand_built_occluder_and_outside_points():
    # camera 1 sees a fronto-parallel plane at z = 5; camera 2 is the same camera shifted along +x
    c1, c2 = _translation_pair(f1=40.0, f2=40.0, baseline=1.0)
    d1 = np.full((H, W), 5.0)
    d2 = np.full((H, W), 5.0)
    d2[10:20, 10:20] = 2.0  # an occluder in front of the plane, only in view 2
    pix = np.array([[25.0, 15.0], [40.0, 30.0], [2.0, 30.0], [20.0, 40.0]])
    target, valid = ground_truth_match_for(d1, c1, d2, c2, pix, depth_sampling="nearest")
    # disparity = f * b / z = 8 px to the left in view 2
    assert valid.tolist() == [False, True, False, True]  # behind occluder, visible, outside (x = -6), visible
    assert torch.allclose(target[1], torch.tensor([32.0, 30.0], dtype=torch.float64))
    assert torch.allclose(target[3], torch.tensor([12.0, 40.0], dtype=torch.float64))
    pts1, pts2 = ground_truth_correspondences(d1, c1, d2, c2)
    assert torch.allclose(pts2, pts1 - torch.tensor([8.0, 0.0], dtype=torch.float64))
    assert pts1.shape[0] == H * (W - 8) - 100  # 8 columns leave image 2; the 10 x 10 occluder hides 100
    # the background (+inf) of image i yields no correspondences
    d1[:, :24] = np.inf
    pts1_bg, _ = ground_truth_correspondences(d1, c1, d2, c2, stride=3)
    assert pts1_bg.shape[0] > 0 and bool((pts1_bg[:, 0] >= 24).all())
    assert bool((pts1_bg % 3 == 0).all())  # exact: integer pixel coordinates of the stride-3 grid


def test_sample_depth_bilinear_and_background():
    depth = np.array([[1.0, 2.0, np.inf], [3.0, 4.0, np.inf]])
    out = sample_depth(depth, np.array([[0.5, 0.5], [0.25, 0.0], [1.4, 0.0], [1.6, 0.0], [5.0, 0.0], [-0.5, -0.5]]))
    assert out[0] == pytest.approx(2.5)
    assert out[1] == pytest.approx(1.25)
    assert out[2] == pytest.approx(2.0)  # a neighbour is background: nearest pixel
    assert math.isinf(out[3])  # nearest pixel is background
    assert math.isinf(out[4])  # outside the image
    assert out[5] == pytest.approx(1.0)  # the image border belongs to the image
    assert sample_depth(depth, np.array([[0.6, 0.6]]), mode="nearest")[0] == 4.0  # exact: a stored value, looked up


# ----------------------------------------------------------------------------- bad input
def test_bad_cameras_raise_named_errors():
    with pytest.raises(CorrlabError, match="K"):
        Camera(K=np.zeros((3, 3)), R=np.eye(3), t=np.zeros(3))
    with pytest.raises(CorrlabError, match="R"):
        Camera(K=_K(10.0), R=np.diag([1.0, 1.0, -1.0]), t=np.zeros(3))
    with pytest.raises(CorrlabError, match="R"):
        Camera(K=_K(10.0), R=2 * np.eye(3), t=np.zeros(3))
    with pytest.raises(ShapeError, match="t"):
        Camera(K=_K(10.0), R=np.eye(3), t=np.zeros(4))
    with pytest.raises(CorrlabError, match="cam1"):
        fundamental_matrix("not a camera", _persp((0.0, 0.0, -3.0)))


def test_bad_points_raise_named_errors():
    c1, c2 = _translation_pair()
    F = fundamental_matrix(c1, c2)
    good = np.zeros((4, 2))
    with pytest.raises(ShapeError, match="pts1"):
        epipolar_distance(np.zeros((4, 3)), good, F)
    with pytest.raises(ShapeError, match="pts2"):
        epipolar_distance(good, np.zeros((5, 2)), F)
    with pytest.raises(ValueRangeError, match="pts2"):
        epipolar_distance(good, np.full((4, 2), np.nan), F)
    with pytest.raises(ShapeError, match="F"):
        epipolar_distance(good, good, np.eye(4))
    with pytest.raises(ValueRangeError, match="F"):
        epipolar_distance(good, good, np.full((3, 3), np.inf))
    with pytest.raises(CorrlabError, match="kind"):
        epipolar_distance(good, good, F, kind="squared")
    with pytest.raises(ShapeError, match="pts1"):
        epipolar_lines(np.zeros(2), F)


def test_bad_depth_raises_named_errors():
    c1, c2 = _translation_pair()
    d = np.full((H, W), 5.0)
    with pytest.raises(ShapeError, match="depth_j"):
        ground_truth_correspondences(d, c1, d[0], c2)
    bad = d.copy()
    bad[3, 3] = np.nan
    with pytest.raises(ValueRangeError, match="depth_i"):
        ground_truth_correspondences(bad, c1, d, c2)
    with pytest.raises(ValueRangeError, match="depth_j"):
        ground_truth_correspondences(d, c1, -d, c2)
    with pytest.raises(ShapeError, match="pixels"):
        ground_truth_match_for(d, c1, d, c2, np.zeros((3, 3)))
    with pytest.raises(ValueRangeError, match="stride"):
        ground_truth_correspondences(d, c1, d, c2, stride=0)
    with pytest.raises(ValueRangeError, match="depth_tol"):
        ground_truth_correspondences(d, c1, d, c2, depth_tol=-1.0)
    with pytest.raises(CorrlabError, match="depth_sampling"):
        ground_truth_match_for(d, c1, d, c2, np.zeros((1, 2)), depth_sampling="cubic")
