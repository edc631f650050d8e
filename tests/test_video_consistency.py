"""Optical-flow video consistency against the exact motion of frames rendered by corrlab."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from corrlab.errors import CorrlabError, ShapeError
from corrlab.geometry.correspondences import ground_truth_match_for
from corrlab.probing.record import ProbeRecord, RecordBuilder
from corrlab.probing.taps import TokenLayout
from corrlab.scenes import orbit_camera, render, sample_scene
from corrlab.video_consistency import (
    flow_consistency,
    latent_frame_indices,
    masked_psnr,
    optical_flow,
    register_frame_features,
    score_record_flow,
    subject_consistency,
    warp_back,
)

SIZE, STEP_DEG = 128, 4.0


@pytest.fixture(scope="module")
def video():
    """A textured sphere turning 4 degrees per frame (camera orbit = object rotation), 4 frames of 128 px."""
    spec = sample_scene(1)  # green checkered sphere
    cams = [orbit_camera(30.0 + STEP_DEG * k, 20.0, 4.2, SIZE) for k in range(4)]
    return render(spec, cams, SIZE)


def true_flow(video, i, j):
    """Exact flow i -> j at every object pixel of frame i that is visible in frame j: (pixels (N, 2), flow (N, 2))."""
    yy, xx = np.nonzero(video.masks[i].numpy())
    pix = torch.tensor(np.stack([xx, yy], 1), dtype=torch.float64)
    tgt, valid = ground_truth_match_for(video.depth[i], video.cameras[i], video.depth[j], video.cameras[j], pix)
    return pix[valid].numpy(), (tgt - pix)[valid].numpy()


def test_flow_table_equals_the_rendered_motion(video):
    table = flow_consistency(video.images, pairs="consecutive", masks=video.masks)
    assert list(table[["src", "tgt"]].itertuples(index=False, name=None)) == [(0, 1), (1, 2), (2, 3)]
    for row in table.itertuples():
        pix, flow = true_flow(video, row.src, row.tgt)
        truth = flow.mean(0)
        assert np.linalg.norm(truth) > 1.5  # the object moves (about 1.7 px per frame): a sign flip costs 3+ px
        # Mean object flow of the table vs the exact motion: DIS regularises near the silhouette and slightly
        # underestimates there (measured 0.22-0.24 px at 128 px): 0.4 px tolerance per component.
        assert abs(row.flow_dx - truth[0]) < 0.4 and abs(row.flow_dy - truth[1]) < 0.4, (row, truth)
        # per pixel: end-point error of the estimated flow at every truly visible object pixel
        est = optical_flow(video.images[row.src], video.images[row.tgt])
        x, y = pix[:, 0].astype(int), pix[:, 1].astype(int)
        epe = np.linalg.norm(est[y, x] - flow, axis=1)
        assert np.median(epe) < 0.5  # measured 0.17-0.21 px: sub-pixel on a textured object
        assert row.consistent_fraction > 0.95  # nothing is occluded between these frames
        # warp direction: frame tgt brought back onto frame src matches src far better than no warp at all
        mask = video.masks[row.src].numpy()
        unwarped = masked_psnr(video.images[row.src], video.images[row.tgt], mask)
        assert row.psnr > unwarped + 5.0, (row.psnr, unwarped)  # measured +7.5 dB
        # the warp with the exact flow agrees with the table's warp to within the flow's sub-pixel error
        exact = np.zeros((SIZE, SIZE, 2), np.float32)
        exact[y, x] = flow
        on = np.zeros((SIZE, SIZE), bool)
        on[y, x] = True
        exact_psnr = masked_psnr(video.images[row.src], warp_back(video.images[row.tgt], exact), on)
        assert exact_psnr > unwarped + 5.0, (exact_psnr, unwarped)


def test_a_sign_or_direction_error_would_fail(video):
    """The same checks with the flow negated, or the warp taken the wrong way round, fail by a wide margin."""
    pix, flow = true_flow(video, 0, 1)
    est = optical_flow(video.images[0], video.images[1])
    x, y = pix[:, 0].astype(int), pix[:, 1].astype(int)
    assert np.median(np.linalg.norm(-est[y, x] - flow, axis=1)) > 2.5
    mask = video.masks[0].numpy()
    right = masked_psnr(video.images[0], warp_back(video.images[1], est), mask)
    wrong_way = masked_psnr(video.images[1], warp_back(video.images[0], est), video.masks[1].numpy())
    unwarped = masked_psnr(video.images[0], video.images[1], mask)
    assert right > unwarped + 5.0 and wrong_way < unwarped + 1.0, (right, wrong_way, unwarped)


def test_static_video_is_perfectly_consistent(video):
    frames = video.images[:1].repeat(3, 1, 1, 1)
    table = flow_consistency(frames, pairs="all")
    assert len(table) == 6
    assert np.isinf(table["psnr"]).all() and np.allclose(table["ssim"], 1.0)
    assert (table["consistent_fraction"] == 1.0).all()
    assert np.abs(table[["flow_dx", "flow_dy"]].to_numpy()).max() < 1e-3


def test_subject_consistency_hook_uses_vbench_formula(video):
    # features = flattened pixels: identical frames -> 1; the rotating sphere -> below 1
    flat = lambda frames: frames.reshape(frames.shape[0], -1) - 0.5  # noqa: E731
    assert subject_consistency(video.images[:1].repeat(3, 1, 1, 1), flat) == pytest.approx(1.0, rel=1e-4)  # float32
    moving = subject_consistency(video.images, flat)
    f = torch.nn.functional.normalize(flat(video.images), dim=1)
    expected = np.mean([(float(f[t] @ f[0]) + float(f[t] @ f[t - 1])) / 2 for t in range(1, 4)])
    assert moving == pytest.approx(expected, rel=1e-5) and moving < 0.999
    with pytest.raises(CorrlabError, match="register_frame_features"):
        subject_consistency(video.images, "dino-not-installed")
    register_frame_features("test-flat", flat)
    table = flow_consistency(video.images, features="test-flat")
    assert np.allclose(table["subject_consistency"], moving)


def test_bad_frames_raise():
    with pytest.raises(ShapeError, match="frames"):
        flow_consistency(torch.rand(1, 3, 32, 32))
    with pytest.raises(ShapeError, match="16 x 16"):
        flow_consistency(torch.rand(2, 3, 8, 8))


def _record_from_matches(video, grid, match_fn) -> ProbeRecord:
    """A probe record (one layer, one step) whose match of each source token is ``match_fn(i, j, centres)``,
    kept on the object's tokens only (the uniform background has no motion to get right or wrong)."""
    V = video.images.shape[0]
    layout = TokenLayout(V, grid, (SIZE, SIZE))
    centres = layout.token_centres()
    builder = RecordBuilder({"heads": "mean"})
    builder.add_layer("blocks.0.attn1", grid, 1, centres, (SIZE, SIZE))
    gh, gw = grid
    for i in range(V):
        tgts = [j for j in range(V) if j != i]
        idx = []
        for j in tgts:
            p = match_fn(i, j, centres.numpy())
            col = np.clip(np.round((p[:, 0] + 0.5) * gw / SIZE - 0.5), 0, gw - 1)
            row = np.clip(np.round((p[:, 1] + 0.5) * gh / SIZE - 0.5), 0, gh - 1)
            idx.append(torch.as_tensor(row * gw + col, dtype=torch.long))
        index = torch.stack(idx)[None]  # (1, T, N)
        cx = centres[:, 0].round().long().clamp(0, SIZE - 1)
        cy = centres[:, 1].round().long().clamp(0, SIZE - 1)
        on_object = video.masks[i][cy, cx]
        kept = on_object.expand_as(index).clone()
        builder.add("blocks.0.attn1", 0, 500.0, i, tgts, index, torch.ones_like(index, dtype=torch.float32), kept, V)
    return ProbeRecord(builder=builder)


def test_score_record_flow_rewards_matches_that_follow_the_motion(video):
    """Tokens of 4 px: matches placed at the truly moved position (snapped to the token grid) score high;
    matches displaced by the motion's opposite score lower. Frames 0 and 3 are 12 degrees (about 5 px) apart."""
    frames = video.images[[0, 3]]
    sub = type(video)(images=frames, cameras=[video.cameras[0], video.cameras[3]], prompt=video.prompt, seed=1,
                      depth=video.depth[[0, 3]], masks=video.masks[[0, 3]])

    def follow(sign):
        def fn(i, j, centres):
            est = optical_flow(sub.images[i], sub.images[j])
            x = np.clip(np.round(centres[:, 0]).astype(int), 0, SIZE - 1)
            y = np.clip(np.round(centres[:, 1]).astype(int), 0, SIZE - 1)
            pix = torch.tensor(centres, dtype=torch.float64)
            tgt, valid = ground_truth_match_for(sub.depth[i], sub.cameras[i], sub.depth[j], sub.cameras[j], pix)
            motion = np.where(valid.numpy()[:, None], (tgt - pix).numpy(), est[y, x])
            return centres + sign * motion
        return fn

    good = score_record_flow(_record_from_matches(sub, (32, 32), follow(+1)), frames, thresholds=[3])
    bad = score_record_flow(_record_from_matches(sub, (32, 32), follow(-1)), frames, thresholds=[3])
    assert len(good) == 2 and set(good["kind"]) == {"flow"}
    assert (good["n_matches"] <= good["n_flow_valid"]).all() and (good["n_matches"] > 150).all()
    assert (good["precision"] > 0.9).all(), good
    assert (bad["precision"] < good["precision"] - 0.2).all(), bad


def test_latent_frame_indices_follow_the_causal_video_vae():
    assert latent_frame_indices(3, 9) == [0, 4, 8]
    assert latent_frame_indices(21, 81) == [4 * k for k in range(21)]
