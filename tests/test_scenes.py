"""Procedural scenes: determinism, vocabulary, ray-caster geometry, camera layouts, the render command."""
from __future__ import annotations

import colorsys
import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from corrlab.errors import CorrlabError, ValueRangeError
from corrlab.geometry import Camera
from corrlab.scenes import (
    BACKGROUND_RGB,
    PALETTE,
    VOCABULARY,
    SceneSpec,
    orbit_camera,
    render,
    render_scene,
    sample_cameras,
    sample_scene,
)
from corrlab.sets import MultiViewSet


def _seed_with(**words) -> int:
    """The first seed whose scene has the given words (deterministic scan)."""
    for s in range(500):
        spec = sample_scene(s)
        if all(getattr(spec, k) == v for k, v in words.items()):
            return s
    raise AssertionError(f"no seed in 0..499 gives {words}")


def _pixels_and_depth(mv: MultiViewSet, v: int):
    ys, xs = torch.nonzero(mv.masks[v], as_tuple=True)
    return torch.stack([xs, ys], dim=1).to(torch.float64), mv.depth[v][ys, xs].to(torch.float64)



@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Small renders run faster on one thread on a loaded 2-core machine; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

# ------------------------------------------------------------------------------------ determinism
def test_same_seed_same_bytes_different_seed_differs():
    a = render_scene(11, views=2, size=24, layout="train")
    b = render_scene(11, views=2, size=24, layout="train")
    c = render_scene(12, views=2, size=24, layout="train")
    # exact: same computation twice (same seed)
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.depth, b.depth)
    assert all(torch.equal(x.R, y.R) and torch.equal(x.t, y.t) for x, y in zip(a.cameras, b.cameras))
    assert a.prompt == b.prompt and a.meta == b.meta
    assert not torch.equal(a.images, c.images)
    assert sample_scene(11) == sample_scene(11) and sample_scene(11) != sample_scene(12)


def test_prompts_are_vocabulary_words_consistent_with_the_spec():
    seen = {k: set() for k in VOCABULARY}
    for s in range(60):
        spec = sample_scene(s)
        colour, pattern, shape = spec.prompt.split()
        assert (colour, pattern, shape) == (spec.colour, spec.pattern, spec.shape)
        assert colour in VOCABULARY["colour"] and pattern in VOCABULARY["pattern"] and shape in VOCABULARY["shape"]
        assert spec.primary_rgb == PALETTE[colour]  # exact: the palette entry itself
        r, g, b = spec.secondary_rgb
        assert r == g == b, "the secondary colour must be neutral"  # exact: one level, copied three times
        assert max(abs(p) for p in spec.position) <= 0.12 and 0.6 <= spec.size <= 0.9
        seen["colour"].add(colour), seen["pattern"].add(pattern), seen["shape"].add(shape)
    assert all(seen[k] == set(VOCABULARY[k]) for k in VOCABULARY), "60 seeds should cover the vocabulary"


def test_spec_dict_round_trip_and_validation():
    spec = sample_scene(4)
    assert SceneSpec.from_dict(spec.to_dict()) == spec  # exact: a round trip, no arithmetic
    with pytest.raises(CorrlabError, match="shape"):
        replace(spec, shape="torus")
    with pytest.raises(CorrlabError, match="size"):
        replace(spec, size=-1.0)
    with pytest.raises(CorrlabError, match="rotation"):
        replace(spec, rotation=((2.0, 0, 0), (0, 1.0, 0), (0, 0, 1.0)))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_colour_word_is_the_hue_of_the_image(seed):
    # primary x shade, neutral secondary and grey background: mixing with greys keeps the hue
    mv = render_scene(seed, views=2, size=24)
    spec = sample_scene(seed)
    obj = mv.images.permute(0, 2, 3, 1)[mv.masks]  # (N, 3) object pixels
    hue = colorsys.rgb_to_hsv(*obj.double().mean(0).tolist())[0]
    want = colorsys.rgb_to_hsv(*spec.primary_rgb)[0]
    assert min(abs(hue - want), 1 - abs(hue - want)) < 0.01


# ------------------------------------------------------------------------------------ rendering
def test_shapes_dtypes_and_masks_equal_finite_depth():
    mv = render_scene(3, views=3, size=20)
    assert mv.images.shape == (3, 3, 20, 20) and mv.images.dtype == torch.float32
    assert float(mv.images.min()) >= 0 and float(mv.images.max()) <= 1
    assert mv.depth.shape == (3, 20, 20) and mv.depth.dtype == torch.float32
    assert mv.masks.dtype == torch.bool
    assert torch.equal(mv.masks, torch.isfinite(mv.depth))
    assert bool((mv.depth[mv.masks] > 0).all())
    assert 0.05 < float(mv.masks.float().mean()) < 0.7
    assert mv.num_views == 3 and mv.size == 20
    # pixels whose whole 3x3 neighbourhood misses the object show the plain background
    far = ~torch.nn.functional.max_pool2d(mv.masks.float()[:, None], 3, 1, 1)[:, 0].bool()
    bg = mv.images.permute(0, 2, 3, 1)[far]
    assert torch.allclose(bg, torch.tensor(BACKGROUND_RGB), atol=1e-6)


def _sphere_spec(radius: float = 0.7) -> SceneSpec:
    return replace(sample_scene(0), shape="sphere", proportions=(1.0, 1.0, 1.0), position=(0.0, 0.0, 0.0), size=radius)


@pytest.mark.parametrize("model", ["perspective", "orthographic"])
@pytest.mark.parametrize("size", [33, 32])
def test_sphere_depth_at_the_image_centre_is_analytic(model, size):
    spec = _sphere_spec(0.7)
    cam = orbit_camera(30.0, 15.0, 3.0, size, fov_deg=40.0, model=model)
    mv = render(spec, [cam], size)
    c = (size - 1) / 2
    for x, y in [(math.floor(c), math.floor(c)), (math.ceil(c), math.floor(c))]:
        if model == "orthographic":
            # the ray is parallel to the axis, offset by rho from the sphere's centre
            xy = torch.linalg.solve(cam.K[:2, :2], torch.tensor([x - c, y - c], dtype=torch.float64))
            want = 3.0 - math.sqrt(0.7**2 - float(xy.norm()) ** 2)
        else:
            d = cam.pixel_rays_camera(torch.tensor([[x, y]], dtype=torch.float64))[0]  # z = 1
            # |t d - (0, 0, 3)| = r  ->  t^2 |d|^2 - 6 t + 9 - r^2 = 0, nearer root
            a, b, cc = float(d @ d), -6.0, 9.0 - 0.7**2
            want = (-b - math.sqrt(b * b - 4 * a * cc)) / (2 * a)
        assert float(mv.depth[0, y, x]) == pytest.approx(want, abs=1e-5)
    assert float(mv.depth[0, 0, 0]) == math.inf and not bool(mv.masks[0, 0, 0])  # exact: the +inf background fill


@pytest.mark.parametrize(
    "shape,layout,model",
    [
        ("sphere", "even", "perspective"),
        ("box", "train", "perspective"),
        ("box", "random", "orthographic"),
        ("cylinder", "train", "perspective"),
        ("cylinder", "even", "orthographic"),
        ("cone", "train", "perspective"),
        ("cone", "random", "orthographic"),
    ],
)
def test_unprojected_pixels_lie_on_the_object_surface(shape, layout, model):
    seed = _seed_with(shape=shape)
    spec = sample_scene(seed)
    cams = sample_cameras(seed, views=2, size=32, layout=layout, model=model)
    mv = render(spec, cams, 32)
    for v, cam in enumerate(mv.cameras):
        pix, depth = _pixels_and_depth(mv, v)
        assert len(pix) > 40
        X = cam.unproject(pix, depth)
        assert float(spec.surface_residual(X).abs().max()) < 1e-4
        # and re-projection gives back the pixel with the same depth
        back, z = cam.project(X)
        assert torch.allclose(back, pix, atol=1e-6) and torch.allclose(z, depth, atol=1e-6)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**40), views=st.integers(1, 3), size=st.integers(8, 20))
def test_any_seed_views_and_size_render_consistently(seed, views, size):
    mv = render_scene(seed, views=views, size=size, layout="train")
    assert mv.images.shape == (views, 3, size, size)
    assert torch.equal(mv.masks, torch.isfinite(mv.depth))
    spec = sample_scene(seed)
    for v, cam in enumerate(mv.cameras):
        pix, depth = _pixels_and_depth(mv, v)
        if len(pix):
            assert float(spec.surface_residual(cam.unproject(pix, depth)).abs().max()) < 1e-4


# ------------------------------------------------------------------------------------ cameras
def _azimuth(cam: Camera, target) -> float:
    c = cam.center - torch.as_tensor(target, dtype=torch.float64)
    return math.degrees(math.atan2(float(c[0]), float(c[2]))) % 360


def _elevation(cam: Camera, target) -> float:
    c = cam.center - torch.as_tensor(target, dtype=torch.float64)
    return math.degrees(math.asin(-float(c[1]) / float(c.norm())))


def test_even_layout_spacing_radius_elevation_and_principal_point():
    cams = sample_cameras(5, views=4, size=64, layout="even", radius=3.0, elevation_deg=25.0, fov_deg=50.0)
    az = [_azimuth(c, (0, 0, 0)) for c in cams]
    for a, b in zip(az, az[1:] + az[:1]):
        assert (b - a) % 360 == pytest.approx(90.0, abs=1e-6)
    for c in cams:
        assert float(c.center.norm()) == pytest.approx(3.0)
        assert _elevation(c, (0, 0, 0)) == pytest.approx(25.0)
        assert float(c.K[0, 2]) == pytest.approx(31.5, abs=1e-12) and float(c.K[1, 2]) == pytest.approx(31.5, abs=1e-12)
        assert float(c.K[0, 0]) == pytest.approx(32 / math.tan(math.radians(25.0)))
        # the origin projects to the principal point
        pix, _ = c.project(torch.zeros(1, 3, dtype=torch.float64))
        assert torch.allclose(pix, torch.tensor([[31.5, 31.5]], dtype=torch.float64), atol=1e-9)
    other = sample_cameras(6, views=4, size=64, layout="even")
    assert _azimuth(other[0], (0, 0, 0)) != pytest.approx(_azimuth(cams[0], (0, 0, 0)))


def test_train_layout_ranges():
    rolls, offsets = [], []
    for seed in range(12):
        exact = sample_cameras(seed, views=4, size=64, layout="train", target_jitter=0.0, distance_range=(3.5, 4.5))
        az = [_azimuth(c, (0, 0, 0)) for c in exact]
        gaps = [(b - a) % 360 for a, b in zip(az, az[1:])]
        assert all(30.0 - 1e-6 <= g <= 120.0 + 1e-6 for g in gaps), gaps
        pairwise = [min((a - b) % 360, (b - a) % 360) for i, a in enumerate(az) for b in az[i + 1 :]]
        assert min(pairwise) >= 30.0 - 1e-6
        assert all(3.5 - 1e-9 <= float(c.center.norm()) <= 4.5 + 1e-9 for c in exact)
        assert all(-10.0 - 1e-6 <= _elevation(c, (0, 0, 0)) <= 45.0 + 1e-6 for c in exact)
        for c in exact:
            # roll: angle of the world's up direction in the image
            up = c.R @ torch.tensor([0.0, -1.0, 0.0], dtype=torch.float64)
            rolls.append(math.degrees(math.atan2(float(up[0]), -float(up[1]))))
        for c in sample_cameras(seed, views=4, size=64, layout="train"):
            # the default look-at jitter moves the object centre off the principal point, but keeps it in view
            pix, z = c.project(torch.zeros(1, 3, dtype=torch.float64))
            assert float(z) > 0 and bool(((pix > 8) & (pix < 56)).all())
            offsets.append(float((pix - 31.5).norm()))
    assert max(abs(r) for r in rolls) <= 25.0 + 1e-6 and max(abs(r) for r in rolls) > 10
    assert max(offsets) > 0.5


def test_random_and_orthographic_layouts():
    cams = sample_cameras(2, views=5, size=32, layout="random", model="orthographic")
    assert all(c.model == "orthographic" for c in cams)
    assert len({round(_azimuth(c, (0, 0, 0)), 6) for c in cams}) == 5
    mv = render(sample_scene(2), cams, 32)
    assert bool(mv.masks.any(dim=(1, 2)).all())


def test_near_layout_small_consecutive_gaps_on_the_fixed_orbit():
    """'near': the 'random' layout's orbit (radius, elevation) with consecutive azimuths a gap in
    ``near_gap_deg`` apart; bad gaps are refused."""
    firsts = []
    for seed in range(10):
        cams = sample_cameras(seed, views=5, size=64, layout="near", radius=3.5, elevation_deg=15.0,
                              near_gap_deg=(4.0, 12.0))
        az = [_azimuth(c, (0, 0, 0)) for c in cams]
        gaps = [(b - a) % 360 for a, b in zip(az, az[1:])]
        assert all(4.0 - 1e-6 <= g <= 12.0 + 1e-6 for g in gaps), gaps
        for c in cams:
            assert float(c.center.norm()) == pytest.approx(3.5)
            assert _elevation(c, (0, 0, 0)) == pytest.approx(15.0)
        firsts.append(round(az[0], 3))
    assert len(set(firsts)) == 10  # the first azimuth comes from the seed
    default = sample_cameras(1, views=4, size=32, layout="near")
    gaps = [(b - a) % 360 for a, b in zip(*[[_azimuth(c, (0, 0, 0)) for c in x] for x in (default[:-1], default[1:])])]
    assert all(5.0 - 1e-6 <= g <= 30.0 + 1e-6 for g in gaps), gaps
    assert render_scene(3, views=2, size=16, layout="near").images.shape == (2, 3, 16, 16)
    with pytest.raises(ValueRangeError, match="near_gap_deg"):
        sample_cameras(1, views=3, size=16, layout="near", near_gap_deg=(20.0, 10.0))


@pytest.mark.parametrize(
    "kwargs,word",
    [(dict(views=0), "views"), (dict(size=7), "size"), (dict(layout="spiral"), "layout"), (dict(views=2.5), "views")],
)
def test_bad_arguments_raise_corrlab_error(kwargs, word):
    with pytest.raises(CorrlabError, match=word):
        render_scene(1, **{"views": 2, "size": 16, **kwargs})
    with pytest.raises(CorrlabError, match=word):
        sample_cameras(1, **{"views": 2, "size": 16, **kwargs})


def test_bad_seed_and_render_arguments():
    with pytest.raises(CorrlabError, match="seed"):
        sample_scene(-1)
    with pytest.raises(CorrlabError, match="seed"):
        sample_scene("3")
    spec = sample_scene(1)
    with pytest.raises(CorrlabError, match="cameras"):
        render(spec, ["not a camera"], 16)
    with pytest.raises(CorrlabError, match="views"):
        render(spec, [], 16)
    with pytest.raises(CorrlabError, match="spec"):
        render("red striped box", sample_cameras(1, views=1, size=16), 16)


# ------------------------------------------------------------------------------------ CLI
def test_render_command_writes_a_loadable_set(tmp_path, capsys):
    from corrlab.cli import main
    from corrlab.sets import load_set

    out = tmp_path / "set"
    assert main(["render", "--seed", "7", "--views", "2", "--size", "16", "--layout", "train", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    mv = load_set(out)
    assert mv.prompt == sample_scene(7).prompt and mv.prompt in printed and str(out) in printed
    assert mv.num_views == 2 and mv.size == 16 and mv.seed == 7
    direct = render_scene(7, views=2, size=16, layout="train")
    assert (mv.images - direct.images).abs().max() <= 0.5 / 255 + 1e-6
    assert main(["render", "--seed", "7", "--views", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "views" in capsys.readouterr().err
