"""One token-centre formula (corrlab.geometry.tokens): every place that needs token centres or the token
under a pixel gives the same answer on several layouts (square and non-square grids, patch sizes 1..8, UNet
grids that do not divide the image)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from corrlab.errors import CorrlabError
from corrlab.geometry import pixel_to_token, token_centres
from corrlab.model import rays
from corrlab.model import native
from corrlab.probing import TokenLayout
from corrlab.probing.record import ProbeRecord, RecordBuilder

LAYOUTS = [((4, 4), (16, 16)), ((2, 3), (16, 24)), ((8, 8), (8, 8)), ((3, 5), (24, 40)), ((1, 7), (8, 56)),
           ((5, 5), (17, 17))]


def test_the_formula_in_the_pixel_convention():
    # token (r, c) of a patch-p grid covers [c p, (c+1) p) x [r p, (r+1) p): centre (c p + (p-1)/2, r p + (p-1)/2)
    c = token_centres((2, 3), (8, 12))
    expected = [[1.5, 1.5], [5.5, 1.5], [9.5, 1.5], [1.5, 5.5], [5.5, 5.5], [9.5, 5.5]]
    assert c.dtype == torch.float64 and c.tolist() == expected  # exact: multiples of 0.5 are exact in float64
    with pytest.raises(CorrlabError, match="grid"):
        token_centres((0, 3), (8, 12))


@pytest.mark.parametrize("grid, size", LAYOUTS)
def test_every_reader_uses_the_one_formula(grid, size):
    ref = token_centres(grid, size)
    (h, w), (H, W) = grid, size
    # exact below: each reader calls the same function with the same arguments
    assert torch.equal(TokenLayout(2, grid, size).token_centres(), ref)
    assert torch.equal(TokenLayout(2, grid, size, row_wise=True).token_centres(), ref)
    if H % h == 0 and W % w == 0 and H // h == W // w:  # the embedded models' patch grids
        assert torch.equal(rays.token_centres(H, W, H // h), ref)
    builder = RecordBuilder({})
    builder.add_layer("l", grid, 1, ref, size)
    builder.add("l", 0, None, 0, [1], torch.zeros(1, 1, h * w, dtype=torch.long), torch.ones(1, 1, h * w),
                torch.ones(1, 1, h * w, dtype=torch.bool), 2)
    np.testing.assert_array_equal(ProbeRecord(builder=builder).token_centres("l"), ref.numpy())


@pytest.mark.parametrize("grid, size", LAYOUTS)
def test_pixel_to_token_inverts_the_centres_everywhere(grid, size):
    (h, w), (H, W) = grid, size
    centres = token_centres(grid, size)
    assert torch.equal(pixel_to_token(centres, grid, size), torch.arange(h * w))
    assert torch.equal(TokenLayout(2, grid, size).pixel_to_token(centres), torch.arange(h * w))
    # every pixel lands in the token whose box holds its centre (integer arithmetic: x + 0.5 in [c W/w, (c+1) W/w))
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    xs, ys = xs.reshape(-1), ys.reshape(-1)
    pix = torch.stack([xs, ys], dim=1).double()
    box = ((2 * ys + 1) * h // (2 * H)) * w + (2 * xs + 1) * w // (2 * W)
    assert torch.equal(pixel_to_token(pix, grid, size), box)
    if H % h == 0 and W % w == 0 and H // h == W // w:
        p = H // h
        assert torch.equal(native.pixel_to_index(pix, p, h, w), box)
        assert torch.equal(native.token_cell(pix, p, h, w), torch.stack([box // w, box % w], dim=1))
