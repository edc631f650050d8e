"""ProbeRecord: layout, tidy table, lossless netCDF round trip, clear errors on bad files."""
import json

import numpy as np
import pytest
import torch
import xarray as xr

from corrlab.errors import CorrlabError, FormatError, ShapeError
from corrlab.geometry import Camera, look_at
from corrlab.probing.record import ProbeRecord, RecordBuilder


def centres(h, w, p):
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([cols.reshape(-1) * p + (p - 1) / 2, rows.reshape(-1) * p + (p - 1) / 2], 1).double()


def make_record(seed=0):
    """Two layers with different grids and head counts, 3 images, 2 steps."""
    g = torch.Generator().manual_seed(seed)
    b = RecordBuilder({"similarity": "softmax", "threshold": 0.05}, batch_index=1)
    b.add_layer("blocks.0.attn", (4, 4), 2, centres(4, 4, 8), (32, 32))
    b.add_layer("down.attn1", (2, 2), 1, centres(2, 2, 16), (32, 32))
    truth = {}
    for layer, (n, hp) in {"blocks.0.attn": (16, 2), "down.attn1": (4, 1)}.items():
        for step, t in ((0, 1.0), (3, 0.25)):
            for src in range(3):
                tgts = [j for j in range(3) if j != src]
                idx = torch.randint(0, n, (hp, 2, n), generator=g)
                conf = torch.rand(hp, 2, n, generator=g)
                b.add(layer, step, t, src, tgts, idx, conf, conf > 0.5, num_images=3)
                truth[(layer, step, src)] = (tgts, idx, conf)
    rec = ProbeRecord(builder=b)
    rec.set_meta(prompt="a red chair", seed=7, cameras=three_cameras())
    return rec, truth


def three_cameras():
    """Three different cameras (one orthographic) with values that are not short binary fractions."""
    cams = []
    for i, eye in enumerate(((0, 0, -3.0), (1.3, 0.2, -2.7), (-0.7, 1.1, -2.9))):
        R, t = look_at(eye)
        K = [[40.0 + i / 3, 0, 15.5 + i / 7], [0, 41.0 / 3, 15.5], [0, 0, 1]]
        cams.append(Camera(K=K, R=R, t=t, model="orthographic" if i == 2 else "perspective"))
    return cams


def same_cameras(a, b):
    return len(a) == len(b) and all(
        torch.equal(x.K, y.K) and torch.equal(x.R, y.R) and torch.equal(x.t, y.t) and x.model == y.model for x, y in zip(a, b))


def test_layout_values_and_padding():
    rec, truth = make_record()
    ds = rec.ds
    assert dict(ds.sizes) == {"layer": 2, "step": 2, "src": 3, "tgt": 3, "head": 2, "row": 4, "col": 4,
                              "view": 3, "mat_row": 3, "mat_col": 3}
    assert rec.layers == ["blocks.0.attn", "down.attn1"] and rec.steps == [0, 3]
    assert ds["timestep"].values.tolist() == [1.0, 0.25]  # exact: the stored input values
    assert rec.grid("down.attn1") == (2, 2) and int(ds["num_heads"].sel(layer="down.attn1")) == 1
    tgts, idx, conf = truth[("blocks.0.attn", 3, 1)]
    sel = ds.sel(layer="blocks.0.attn", step=3, src=1)
    for t_pos, tgt in enumerate(tgts):
        row = sel["match_row"].sel(tgt=tgt).values.reshape(2, 16)
        col = sel["match_col"].sel(tgt=tgt).values.reshape(2, 16)
        assert np.array_equal(row * 4 + col, idx[:, t_pos].numpy())
        x = sel["match_x"].sel(tgt=tgt).values.reshape(2, 16)
        assert np.allclose(x, col * 8 + 3.5)
        assert np.allclose(sel["confidence"].sel(tgt=tgt).values.reshape(2, 16), conf[:, t_pos].numpy())
    # the diagonal and the padding hold no match
    assert (ds["match_row"].sel(src=1, tgt=1) == -1).all()
    assert np.isnan(ds["confidence"].sel(src=1, tgt=1)).all() and not ds["kept"].sel(src=1, tgt=1).any()
    small = ds.sel(layer="down.attn1")
    assert (small["match_row"].isel(head=1) == -1).all() and (small["match_row"].isel(row=slice(2, None)) == -1).all()
    assert np.allclose(rec.token_centres("down.attn1"), centres(2, 2, 16).numpy())
    assert rec.prompt == "a red chair" and rec.seed == 7 and len(rec.cameras) == 3
    assert json.loads(ds.attrs["matching"])["threshold"] == 0.05 and rec.image_size == (32, 32)  # exact: stored option


def test_to_dataframe_is_tidy():
    rec, truth = make_record()
    df = rec.to_dataframe()
    # per layer: steps x ordered pairs x heads x tokens
    assert len(df) == 2 * 6 * 2 * 16 + 2 * 6 * 1 * 4
    assert set(df.columns) >= {"layer", "step", "timestep", "src", "tgt", "head", "row", "col", "match_x", "kept"}
    assert (df["src"] != df["tgt"]).all()
    kept = rec.to_dataframe(kept_only=True)
    assert kept["kept"].all() and len(kept) == int(rec.ds["kept"].sum())


def test_save_load_round_trip_is_lossless(tmp_path):
    rec, _ = make_record()
    path = rec.save(tmp_path / "sub" / "record.nc")
    assert [p.name for p in path.parent.iterdir()] == ["record.nc"]  # no temporary left behind
    back = ProbeRecord.load(path)
    assert back.equals(rec)  # exact: a lossless netCDF round trip (no arithmetic)
    assert back.ds["kept"].dtype == bool and back.ds["match_row"].dtype == np.int32
    assert same_cameras(back.cameras, three_cameras())  # exact: stored float64 values, no arithmetic
    other, _ = make_record(seed=1)
    assert not back.equals(other)


def test_truncated_file_raises_format_error(tmp_path):
    rec, _ = make_record()
    path = rec.save(tmp_path / "record.nc")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="path"):
        ProbeRecord.load(path)


def test_foreign_files_raise_format_error(tmp_path):
    text = tmp_path / "notes.nc"
    text.write_text("not a netCDF file")
    with pytest.raises(FormatError, match="unreadable"):
        ProbeRecord.load(text)
    other = tmp_path / "other.nc"
    xr.Dataset({"a": ("x", np.arange(3))}).to_netcdf(other, engine="h5netcdf")
    with pytest.raises(FormatError, match="format"):
        ProbeRecord.load(other)
    with pytest.raises(CorrlabError, match="path"):
        ProbeRecord.load(tmp_path / "missing.nc")
    with pytest.raises(CorrlabError, match="layer"):
        make_record()[0].grid("nope")


def test_cameras_are_stored_once_as_variables():
    rec, _ = make_record()
    ds = rec.ds
    assert "cameras" not in ds.attrs
    assert ds["camera_K"].dims == ("view", "mat_row", "mat_col") and ds["camera_t"].dims == ("view", "mat_row")
    assert ds["camera_K"].dtype == np.float64 and ds["camera_R"].dtype == np.float64
    cams = three_cameras()
    # exact: the variables hold the cameras' own float64 values
    assert np.array_equal(ds["camera_K"].values, np.stack([c.K.numpy() for c in cams]))
    assert np.array_equal(ds["camera_R"].values, np.stack([c.R.numpy() for c in cams]))
    assert np.array_equal(ds["camera_t"].values, np.stack([c.t.numpy() for c in cams]))
    assert ds["camera_model"].values.tolist() == ["perspective", "perspective", "orthographic"]
    assert same_cameras(rec.cameras, cams)


def test_set_meta_on_a_loaded_record_replaces_the_cameras(tmp_path):
    rec, _ = make_record()
    back = ProbeRecord.load(rec.save(tmp_path / "r.nc"))
    cams = three_cameras()[::-1]
    back.set_meta(cameras=cams)
    assert same_cameras(back.cameras, cams) and back.ds.sizes["view"] == 3


def test_a_record_without_cameras_says_what_scoring_needs(tmp_path):
    b = RecordBuilder({"threshold": 0.05})
    b.add_layer("blocks.0.attn", (2, 2), 1, centres(2, 2, 8), (16, 16))
    b.add("blocks.0.attn", 0, 1.0, 0, [1], torch.zeros(1, 1, 4, dtype=torch.long), torch.ones(1, 1, 4),
          torch.ones(1, 1, 4, dtype=torch.bool), num_images=2)
    rec = ProbeRecord(builder=b)
    assert rec.cameras is None and "camera_K" not in rec.ds
    with pytest.raises(CorrlabError, match="set_meta"):
        rec.require_cameras("epipolar scoring")
    back = ProbeRecord.load(rec.save(tmp_path / "r.nc"))
    assert back.cameras is None and back.equals(rec)
    with pytest.raises(CorrlabError, match="cameras"):
        rec.set_meta(cameras=["not a camera"])


def version1_file(rec, path):
    """What version 1 wrote: no camera variables, the cameras as a JSON attribute."""
    ds = rec.ds.drop_vars(["camera_K", "camera_R", "camera_t", "camera_model", "view"])
    ds.attrs = {**ds.attrs, "version": 1, "cameras": json.dumps([c.to_dict() for c in rec.cameras])}
    ds.to_netcdf(path, engine="h5netcdf")
    return path


def test_version_1_records_still_load(tmp_path):
    rec, _ = make_record()
    back = ProbeRecord.load(version1_file(rec, tmp_path / "v1.nc"))
    assert back.ds.attrs["version"] == 2 and "cameras" not in back.ds.attrs
    assert same_cameras(back.cameras, three_cameras())  # exact: JSON floats round-trip float64
    assert back.equals(ProbeRecord.load(rec.save(tmp_path / "v2.nc")))


def test_unknown_versions_and_mixed_layouts_are_format_errors(tmp_path):
    rec, _ = make_record()
    ds = rec.ds.copy()
    ds.attrs = {**ds.attrs, "version": 3}
    ds.to_netcdf(tmp_path / "v3.nc", engine="h5netcdf")
    with pytest.raises(FormatError, match="version 2.*versions \\[1, 2\\].*got version 3"):
        ProbeRecord.load(tmp_path / "v3.nc")
    both = rec.ds.copy()
    both.attrs = {**both.attrs, "cameras": "[]"}
    with pytest.raises(FormatError, match="JSON attribute 'cameras'"):
        ProbeRecord(both)
    partial = rec.ds.drop_vars(["camera_t"])
    with pytest.raises(FormatError, match="camera_K"):
        ProbeRecord(partial)


def test_add_all_stores_what_add_per_source_stores():
    """The fused probe stores a whole (H', V, V, N) call at once: the same Dataset as one add per source image,
    the diagonal (an image against itself) left empty whatever the input holds there."""
    g = torch.Generator().manual_seed(3)
    hp, V, n = 2, 3, 16
    idx = torch.randint(0, n, (hp, V, V, n), generator=g)
    conf = torch.rand(hp, V, V, n, generator=g)
    kept = conf > 0.4
    per_source = RecordBuilder({"threshold": 0.05})
    at_once = RecordBuilder({"threshold": 0.05})
    for b in (per_source, at_once):
        b.add_layer("blocks.0.attn", (4, 4), hp, centres(4, 4, 8), (32, 32))
    for src in range(V):
        tgts = [j for j in range(V) if j != src]
        per_source.add("blocks.0.attn", 0, 0.5, src, tgts, idx[:, src, tgts], conf[:, src, tgts], kept[:, src, tgts], V)
    at_once.add_all("blocks.0.attn", 0, 0.5, idx, conf, kept)
    a = ProbeRecord(builder=per_source).ds
    b = ProbeRecord(builder=at_once).ds
    assert a.equals(b)
    assert (b["match_row"].values[0, 0, [0, 1, 2], [0, 1, 2]] == -1).all()
    with pytest.raises(ShapeError, match="expected shape"):
        at_once.add_all("blocks.0.attn", 1, 0.4, idx[:, :2], conf[:, :2], kept[:, :2])
