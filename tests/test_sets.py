"""MultiViewSet validation and the on-disk set format: round trip, atomic replace, corrupt input."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from corrlab.errors import CorrlabError, FormatError, ShapeError, ValueRangeError
from corrlab.scenes import render_scene
from corrlab.sets import MultiViewSet, is_set_dir, load_set, save_set


@pytest.fixture(scope="module")
def rendered() -> MultiViewSet:
    return render_scene(3, views=3, size=20, layout="train")


def _cameras_equal(a, b) -> bool:
    """Exact: cameras.json stores floats losslessly (repr), so a round trip involves no arithmetic."""
    return all(
        torch.equal(x.K, y.K) and torch.equal(x.R, y.R) and torch.equal(x.t, y.t) and x.model == y.model
        for x, y in zip(a, b)
    ) and len(a) == len(b)



@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Small renders run faster on one thread on a loaded 2-core machine; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

# ------------------------------------------------------------------------------------ round trip
def test_round_trip_images_cameras_depth_masks_meta(tmp_path, rendered):
    out = save_set(rendered, tmp_path / "s")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["cameras.json"] + [f"{k}_{i:02d}.{e}" for i in range(3) for k, e in (("view", "png"), ("depth", "npy"), ("mask", "png"))]
    )
    back = load_set(out)
    assert back.images.dtype == torch.float32 and back.images.shape == rendered.images.shape
    assert float((back.images - rendered.images).abs().max()) <= 0.5 / 255 + 1e-6
    assert _cameras_equal(back.cameras, rendered.cameras)
    assert torch.equal(back.depth, rendered.depth)  # exact: lossless .npy round trip, +inf background included
    assert torch.equal(back.masks, rendered.masks)
    assert (back.prompt, back.seed, back.meta) == (rendered.prompt, rendered.seed, rendered.meta)
    header = json.loads((out / "cameras.json").read_text())
    assert (header["width"], header["height"], len(header["views"])) == (20, 20, 3)
    assert set(header["views"][0]) == {"K", "R", "t", "model"}


def test_round_trip_without_depth_and_masks_and_orthographic(tmp_path):
    mv = render_scene(5, views=2, size=12, model="orthographic")
    gen = replace(mv, depth=None, masks=None, seed=-1, meta={"source": "generated"})
    back = load_set(save_set(gen, tmp_path / "g"))
    assert back.depth is None and back.masks is None and back.seed == -1
    assert [c.model for c in back.cameras] == ["orthographic"] * 2
    assert _cameras_equal(back.cameras, gen.cameras)
    assert not list(tmp_path.glob("g/depth_*")) and not list(tmp_path.glob("g/mask_*"))


def test_save_replaces_an_existing_set_and_leaves_no_temporaries(tmp_path, rendered):
    out = tmp_path / "s"
    save_set(rendered, out)
    other = render_scene(4, views=2, size=16)
    save_set(other, out)
    back = load_set(out)
    assert back.num_views == 2 and back.seed == 4 and not (out / "view_02.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_save_refuses_to_replace_a_foreign_directory(tmp_path, rendered):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"not mine")
    with pytest.raises(FormatError, match="not a corrlab set"):
        save_set(rendered, foreign)
    assert (foreign / "holiday.jpg").read_bytes() == b"not mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]
    empty = tmp_path / "empty"
    empty.mkdir()
    save_set(rendered, empty)
    assert is_set_dir(empty) and not is_set_dir(foreign)


# ------------------------------------------------------------------------------------ corrupt input
@pytest.fixture()
def saved(tmp_path, rendered):
    return save_set(rendered, tmp_path / "s")


def test_truncated_cameras_json_raises_format_error(saved):
    text = (saved / "cameras.json").read_text()
    (saved / "cameras.json").write_text(text[: len(text) // 2])
    with pytest.raises(FormatError, match="cameras.json"):
        load_set(saved)


def test_missing_view_raises_format_error(saved):
    (saved / "view_01.png").unlink()
    with pytest.raises(FormatError, match="view_01.png"):
        load_set(saved)


def test_truncated_png_and_npy_raise_format_error(saved, tmp_path):
    data = (saved / "view_02.png").read_bytes()
    (saved / "view_02.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="view_02.png"):
        load_set(saved)
    (saved / "view_02.png").write_bytes(data)
    npy = (saved / "depth_00.npy").read_bytes()
    (saved / "depth_00.npy").write_bytes(npy[:100])
    with pytest.raises(FormatError, match="depth_00.npy"):
        load_set(saved)


def test_missing_foreign_and_inconsistent_directories_raise_format_error(tmp_path, saved):
    with pytest.raises(FormatError, match="missing"):
        load_set(tmp_path / "nowhere")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "readme.txt").write_text("hello")
    with pytest.raises(FormatError, match="cameras.json is missing"):
        load_set(foreign)
    (foreign / "cameras.json").write_text(json.dumps({"format": "something-else", "views": []}))
    with pytest.raises(FormatError, match="format"):
        load_set(foreign)
    header = json.loads((saved / "cameras.json").read_text())
    header["views"][1]["R"] = [[2, 0, 0], [0, 1, 0], [0, 0, 1]]
    (saved / "cameras.json").write_text(json.dumps(header))
    with pytest.raises(FormatError, match=r"views\[1\]"):
        load_set(saved)
    del header["views"][1]["R"]
    (saved / "cameras.json").write_text(json.dumps(header))
    with pytest.raises(FormatError, match=r"views\[1\]"):
        load_set(saved)


def test_partial_depth_and_wrong_image_size_raise_format_error(saved):
    (saved / "depth_01.npy").unlink()
    with pytest.raises(FormatError, match="depth_01.npy"):
        load_set(saved)
    np.save(saved / "depth_01.npy", np.zeros((20, 20), np.float32))
    header = json.loads((saved / "cameras.json").read_text())
    header["width"] = 21
    (saved / "cameras.json").write_text(json.dumps(header))
    with pytest.raises(FormatError, match="21x20"):
        load_set(saved)


# ------------------------------------------------------------------------------------ validation
def test_multiviewset_validates_fields(rendered):
    mv = rendered
    with pytest.raises(ShapeError, match=r"images.*\(V, 3, H, W\)"):
        replace(mv, images=mv.images[:, :2])
    with pytest.raises(ValueRangeError, match="images"):
        replace(mv, images=mv.images * 2 + 0.1)
    with pytest.raises(CorrlabError, match="cameras"):
        replace(mv, cameras=mv.cameras[:2])
    with pytest.raises(ShapeError, match="depth"):
        replace(mv, depth=mv.depth[:, :10])
    with pytest.raises(ValueRangeError, match="depth"):
        replace(mv, depth=torch.full_like(mv.depth, float("nan")))
    with pytest.raises(ShapeError, match="masks"):
        replace(mv, masks=mv.masks.to(torch.uint8))
    with pytest.raises(CorrlabError, match="prompt"):
        replace(mv, prompt=3)
    with pytest.raises(CorrlabError, match="seed"):
        replace(mv, seed="7")
    with pytest.raises(CorrlabError, match="meta"):
        replace(mv, meta={"tensor": torch.zeros(2)})
    ok = replace(mv, images=mv.images.numpy().astype(np.float64))  # numpy float64 is accepted, stored float32
    assert ok.images.dtype == torch.float32 and ok.num_views == 3 and (ok.height, ok.width, ok.size) == (20, 20, 20)
    wide = replace(mv, images=torch.zeros(3, 3, 20, 24), depth=None, masks=None)
    with pytest.raises(CorrlabError, match="square"):
        wide.size
