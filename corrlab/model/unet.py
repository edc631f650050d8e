"""``MultiViewUNet``: a small pixel-space multi-view rectified-flow UNet (diffusers model).

The SD / MVDream / MV-Adapter family the CorrAdapter paper's released backbones belong to, sized for a
CPU: convolutional ResBlocks on each view separately (64 -> 32 -> 16 -> 8 pixels), and joint
multi-view self-attention (``blocks.{i}.attn``, diffusers :class:`~diffusers.models.attention_processor.Attention`
with ``AttnProcessor2_0``) at the coarse levels, over the sequence ``(B, V*h*w, C)`` ordered view-major
then row-major, exactly like :class:`~corrlab.model.dit.MultiViewDiT` (so every corrlab path reads it the
same way). ``attention_grids()`` names each attention layer's token grid.

Camera: each pixel's Plücker ray ``(d, m)`` is concatenated to the input (a ray map, ``patch_size = 1``),
and at every attention layer a Fourier MLP of the ray through each token (the mean of its pixels' rays,
which is the ray through their mean direction) is added to the token before attention (PETR-style). No 2D
position embedding is shared across views: position reaches attention only through the camera.

Reference views (CAT3D / Zero123++ style): ``given (B, V)`` bool marks views whose input is the clean image
(no noise); a learned flag channel tells the network which they are. Their velocity output is ignored by the
pipeline and by the loss. With ``reference_concat=True`` every view's input also carries its nearest given
view (image, a "has a reference" flag, that view's ray map; :func:`nearest_reference_input`) through a zero-initialised
convolution added to the stem (Zero123-style concatenation), so convolutions can carry the reference's pixels
to close views directly; weights trained without it load with the same function.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..errors import ShapeError, ValueRangeError, check_shape, describe, is_positive_number
from .dit import ray_fourier_features, scene_vocabulary, timestep_features, timestep_vector
from .prompt import PromptEncoder
from .prope import PRoPEAttnProcessor, camera_centres_from_rays, projective_matrices_from_rays
from .ray_bias import EpipolarBiasAttnProcessor, unit_rays

__all__ = ["MultiViewUNet", "nearest_reference_input"]


def _groups(c: int) -> int:
    for g in (8, 4, 2, 1):
        if c % g == 0:
            return g
    return 1


def nearest_reference_input(
    sample: torch.Tensor, rays: torch.Tensor, given: torch.Tensor, gate_degrees: float | None = None
) -> torch.Tensor:
    """Each view's nearest given view, as extra input channels.

    ``sample (B, V, C, H, W)``, ``rays (B, V, 6, H, W)`` per-pixel Plücker rays, ``given (B, V)`` bool ->
    ``(B, V, C + 1 + 6, H, W)``: the image of the given view whose camera centre is nearest to the view's own (a
    given view's is itself; distances equal to 1e-6 go to the lower index), a channel of ones, and that view's ray
    map; all zeros for a set without a given view. Camera centres come from the ray maps (:func:`camera_centres_from_rays`, exact for
    pinhole cameras) on a subsampled pixel grid.

    ``gate_degrees`` (``sigma``, None = no gate): all ``C + 7`` channels are multiplied by ``exp(-(theta / sigma)^2)``,
    ``theta`` the angle between the two views' mean ray directions, so a reference reaches a view only when the two look
    the same way (where its pixels are a good guess) and the flag channel carries how close it is.
    """
    if sample.ndim != 5:
        raise ShapeError(f"sample: expected shape (B, V, C, H, W), got {describe(sample)}")
    B, V, C, H, W = sample.shape
    check_shape("rays", rays, (B, V, 6, H, W), expected=f"({B}, {V}, 6, {H}, {W}) per-pixel rays")
    check_shape("given", given, (B, V))
    given = given.to(torch.bool)
    out = sample.new_zeros(B, V, C + 7, H, W)
    has = given.any(dim=1)
    if not bool(has.any()):
        return out
    step = max(1, min(H, W) // 8)
    coarse = rays[:, :, :, ::step, ::step]  # a subsampled pixel grid is enough for centres and directions
    centres = camera_centres_from_rays(coarse.reshape(B * V, 6, -1, 1)).reshape(B, V, 3)
    dist = torch.round(torch.cdist(centres, centres) * 1e6)  # micro-units: equal distances tie despite rounding
    idx = dist.masked_fill(~given[:, None, :], float("inf")).argmin(dim=2)  # (B, V): first of equals
    b = torch.arange(B, device=sample.device)[:, None]
    ones = sample.new_ones(B, V, 1, H, W)
    ref = torch.cat([sample[b, idx], ones, rays.to(sample.dtype)[b, idx]], dim=2)
    if gate_degrees is not None:
        if not is_positive_number(gate_degrees):
            raise ValueRangeError(f"gate_degrees: expected a positive number of degrees or None, got {gate_degrees!r}")
        axes = F.normalize(coarse[:, :, :3].float().mean(dim=(3, 4)), dim=2)  # (B, V, 3) mean ray directions
        cos = (axes * axes[b, idx]).sum(dim=2).clamp(-1.0, 1.0)
        theta = torch.rad2deg(torch.acos(cos))
        ref = ref * torch.exp(-((theta / float(gate_degrees)) ** 2)).to(ref.dtype)[:, :, None, None, None]
    out[has] = ref[has]
    return out


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, scale/shift from the conditioning vector, 1x1 skip when widths differ."""

    def __init__(self, cin: int, cout: int, cond_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.cond = nn.Linear(cond_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``x (N, cin, H, W)``, ``cond (N, cond_dim)`` -> ``(N, cout, H, W)``."""
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.cond(cond)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class MultiViewAttentionBlock(nn.Module):
    """Pre-norm joint multi-view self-attention over all views' tokens, plus a token MLP.

    The camera reaches attention through ``ray_embed``: a Fourier MLP of each token's ray added to the
    normalised tokens before q/k/v.
    """

    def __init__(self, dim: int, num_heads: int, ray_freqs: int, prope_blocks: int = 0,
                 epipolar_gain_scale: float | None = None, epipolar_reference: float | None = None):
        super().__init__()
        self.epipolar_reference = epipolar_reference  # None: the bias is not normalised by the baseline
        self.norm1 = nn.LayerNorm(dim)
        self.ray_embed = nn.Sequential(nn.Linear(6 + 12 * ray_freqs, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.prope_blocks = int(prope_blocks)
        if epipolar_gain_scale is not None:  # the epipolar bias option, strength = scale * gain
            processor = EpipolarBiasAttnProcessor()
            self.epipolar_gain = nn.Parameter(torch.zeros(num_heads))
            self.epipolar_gain_scale = float(epipolar_gain_scale)
        else:
            processor = PRoPEAttnProcessor(self.prope_blocks) if self.prope_blocks else AttnProcessor2_0()
            self.epipolar_gain = None
        self.attn = Attention(
            query_dim=dim, heads=num_heads, dim_head=dim // num_heads, bias=True, out_bias=True, processor=processor,
        )
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim))
        self.ray_freqs = ray_freqs

    def forward(self, x: torch.Tensor, rays: torch.Tensor, views: int, cameras: torch.Tensor | None = None,
                centres: torch.Tensor | None = None) -> torch.Tensor:
        """``x (B*V, C, h, w)``, ``rays (B*V, 6, h, w)``, ``cameras (B, V, 4, 4)`` (with PRoPE), ``centres (B, V, 3)``
        (with the normalised epipolar bias) -> ``(B*V, C, h, w)``."""
        BV, C, h, w = x.shape
        B = BV // views
        tok = x.permute(0, 2, 3, 1).reshape(B, views * h * w, C)
        r = rays.permute(0, 2, 3, 1).reshape(B, views * h * w, 6)
        a = self.norm1(tok) + self.ray_embed(ray_fourier_features(r, self.ray_freqs))
        if self.epipolar_gain is not None:
            normalised = {} if self.epipolar_reference is None else {"centres": centres, "reference": self.epipolar_reference}
            tok = tok + self.attn(a, rays=unit_rays(r), strength=self.epipolar_gain_scale * self.epipolar_gain,
                                  **normalised)
        elif self.prope_blocks:
            tok = tok + self.attn(a, cameras=cameras, views=views)
        else:
            tok = tok + self.attn(a)
        tok = tok + self.mlp(self.norm2(tok))
        return tok.reshape(BV, h, w, C).permute(0, 3, 1, 2)


class MultiViewUNet(ModelMixin, ConfigMixin, AttentionMixin):
    """Multi-view pixel-space UNet predicting the rectified-flow velocity ``eps - x0``.

    ``forward(sample (B, V, 3, H, W) in [-1, 1] scale, timestep (B,) in [0, 1] (1 = noise),
    prompt_embeds (B, D), ray_embeds (B, V, 6, H, W) per-pixel Plücker rays, given (B, V) bool or None)
    -> velocity (B, V, 3, H, W)``. ``H`` and ``W`` must be divisible by ``2 ** (len(channels) - 1)``.

    Config: ``sample_size``, ``channels`` (width per level, finest first), ``attention_levels`` (indices of
    the levels with multi-view attention; level ``i`` has stride ``2 ** i``), ``num_heads``, ``prompt_dim``,
    ``ray_freqs``, ``scene_scale``, ``vocabulary``, ``stem`` (pixel-unshuffle factor of the input: level 0
    runs at ``H / stem``), ``relative_encoding`` ("none", or "prope": half of every head's channels carry the
    relative projective camera encoding of :mod:`corrlab.model.prope`), ``epipolar_bias`` (a learned per-head
    penalty on attention between tokens off each other's epipolar lines, :mod:`corrlab.model.ray_bias`),
    ``epipolar_gain_scale`` (its strength is ``epipolar_gain_scale * gain``, ``gain`` learned from 0: sets how fast
    Adam can grow it), ``epipolar_normalise`` (divide the bias's ray product by ``|b x d|`` per token and other view,
    so that it does not fade with the baseline ``b`` between two cameras, times ``epipolar_reference``: see
    :func:`corrlab.model.ray_bias.baseline_normalisers`; False keeps the original bias), ``decoder_attention_levels``
    (levels finer than every attention level that get multi-view attention in the decoder only, e.g. ``(0,)``:
    appended after the other blocks, so their names do not change; they start neutral), ``decoder_attention_heads``
    (their number of heads; default ``num_heads``: the epipolar bias costs 21 (21 V normalised) q/k channels per head),
    ``reference_concat`` (each view's input also carries its nearest given view, :func:`nearest_reference_input`,
    through ``conv_in_reference``, zero-initialised: neutral at the start), ``reference_gate_degrees`` (None, or
    ``sigma``: that input fades as ``exp(-(theta / sigma)^2)`` with the angle ``theta`` between the two views' directions,
    so that it is a consistently good guess where it arrives); ``patch_size`` is 1 (rays are per pixel) and exists so
    that the pipeline and the probes read this model like :class:`MultiViewDiT`.
    Attention layers, in forward order: encoder levels (coarsening), the middle, decoder levels (refining);
    ``attention_grids(H, W)`` gives each one's token grid.
    """

    corrlab_embedded = True  # corrlab's own model: CFG batched [cond, uncond] (see probing.attention_cache)

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,
        in_channels: int = 3,
        channels: Sequence[int] = (32, 64, 96, 128),
        attention_levels: Sequence[int] = (2, 3),
        num_heads: int = 4,
        prompt_dim: int = 64,
        ray_freqs: int = 4,
        scene_scale: float = 1.0,
        patch_size: int = 1,
        vocabulary: Sequence[str] | None = None,
        stem: int = 1,
        relative_encoding: str = "none",
        epipolar_bias: bool = False,
        epipolar_gain_scale: float = 1000.0,
        epipolar_normalise: bool = False,
        epipolar_reference: float = 3.8,
        decoder_attention_levels: Sequence[int] = (),
        decoder_attention_heads: int | None = None,
        reference_concat: bool = False,
        reference_gate_degrees: float | None = None,
    ):
        super().__init__()
        if relative_encoding not in ("none", "prope"):
            raise ShapeError(f"relative_encoding: expected 'none' or 'prope', got {relative_encoding!r}")
        if epipolar_bias and relative_encoding != "none":
            raise ShapeError(f"epipolar_bias: not combined with relative_encoding={relative_encoding!r}; expected 'none'")
        if not (isinstance(epipolar_gain_scale, (int, float)) and epipolar_gain_scale > 0):
            raise ValueRangeError(f"epipolar_gain_scale: expected a positive number, got {epipolar_gain_scale!r}")
        if epipolar_normalise and not epipolar_bias:
            raise ShapeError("epipolar_normalise: normalises the epipolar bias; expected together with epipolar_bias=True")
        if not (isinstance(epipolar_reference, (int, float)) and epipolar_reference > 0):
            raise ValueRangeError(f"epipolar_reference: expected a positive number, got {epipolar_reference!r}")
        if vocabulary is None:
            vocabulary = scene_vocabulary()
        self.register_to_config(vocabulary=list(vocabulary), channels=list(channels), attention_levels=list(attention_levels),
                                decoder_attention_levels=list(decoder_attention_levels))
        if patch_size != 1:
            raise ShapeError(f"patch_size: MultiViewUNet takes per-pixel rays, expected 1, got {patch_size}")
        chans = list(channels)
        levels = len(chans)
        att = sorted(set(int(a) for a in attention_levels))
        if any(a < 0 or a >= levels for a in att):
            raise ShapeError(f"attention_levels: expected indices in [0, {levels}), got {attention_levels}")
        dec = sorted(set(int(a) for a in decoder_attention_levels))
        if any(a < 0 or a >= levels or a in att for a in dec):
            raise ShapeError(
                f"decoder_attention_levels: expected indices in [0, {levels}) not in attention_levels {att}, "
                f"got {list(decoder_attention_levels)}"
            )
        if dec and att and max(dec) >= min(att):  # so they come last in forward order and no block is renamed
            raise ShapeError(f"decoder_attention_levels: expected levels finer than attention_levels {att}, got {dec}")
        cond_dim = 4 * chans[0]
        self.prompt_encoder = PromptEncoder(list(vocabulary), prompt_dim)
        self.time_embed = nn.Sequential(nn.Linear(chans[0], cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        self.prompt_proj = nn.Sequential(nn.Linear(prompt_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        # input: image (3) + given flag (1) + ray map (6), pixel-unshuffled by ``stem`` (a patchifying stem)
        self.conv_in = nn.Conv2d((in_channels + 1 + 6) * stem * stem, chans[0], 3, padding=1)
        self.given_embed = nn.Parameter(torch.zeros(2, chans[0]))
        if not isinstance(reference_concat, bool):
            raise ValueRangeError(f"reference_concat: expected True or False, got {reference_concat!r}")
        if reference_gate_degrees is not None and not (reference_concat and is_positive_number(reference_gate_degrees)):
            raise ValueRangeError(
                "reference_gate_degrees: expected None or a positive number of degrees with reference_concat=True, "
                f"got {reference_gate_degrees!r} (reference_concat={reference_concat!r})"
            )
        if reference_concat:  # the nearest given view's image, flag and rays, added to the stem; neutral start
            self.conv_in_reference = nn.Conv2d((in_channels + 1 + 6) * stem * stem, chans[0], 3, padding=1)
            nn.init.zeros_(self.conv_in_reference.weight)
            nn.init.zeros_(self.conv_in_reference.bias)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for i, c in enumerate(chans):
            cin = chans[i - 1] if i > 0 else chans[0]
            self.down.append(ResBlock(cin, c, cond_dim))
            self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1) if i < levels - 1 else nn.Identity())
        self.mid = ResBlock(chans[-1], chans[-1], cond_dim)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(levels)):
            c = chans[i]
            self.up.append(ResBlock(2 * c, c, cond_dim))  # upsampled (or middle) features + skip
            self.upsample.append(nn.Conv2d(c, chans[i - 1], 3, padding=1) if i > 0 else nn.Identity())
        # attention blocks in forward order: encoder (levels ascending), middle, decoder (descending)
        # decoder-only levels (``decoder_attention_levels``, finer than every attention level) come after the others
        plan: list[tuple[str, int]] = [("down", a) for a in att] + [("mid", levels - 1)] + [("up", a) for a in reversed(att)]
        plan += [("up", a) for a in reversed(dec)]
        self._attention_plan = plan
        self._decoder_only = dec_blocks = {i for i, (_, lv) in enumerate(plan) if lv in dec}
        def prope_blocks(dim: int, heads: int) -> int:
            return (dim // heads) // 8 if relative_encoding == "prope" else 0

        if decoder_attention_heads is not None and not (
                isinstance(decoder_attention_heads, int) and decoder_attention_heads > 0
                and all(chans[lv] % decoder_attention_heads == 0 for lv in dec)):
            raise ShapeError(f"decoder_attention_heads: expected a positive number of heads dividing the widths "
                             f"{[chans[lv] for lv in dec]}, got {decoder_attention_heads!r}")
        heads = [decoder_attention_heads if (i in dec_blocks and decoder_attention_heads) else num_heads
                 for i in range(len(plan))]
        self.blocks = nn.ModuleList(
            [MultiViewAttentionBlock(chans[lv], heads[i], ray_freqs, prope_blocks(chans[lv], heads[i]),
                                     float(epipolar_gain_scale) if epipolar_bias else None,
                                     float(epipolar_reference) if epipolar_normalise else None)
             for i, (_, lv) in enumerate(plan)]
        )
        for i in self._decoder_only:  # a neutral start: the block adds nothing until trained
            block = self.blocks[i]
            for lin in (block.attn.to_out[0], block.mlp[-1]):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
        self.norm_out = nn.GroupNorm(_groups(chans[0]), chans[0])
        self.conv_out = nn.Conv2d(chans[0], in_channels * stem * stem, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    # ---------------------------------------------------------------- helpers
    def decoder_only_blocks(self) -> list[str]:
        """Names (``"blocks.{i}"``) of the decoder-only attention blocks (``decoder_attention_levels``): they start
        neutral (zero output projections), so weights trained without them load with these at their start."""
        return [f"blocks.{i}" for i in sorted(self._decoder_only)]

    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """``B`` prompts -> ``(B, D)`` (mean of word embeddings; linear in them)."""
        return self.prompt_encoder(prompts)

    def null_prompt_embeds(self, batch: int) -> torch.Tensor:
        """``(B, D)`` unconditional embeddings for classifier-free guidance."""
        return self.prompt_encoder.null(batch)

    @property
    def downsampling_factor(self) -> int:
        return int(self.config.stem) * 2 ** (len(self.config.channels) - 1)

    def attention_grids(self, height: int | None = None, width: int | None = None) -> dict[str, tuple[int, int]]:
        """``{"blocks.{i}.attn": (h, w)}``: the token grid of each multi-view attention layer for an image of
        ``height x width`` pixels (default ``sample_size``); token (row, col) covers a ``stride x stride`` cell."""
        H = int(height or self.config.sample_size)
        W = int(width or self.config.sample_size)
        s = int(self.config.stem)
        return {f"blocks.{i}.attn": ((H // s) >> lv, (W // s) >> lv) for i, (_, lv) in enumerate(self._attention_plan)}

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        prompt_embeds: torch.Tensor,
        ray_embeds: torch.Tensor,
        given: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity ``(B, V, 3, H, W)``; see the class docstring for the arguments."""
        if sample.ndim != 5 or sample.shape[2] != self.config.in_channels:
            raise ShapeError(f"sample: expected shape (B, V, {self.config.in_channels}, H, W), got {describe(sample)}")
        B, V, c, H, W = sample.shape
        f = self.downsampling_factor
        if H % f or W % f:
            raise ShapeError(f"sample: expected H and W divisible by {f}, got {describe(sample)}")
        check_shape("ray_embeds", ray_embeds, (B, V, 6, H, W), expected=f"({B}, {V}, 6, {H}, {W}) per-pixel rays")
        check_shape("prompt_embeds", prompt_embeds, (B, self.config.prompt_dim))
        t = timestep_vector(timestep, B, sample.device)
        if given is None:
            given = torch.zeros(B, V, dtype=torch.bool, device=sample.device)
        check_shape("given", given, (B, V))
        dtype = self.conv_in.weight.dtype
        cond = self.time_embed(timestep_features(t, self.config.channels[0]).to(dtype))
        cond = cond + self.prompt_proj(prompt_embeds.to(dtype))
        cond = cond[:, None].expand(B, V, -1).reshape(B * V, -1)
        flag = given.reshape(B * V, 1, 1, 1).to(dtype).expand(B * V, 1, H, W)
        rays = ray_embeds.to(dtype).reshape(B * V, 6, H, W)
        x = torch.cat([sample.to(dtype).reshape(B * V, c, H, W), flag, rays], dim=1)
        cams = centres = None
        if self.config.relative_encoding == "prope":
            cams = projective_matrices_from_rays(rays).reshape(B, V, 4, 4)
        if getattr(self.config, "epipolar_normalise", False):
            centres = camera_centres_from_rays(rays).reshape(B, V, 3).to(dtype)
        s = int(self.config.stem)
        if s > 1:
            x = F.pixel_unshuffle(x, s)
            rays = F.avg_pool2d(rays, s)
        x = self.conv_in(x) + self.given_embed[given.reshape(-1).long()][:, :, None, None]
        if getattr(self.config, "reference_concat", False):
            r = nearest_reference_input(
                sample.to(dtype), ray_embeds.to(dtype), given, getattr(self.config, "reference_gate_degrees", None)
            ).reshape(B * V, c + 7, H, W)
            x = x + self.conv_in_reference(F.pixel_unshuffle(r, s) if s > 1 else r)
        ray_levels = [rays]
        for _ in range(len(self.config.channels) - 1):
            ray_levels.append(F.avg_pool2d(ray_levels[-1], 2))
        att_down = {lv: i for i, (kind, lv) in enumerate(self._attention_plan) if kind == "down"}
        att_up = {lv: i for i, (kind, lv) in enumerate(self._attention_plan) if kind == "up"}
        mid_i = next(i for i, (kind, _) in enumerate(self._attention_plan) if kind == "mid")
        skips = []
        for lv, (res, ds) in enumerate(zip(self.down, self.downsample)):
            x = res(x, cond)
            if lv in att_down:
                x = self.blocks[att_down[lv]](x, ray_levels[lv], V, cams, centres)
            skips.append(x)
            x = ds(x)
        x = self.mid(x, cond)
        x = self.blocks[mid_i](x, ray_levels[-1], V, cams, centres)
        levels = len(self.config.channels)
        for j, (res, us) in enumerate(zip(self.up, self.upsample)):
            lv = levels - 1 - j
            x = res(torch.cat([x, skips[lv]], dim=1), cond)
            if lv in att_up:
                x = self.blocks[att_up[lv]](x, ray_levels[lv], V, cams, centres)
            if lv > 0:
                x = us(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        x = self.conv_out(F.silu(self.norm_out(x)))
        if s > 1:
            x = F.pixel_shuffle(x, s)
        return x.reshape(B, V, c, H, W).to(sample.dtype)
