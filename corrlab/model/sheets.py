"""Contact sheets of generated multi-view sets (PIL images, written atomically as PNG).

* :func:`conditioned_sheet`: one row per scene: reference (view 0) | generated views 1.. | rendered truth
  of views 1.. (the image-conditioned setting; what ``corrlab train`` logs beside its tracking figures);
* :func:`text_sheet`: one row per set: rendered views | generated views (same prompt and cameras).

Images are ``(V, 3, H, W)`` in [0, 1]; each pixel is shown as a ``scale`` x ``scale`` block.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import CorrlabError
from ..io_utils import atomic_write_bytes

__all__ = ["conditioned_sheet", "text_sheet", "save_png"]

_LABEL, _GAP, _HEADER = 150, 8, 14


def _strip(images: torch.Tensor, scale: int):
    from PIL import Image

    strip = torch.cat(list(images.detach().float().cpu().clamp(0, 1)), dim=2)
    arr = (strip.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST)


def _check(pairs, rows: int, scale: int, what: str) -> int:
    if not pairs:
        raise CorrlabError(f"{what}: expected at least one set, got none")
    if rows < 1 or scale < 1:
        raise CorrlabError(f"{what}: rows and scale must be >= 1, got rows={rows}, scale={scale}")
    return min(rows, len(pairs))


def conditioned_sheet(sets, rows: int = 8, scale: int = 2):
    """``sets``: ``[(truth, generated)]`` :class:`~corrlab.model.MultiViewSet` pairs with view 0 given.

    Returns a PIL image: per row the prompt, the reference, the generated views 1.. and their truth.
    """
    from PIL import Image, ImageDraw

    rows = _check(sets, rows, scale, "conditioned_sheet")
    V, _, H, W = sets[0][1].images.shape
    if V < 2:
        raise CorrlabError(f"conditioned_sheet: expected sets of >= 2 views, got {V}")
    width = _LABEL + (1 + 2 * (V - 1)) * W * scale + 2 * _GAP
    sheet = Image.new("RGB", (width, rows * H * scale + _HEADER), "white")
    draw = ImageDraw.Draw(sheet)
    for r in range(rows):
        truth, gen = sets[r]
        x = _LABEL
        for k, imgs in enumerate((truth.images[:1], gen.images[1:], truth.images[1:])):
            im = _strip(imgs, scale)
            sheet.paste(im, (x, _HEADER + r * H * scale))
            if r == 0:
                draw.text((x + 2, 0), ("reference", "generated", "truth")[k], fill="black")
            x += im.width + _GAP
        draw.text((4, _HEADER + r * H * scale + H * scale // 2 - 6), truth.prompt, fill="black")
    return sheet


def text_sheet(rendered, generated, rows: int = 8, scale: int = 2):
    """Per row: the rendered views | the generated views of the same prompt and cameras (PIL image)."""
    from PIL import Image, ImageDraw

    rows = _check(list(zip(rendered, generated)), rows, scale, "text_sheet")
    V, _, H, W = generated[0].images.shape
    sheet = Image.new("RGB", (_LABEL + (2 * V * W) * scale + _GAP, rows * H * scale + _HEADER), "white")
    draw = ImageDraw.Draw(sheet)
    for r in range(rows):
        for k, imgs in enumerate((rendered[r].images, generated[r].images)):
            sheet.paste(_strip(imgs, scale), (_LABEL + k * (V * W * scale + _GAP), _HEADER + r * H * scale))
        draw.text((4, _HEADER + r * H * scale + H * scale // 2 - 6), generated[r].prompt, fill="black")
    draw.text((_LABEL + 2, 0), "rendered", fill="black")
    draw.text((_LABEL + V * W * scale + _GAP + 2, 0), "generated", fill="black")
    return sheet


def save_png(image, path: str | os.PathLike) -> Path:
    """Write a PIL image as PNG atomically, world-readable like the rest of ``data/``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    os.chmod(path, 0o644)  # the temporary file of mkstemp is 0600
    return path
