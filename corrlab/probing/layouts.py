"""Token layouts: where a multi-image attention layer's tokens sit, in the sequence and in the images.

Two questions, two objects:

* :class:`TokenLayout` (the public one): V images of ``(h, w)`` tokens each, generated at ``(H, W)``
  pixels. Token ``(r, c)`` (row-major index ``r * w + c``) covers the pixel box
  ``[c W/w, (c+1) W/w) x [r H/h, (r+1) H/h)``; its centre, in corrlab's pixel convention (centre of the
  top-left pixel at (0, 0)), is ``((c + 0.5) W / w - 0.5, (r + 0.5) H / h - 0.5)``.
* :class:`ImageTokens`: where those tokens sit in the attention kernel's ``(Bk, heads, Sk, d)`` tensors.
  Either the V images share one sequence (``images_in="sequence"``: the embedded model, video
  transformers; token ``v*h*w + r*w + c`` after ``text_tokens`` leading tokens) or each image is its own
  batch entry and groups of V consecutive batch entries attend to each other (``images_in="batch"``:
  multi-view UNets, extended attention; image tokens after ``text_tokens`` leading tokens).
  :meth:`ImageTokens.select` turns a kernel tensor into ``(B, V, heads, h*w, d)`` without copying.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..errors import CorrlabError, ShapeError, ValueRangeError, check_positive_pair, check_shape, describe
from ..geometry.tokens import pixel_to_token, token_centres

__all__ = [
    "TokenLayout", "ImageTokens", "grid_from_token_count", "layer_sort_key", "Family", "register_family",
    "unregister_family",
]


@dataclass(frozen=True)
class TokenLayout:
    """How one multi-image attention layer's tokens map to images and pixels.

    ``num_images`` V, ``grid`` ``(h, w)`` tokens per image, ``image_size`` ``(H, W)`` pixels of the
    generated images. Tokens of one image are indexed row-major: ``token = r * w + c``.

    ``row_wise``: the layer attends row by row (MV-Adapter's row-wise multi-view attention: a query of
    image i's row y sees only row y of every image), so native matches exist only within the same row:
    probes and CorrAdapter match per row and aggregate in a 1-D row window. The row constraint is the
    epipolar constraint only for orthographic views at elevation 0 (the setting MV-Adapter's row-wise
    attention was designed for); for other cameras it is an approximation built into the model.
    """

    num_images: int
    grid: tuple[int, int]
    image_size: tuple[int, int]
    row_wise: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.num_images, int) or isinstance(self.num_images, bool) or self.num_images < 1:
            raise ValueRangeError(f"num_images: expected a positive integer, got {self.num_images!r}")
        if not isinstance(self.row_wise, bool):
            raise CorrlabError(f"row_wise: expected a bool, got {self.row_wise!r}")
        object.__setattr__(self, "grid", check_positive_pair("grid", self.grid))
        object.__setattr__(self, "image_size", check_positive_pair("image_size", self.image_size))

    @property
    def tokens_per_image(self) -> int:
        """``h * w``."""
        return self.grid[0] * self.grid[1]

    def token_centres(self) -> torch.Tensor:
        """``(h*w, 2)`` float64 pixel ``(x, y)`` centres of the tokens of one image, row-major
        (:func:`corrlab.geometry.token_centres`)."""
        return token_centres(self.grid, self.image_size)

    def pixel_to_token(self, xy: torch.Tensor) -> torch.Tensor:
        """``xy (N, 2)`` pixel ``(x, y)`` -> ``(N,)`` long row-major index of the token containing it.

        Pixels outside the image are clamped to the nearest border token (:func:`corrlab.geometry.pixel_to_token`).
        """
        return pixel_to_token(xy, self.grid, self.image_size)


def grid_from_token_count(num_tokens: int, latent_size: tuple[int, int], max_halvings: int = 8) -> tuple[int, int]:
    """The ``(h, w)`` grid of a UNet level holding ``num_tokens`` tokens of a ``latent_size`` input.

    Each UNet downsampler halves the size rounding up (stride-2 convolution with padding 1), so the grid
    is ``ceil(latent / 2^k)`` for the ``k`` that gives ``num_tokens``.
    """
    h, w = latent_size
    for _ in range(max_halvings + 1):
        if h * w == num_tokens:
            return h, w
        h, w = -(-h // 2), -(-w // 2)
    raise ShapeError(
        f"num_tokens: expected h*w of {latent_size} halved k times (k <= {max_halvings}), got {num_tokens} tokens"
    )


@dataclass(frozen=True)
class ImageTokens:
    """Where a layer's image tokens sit in the kernel's ``(Bk, heads, Sk, d)`` q / k / v / out.

    ``images_in="sequence"``: ``Sk = text_tokens + V*h*w``, image v's token t at ``text_tokens + v*h*w + t``,
    ``Bk = B``. ``images_in="batch"``: ``Bk = B*V`` (image v of group b is batch entry ``b*V + v``),
    ``Sk = text_tokens + h*w``. ``images_in="rows"`` (row-wise multi-view attention, MV-Adapter's design;
    ``layout.row_wise`` must be True): one kernel batch entry per (set b, image v, row y), entry
    ``(b*V + v)*h + y``; queries and outputs ``(B*V*h, heads, w, d)`` (the row), keys and values
    ``(B*V*h, heads, V*w, d)`` (row y of every image, image-major). :meth:`select` gives queries/outputs;
    :meth:`select_keys` gives each image's keys/values from its own row entries (row y of image v in
    entry ``(b, v, y)``). Both are copies for this placement (write outputs back with :meth:`scatter`).
    """

    layout: TokenLayout
    images_in: Literal["sequence", "batch", "rows"]
    text_tokens: int = 0

    def __post_init__(self) -> None:
        if self.images_in not in ("sequence", "batch", "rows"):
            raise CorrlabError(f"images_in: expected 'sequence', 'batch' or 'rows', got {self.images_in!r}")
        if self.images_in == "rows" and (not self.layout.row_wise or self.text_tokens):
            raise CorrlabError("images_in: 'rows' needs a row_wise layout and no leading text tokens")
        if self.text_tokens < 0:
            raise ValueRangeError(f"text_tokens: expected a non-negative integer, got {self.text_tokens!r}")

    def expected_length(self, keys: bool = False) -> int:
        """``Sk``, the kernel's sequence length (of the keys with ``keys=True``: differs for ``"rows"``)."""
        V, n = self.layout.num_images, self.layout.tokens_per_image
        if self.images_in == "rows":
            return self.layout.grid[1] * (V if keys else 1)
        return self.text_tokens + (V * n if self.images_in == "sequence" else n)

    def check(self, name: str, x: torch.Tensor, keys: bool = False) -> None:
        """Raise :class:`ShapeError` unless ``x (Bk, heads, Sk, d)`` fits this placement."""
        V = self.layout.num_images
        ok = x.ndim == 4 and x.shape[2] == self.expected_length(keys)
        if ok and self.images_in == "batch":
            ok = x.shape[0] % V == 0
        if ok and self.images_in == "rows":
            ok = x.shape[0] % (V * self.layout.grid[0]) == 0
        if not ok:
            batch = {"sequence": "B", "batch": f"B*{V}", "rows": f"B*{V}*{self.layout.grid[0]}"}[self.images_in]
            raise ShapeError(
                f"{name}: expected kernel tensor of shape ({batch}, heads, {self.expected_length()}, d) for "
                f"{V} images of {self.layout.grid} tokens in the {self.images_in} after {self.text_tokens} "
                f"leading tokens, got {describe(x)}"
            )

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """Kernel tensor ``(Bk, heads, Sk, d)`` -> image tokens ``(B, V, heads, h*w, d)``.

        A view of ``x``, except for ``"rows"`` (a copy: rows of one image sit in different kernel entries).
        """
        self.check("x", x)
        V, n, T = self.layout.num_images, self.layout.tokens_per_image, self.text_tokens
        if self.images_in == "sequence":
            return x[:, :, T:].unflatten(2, (V, n)).transpose(1, 2)
        if self.images_in == "rows":
            h = self.layout.grid[0]
            y = x.unflatten(0, (x.shape[0] // (V * h), V, h))  # (B, V, h, heads, w, d)
            return y.permute(0, 1, 3, 2, 4, 5).reshape(y.shape[0], V, x.shape[1], n, x.shape[-1])
        return x[:, :, T:].unflatten(0, (x.shape[0] // V, V))

    def select_keys(self, x: torch.Tensor) -> torch.Tensor:
        """Kernel keys or values -> ``(B, V, heads, h*w, d)`` image tokens (like :meth:`select`).

        For ``"rows"``: image v's row y is taken from kernel entry ``(b, v, y)`` (its own query row's entry),
        block v of the ``V*w`` keys. Other placements: :meth:`select`.
        """
        if self.images_in != "rows":
            return self.select(x)
        self.check("x", x, keys=True)
        V, n = self.layout.num_images, self.layout.tokens_per_image
        h, w = self.layout.grid
        y = x.unflatten(0, (x.shape[0] // (V * h), V, h)).unflatten(4, (V, w))  # (B, Vq, h, heads, Vk, w, d)
        own = torch.diagonal(y, dim1=1, dim2=4)  # (B, h, heads, w, d, V)
        return own.permute(0, 5, 2, 1, 3, 4).reshape(y.shape[0], V, x.shape[1], n, x.shape[-1])

    def scatter(self, x: torch.Tensor, value: torch.Tensor) -> None:
        """Write image tokens ``value (B, V, heads, h*w, d)`` into kernel tensor ``x`` (inverse of :meth:`select`)."""
        if self.images_in != "rows":
            self.select(x).copy_(value)
            return
        self.check("x", x)
        V, (h, w) = self.layout.num_images, self.layout.grid
        B = x.shape[0] // (V * h)
        rows = value.unflatten(3, (h, w)).permute(0, 1, 3, 2, 4, 5)  # (B, V, h, heads, w, d)
        x.copy_(rows.reshape(B * V * h, x.shape[1], w, x.shape[-1]))


# ================================================================================ model families
# A family knows, for one kind of denoiser: its multi-image attention layers, what to read from the
# denoiser's forward arguments, and where each call's image tokens sit (an ImageTokens).


@dataclass(frozen=True)
class LayerEntry:
    """One attention layer of a denoiser: its stable name, module, kind and family."""

    name: str
    module: Any
    kind: str
    family: "Family"
    denoiser: Any


_CONTAINER_ORDER = {
    "down_blocks": 0, "mid_block": 1, "up_blocks": 2,  # UNet: the order the forward runs them
    "transformer_blocks": 0, "single_transformer_blocks": 1,  # Flux: joint blocks, then single blocks
}


def layer_sort_key(name: Any) -> tuple:
    """Sort key putting layer names in the order the forward runs them (indices parsed as numbers).

    ``blocks.2.attn`` < ``blocks.10.attn``; UNets: ``down_blocks`` < ``mid_block`` < ``up_blocks``; Flux: the
    joint ``transformer_blocks`` before the ``single_transformer_blocks``. Unknown containers sort by name
    after the known ones. The one layer order of corrlab (taps, records, plots, widgets).
    """
    key = []
    for part in str(name).split("."):
        if part.isdigit():
            key.append((1, int(part), ""))
        else:
            key.append((0, _CONTAINER_ORDER.get(part, 99), part))
    return tuple(key)


def _argument(arguments: dict, name: str, family: str) -> Any:
    if name not in arguments or arguments[name] is None:
        raise CorrlabError(
            f"{name}: the {family} denoiser was called without {name!r}; corrlab reads the token layout from "
            f"it (got arguments {sorted(arguments)})"
        )
    return arguments[name]


def _scaled(size: tuple[int, int], scale: float) -> tuple[int, int]:
    return int(round(size[0] * scale)), int(round(size[1] * scale))


class Family:
    """Base: a denoiser family. Subclasses define the layers and the per-call image-token placement.

    This is also the extension point for models corrlab does not know (see :mod:`corrlab.probing.custom`):
    subclass it, implement :meth:`matches`, :meth:`layers`, :meth:`read_forward` and :meth:`image_tokens`,
    and :func:`register_family` an instance. ``timestep_argument`` names the denoiser forward's timestep
    argument (``"timestep"``; ldm UNets call it ``"timesteps"``).
    """

    name = "family"
    timestep_argument = "timestep"

    def matches(self, model: Any) -> bool:
        raise NotImplementedError

    def layers(self, model: Any) -> list[tuple[str, Any, str]]:
        """``(qualified name, attention module, kind)`` of every multi-image attention layer."""
        raise NotImplementedError

    def pixel_scale(self, pipeline: Any) -> float:
        """Decoded pixels per latent pixel for a pipeline holding this denoiser."""
        return float(getattr(pipeline, "vae_scale_factor", 1) or 1)

    def config_grid(self, model: Any, name: str, kind: str) -> tuple[int, int] | None:
        """The layer's token grid from the config alone, where it can be known without a forward."""
        return None

    def read_forward(self, model: Any, arguments: dict) -> dict:
        """What a forward call's arguments say about the layout (shapes and sizes only, no tensors)."""
        raise NotImplementedError

    def image_tokens(
        self, state: dict, q: torch.Tensor, group_size: int, scale: float, kind: str, k: torch.Tensor | None = None
    ) -> ImageTokens:
        """Placement of the image tokens of one kernel call ``q (Bk, heads, Sq, d)``, ``k (Bk, heads, Sk, d)``."""
        raise NotImplementedError


def _attention_modules(model: Any, suffix: str, cls: type) -> list[tuple[str, Any]]:
    return [(n, m) for n, m in model.named_modules() if n.endswith(suffix) and isinstance(m, cls)]


class EmbeddedFamily(Family):
    """corrlab's ``MultiViewDiT`` and ``MultiViewUNet`` (and models shaped like them): ``blocks.{i}.attn`` over
    ``(B, V*h*w, C)``; a multi-resolution model names each layer's grid with ``attention_grids(H, W)``.

    The forward gets ``sample (B, V, c, H, W)`` in pixel space; patch size ``config.patch_size`` p gives the
    grid ``(H/p, W/p)``; the generated images are ``(H, W)`` pixels.
    """

    name = "multiview_dit"

    def matches(self, model: Any) -> bool:
        from diffusers.models.attention_processor import Attention

        blocks = getattr(model, "blocks", None)
        config = getattr(model, "config", None)
        return (
            isinstance(getattr(config, "patch_size", None), int)
            and isinstance(blocks, torch.nn.ModuleList)
            and len(blocks) > 0
            and all(isinstance(getattr(b, "attn", None), Attention) for b in blocks)
        )

    def layers(self, model: Any) -> list[tuple[str, Any, str]]:
        return [(f"blocks.{i}.attn", b.attn, self.name) for i, b in enumerate(model.blocks)]

    def pixel_scale(self, pipeline: Any) -> float:
        return 1.0

    def config_grid(self, model, name, kind):
        size, p = getattr(model.config, "sample_size", None), model.config.patch_size
        if not isinstance(size, int):
            return None
        grids = getattr(model, "attention_grids", None)  # multi-resolution models (MultiViewUNet)
        if callable(grids):
            return grids(size, size).get(name)
        return (size // p, size // p)

    def read_forward(self, model, arguments):
        sample = _argument(arguments, "sample", self.name)
        check_shape("sample", sample, (None, None, None, None, None), "(B, V, c, H, W)")
        return {
            "num_images": int(sample.shape[1]),
            "size": (int(sample.shape[3]), int(sample.shape[4])),
            "patch": int(model.config.patch_size),
        }

    def image_tokens(self, state, q, group_size, scale, kind, k=None):
        if group_size != 1:
            raise CorrlabError(f"group_size: the {self.name} family holds its views in one sequence; got {group_size}")
        (H, W), p = state["size"], state["patch"]
        V = state["num_images"]
        grid = (H // p, W // p)
        if int(q.shape[2]) != V * grid[0] * grid[1] and int(q.shape[2]) % V == 0:
            # a multi-resolution model (MultiViewUNet): the layer's grid is the image grid halved k times
            grid = grid_from_token_count(int(q.shape[2]) // V, grid)
        layout = TokenLayout(V, grid, _scaled((H, W), scale))
        return ImageTokens(layout, "sequence")



class WanFamily(Family):
    """``WanTransformer3DModel``: self-attention ``blocks.{i}.attn1``; latent frames are the images.

    ``hidden_states (B, C, F, H, W)`` latents, patch ``(p_t, p_h, p_w)``: ``F/p_t`` images of
    ``(H/p_h, W/p_w)`` tokens in one sequence, frame-major then row-major. ``image_size`` is the latent
    size times the pixel scale (a pipeline's ``vae_scale_factor_spatial``, else 1: latent pixels). With
    ``p_t > 1`` an "image" is a group of ``p_t`` latent frames.
    """

    name = "wan_self"

    def matches(self, model: Any) -> bool:
        from diffusers import WanTransformer3DModel

        return isinstance(model, WanTransformer3DModel)

    def layers(self, model):
        return [(f"blocks.{i}.attn1", b.attn1, self.name) for i, b in enumerate(model.blocks)]

    def pixel_scale(self, pipeline):
        return float(getattr(pipeline, "vae_scale_factor_spatial", 1) or 1)

    def read_forward(self, model, arguments):
        x = _argument(arguments, "hidden_states", self.name)
        check_shape("hidden_states", x, (None, None, None, None, None), "(B, C, F, H, W)")
        return {
            "frames": int(x.shape[2]),
            "size": (int(x.shape[3]), int(x.shape[4])),
            "patch": tuple(int(p) for p in model.config.patch_size),
        }

    def image_tokens(self, state, q, group_size, scale, kind, k=None):
        if group_size != 1:
            raise CorrlabError(f"group_size: the {self.name} family holds its frames in one sequence; got {group_size}")
        pt, ph, pw = state["patch"]
        H, W = state["size"]
        layout = TokenLayout(state["frames"] // pt, (H // ph, W // pw), _scaled((H, W), scale))
        return ImageTokens(layout, "sequence")



class UNetFamily(Family):
    """``UNet2DConditionModel``: self-attention ``...transformer_blocks.{j}.attn1``; images are batch entries.

    Groups of ``group_size`` consecutive batch entries attend to each other when a multi-view processor
    or :func:`~corrlab.probing.extended_attention.extended_attention` is active (else every image is its
    own group of 1). The grid of a layer is the latent size halved (rounding up) once per UNet level.
    """

    name = "unet_self"

    def matches(self, model):
        from diffusers import UNet2DConditionModel

        return isinstance(model, UNet2DConditionModel)

    def layers(self, model):
        from diffusers.models.attention_processor import Attention

        return [
            (n, m, self.name)
            for n, m in _attention_modules(model, ".attn1", Attention)
            if not m.is_cross_attention
        ]

    def config_grid(self, model, name, kind):
        size = model.config.sample_size
        if size is None:
            return None
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        n_levels = len(model.config.block_out_channels)
        parts = name.split(".")
        if parts[0] == "down_blocks":
            level = int(parts[1])
        elif parts[0] == "mid_block":
            level = n_levels - 1
        else:
            level = n_levels - 1 - int(parts[1])
        for _ in range(level):
            h, w = -(-h // 2), -(-w // 2)
        return h, w

    def read_forward(self, model, arguments):
        x = _argument(arguments, "sample", self.name)
        check_shape("sample", x, (None, None, None, None), "(B, C, H, W)")
        return {"size": (int(x.shape[2]), int(x.shape[3]))}

    def image_tokens(self, state, q, group_size, scale, kind, k=None):
        H, W = state["size"]
        if k is not None and k.shape[2] != q.shape[2]:
            return _row_tokens(q, k, (H, W), scale)
        grid = grid_from_token_count(int(q.shape[2]), (H, W))
        layout = TokenLayout(group_size, grid, _scaled((H, W), scale))
        return ImageTokens(layout, "batch")


def _row_tokens(q: torch.Tensor, k: torch.Tensor, latent: tuple[int, int], scale: float) -> ImageTokens:
    """Row-wise multi-view kernel call (MV-Adapter): ``q (B*V*h, heads, w, d)``, ``k (B*V*h, heads, V*w, d)``."""
    w, sk = int(q.shape[2]), int(k.shape[2])
    H, W = latent
    h, ww = H, W
    for _ in range(9):
        if ww == w:
            break
        h, ww = -(-h // 2), -(-ww // 2)
    if ww != w or sk % w or sk // w < 2 or q.shape[0] % (h * (sk // w)):
        raise ShapeError(
            f"k: expected a row-wise multi-view kernel call (queries: one row of w tokens, w = {W} halved k "
            f"times; keys: that row of V >= 2 images, V*w tokens; batch B*V*rows) for a {latent} latent, got "
            f"q {describe(q)} and k {describe(k)}"
        )
    layout = TokenLayout(sk // w, (h, w), _scaled((H, W), scale), row_wise=True)
    return ImageTokens(layout, "rows")


class FluxFamily(Family):
    """``FluxTransformer2DModel``: ``transformer_blocks.{i}.attn`` (joint) and ``single_transformer_blocks.{i}.attn``.

    Every sequence is ``[text tokens, image tokens]``; the text length is the forward's
    ``encoder_hidden_states.shape[1]``, the grid comes from ``img_ids`` (row, col in ids[:, 1:]).
    Images are batch entries (groups set by extended attention). ``image_size`` is ``2 * grid`` latent
    pixels (the pipeline packs 2x2 latents per token) times the pixel scale (a pipeline's
    ``vae_scale_factor``, so 16 pixels per token for FLUX.1).
    """

    name = "flux"

    def matches(self, model):
        from diffusers import FluxTransformer2DModel

        return isinstance(model, FluxTransformer2DModel)

    def layers(self, model):
        out = [(f"transformer_blocks.{i}.attn", b.attn, "flux_joint") for i, b in enumerate(model.transformer_blocks)]
        out += [
            (f"single_transformer_blocks.{i}.attn", b.attn, "flux_single")
            for i, b in enumerate(model.single_transformer_blocks)
        ]
        return out

    def read_forward(self, model, arguments):
        text = _argument(arguments, "encoder_hidden_states", self.name)
        ids = _argument(arguments, "img_ids", self.name)
        if ids.ndim == 3:
            ids = ids[0]
        check_shape("img_ids", ids, (None, 3), "(S, 3)")
        rows, cols = ids[:, 1].round().long(), ids[:, 2].round().long()
        rows, cols = rows - rows.min(), cols - cols.min()
        h, w = int(rows.max()) + 1, int(cols.max()) + 1
        expect_r = torch.arange(h, device=ids.device).repeat_interleave(w)
        expect_c = torch.arange(w, device=ids.device).repeat(h)
        if h * w != ids.shape[0] or not (torch.equal(rows, expect_r) and torch.equal(cols, expect_c)):
            raise ShapeError(f"img_ids: expected a row-major (h, w) grid of image token ids, got {describe(ids)}")
        return {"text_tokens": int(text.shape[1]), "grid": (h, w)}

    def image_tokens(self, state, q, group_size, scale, kind, k=None):
        h, w = state["grid"]
        layout = TokenLayout(group_size, (h, w), _scaled((2 * h, 2 * w), scale))
        return ImageTokens(layout, "batch", text_tokens=state["text_tokens"])


FAMILIES: list[Family] = [EmbeddedFamily(), WanFamily(), UNetFamily(), FluxFamily()]


def register_family(family: Family) -> Family:
    """Make corrlab find a new kind of denoiser (checked before the built-in families); returns it.

    Undo with :func:`unregister_family`. See :mod:`corrlab.probing.custom` for a worked example.
    """
    if not isinstance(family, Family):
        raise CorrlabError(f"family: expected an instance of a corrlab.probing.layouts.Family subclass, got {describe(family)}")
    if family not in FAMILIES:
        FAMILIES.insert(0, family)
    return family


def unregister_family(family: Family) -> None:
    """Remove a family added with :func:`register_family` (a no-op if it is not registered)."""
    if family in FAMILIES:
        FAMILIES.remove(family)


@dataclass(frozen=True)
class Denoiser:
    """A denoiser found in a model or pipeline: name prefix, module, family, pixels per latent pixel."""

    prefix: str
    module: Any
    family: Family
    pixel_scale: float


_DENOISER_ATTRIBUTES = ("model", "unet", "transformer", "transformer_2")


def _family_of(module: Any) -> Family | None:
    for fam in FAMILIES:
        if fam.matches(module):
            return fam
    return None


def find_denoisers(model_or_pipeline: Any) -> list[Denoiser]:
    """The supported denoisers of a model (itself) or a pipeline (``model``, ``unet``, ``transformer``,
    ``transformer_2``; an alias of one already found is skipped). Names of the first denoiser's layers
    carry no prefix, later ones ``"<attribute>."`` (Wan 2.2: ``"transformer_2.blocks.0.attn1"``)."""
    if isinstance(model_or_pipeline, torch.nn.Module):
        fam = _family_of(model_or_pipeline)
        if fam is None:
            raise CorrlabError(
                f"model_or_pipeline: expected a supported denoiser (MultiViewDiT-like, WanTransformer3DModel, "
                f"UNet2DConditionModel, FluxTransformer2DModel) or a pipeline holding one, got "
                f"{type(model_or_pipeline).__name__}"
            )
        return [Denoiser("", model_or_pipeline, fam, 1.0)]
    found = []
    for attr in _DENOISER_ATTRIBUTES:
        module = getattr(model_or_pipeline, attr, None)
        if not isinstance(module, torch.nn.Module) or any(d.module is module for d in found):
            continue
        fam = _family_of(module)
        if fam is None:
            continue
        prefix = "" if not found else f"{attr}."
        found.append(Denoiser(prefix, module, fam, fam.pixel_scale(model_or_pipeline)))
    if not found:
        raise CorrlabError(
            f"model_or_pipeline: expected a supported denoiser or a pipeline with one of the attributes "
            f"{list(_DENOISER_ATTRIBUTES)} holding one, got {type(model_or_pipeline).__name__}"
        )
    return found


def find_layers(model_or_pipeline: Any) -> list[LayerEntry]:
    """Every multi-image attention layer, in forward order, denoiser by denoiser."""
    entries = []
    for d in find_denoisers(model_or_pipeline):
        rows = sorted(d.family.layers(d.module), key=lambda r: layer_sort_key(r[0]))
        entries += [LayerEntry(d.prefix + n, m, kind, d.family, d) for n, m, kind in rows]
    return entries
