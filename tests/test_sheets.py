"""Contact sheets (corrlab.model.sheets) and the sample sheet ``corrlab train`` logs at each evaluation."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from corrlab.cli import main
from corrlab.errors import CorrlabError
from corrlab.model.sheets import _GAP, _HEADER, _LABEL, conditioned_sheet, save_png, text_sheet
from corrlab.scenes import render_scene

from test_model_v2 import TINY_UNET


def test_conditioned_sheet_places_reference_generated_and_truth(tmp_path):
    truth = render_scene(11, 3, 16, "train")
    gen = render_scene(11, 3, 16, "train")
    gen.images = torch.full_like(truth.images, 0.5)
    sheet = conditioned_sheet([(truth, gen)] * 3, rows=2, scale=2)
    H = W = 16 * 2
    assert sheet.size == (_LABEL + 5 * W + 2 * _GAP, 2 * H + _HEADER)
    arr = np.asarray(sheet)
    ref = (truth.images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(arr[_HEADER:_HEADER + H:2, _LABEL:_LABEL + W:2], ref)  # the reference, exactly
    assert (arr[_HEADER:_HEADER + H, _LABEL + W + _GAP:_LABEL + 3 * W + _GAP] == 128).all()  # generated views 1-2
    last = (truth.images[2].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    x = _LABEL + 3 * W + 2 * _GAP + W
    np.testing.assert_array_equal(arr[_HEADER + H:_HEADER + 2 * H:2, x:x + W:2], last)  # row 2: truth of view 2
    path = save_png(sheet, tmp_path / "a" / "s.png")
    assert Image.open(path).size == sheet.size and not list(path.parent.glob(".*"))


def test_text_sheet_size_and_bad_input():
    rendered = [render_scene(s, 2, 16, "train") for s in (1, 2)]
    sheet = text_sheet(rendered, rendered, rows=8, scale=1)
    assert sheet.size == (_LABEL + 4 * 16 + _GAP, 2 * 16 + _HEADER)  # rows capped at the sets given
    with pytest.raises(CorrlabError, match="at least one set"):
        conditioned_sheet([])
    with pytest.raises(CorrlabError, match="scale=0"):
        text_sheet(rendered, rendered, scale=0)


def test_train_logs_a_sample_sheet_per_evaluation(tmp_path):
    cfg = dict(arch="unet", model=TINY_UNET, image_size=16, reference_probs=[0.5, 0.5], views=[2], view_probs=[1.0],
               views_per_batch=2, steps=2, checkpoint_every=2, eval_every=2, eval_sets=2, log_every=1, threads=1)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert main(["train", "--config", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    rec = json.loads((tmp_path / "run" / "eval.jsonl").read_text().splitlines()[-1])
    assert "error" not in rec and "psnr/generated" in rec
    sheet = Image.open(tmp_path / "run" / "samples" / "step_0000002.png")
    assert sheet.size == (_LABEL + 3 * 32 + 2 * _GAP, 2 * 32 + _HEADER)  # 2 scenes of 2 views, scale 2
