"""Attention taps, token layouts and extended attention on tiny randomly initialised models."""
from __future__ import annotations

import diffusers.models.attention_dispatch as attention_dispatch
import diffusers.models.attention_processor as attention_processor
import diffusers.models.transformers.transformer_flux as transformer_flux
import diffusers.models.transformers.transformer_wan as transformer_wan
import pytest
import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel, WanTransformer3DModel
from hypothesis import given, settings
from hypothesis import strategies as st

from corrlab.errors import CorrlabError, ShapeError, ValueRangeError
from corrlab.model import MultiViewDiT
from corrlab.probing import interception
from corrlab.probing.extended_attention import GroupAttention
from corrlab.probing.layouts import ImageTokens, grid_from_token_count
from corrlab.probing.taps import (
    AttentionTaps,
    TokenLayout,
    extended_attention,
    list_layers,
    multiview_attention_processors,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


# ------------------------------------------------------------------------------------------ tiny models
def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter with seeded noise (zero-initialised gates would hide attention)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def tiny_dit(seed: int = 0) -> MultiViewDiT:
    m = MultiViewDiT(sample_size=16, patch_size=4, hidden_size=32, num_layers=2, num_heads=2, prompt_dim=8, ray_freqs=1)
    return _randomise(m, seed)


def dit_inputs(V: int = 3, H: int = 16, W: int = 12, t: float = 0.5, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(1, V, 3, H, W, generator=g),
        timestep=torch.tensor([t]),
        prompt_embeds=torch.randn(1, 8, generator=g),
        ray_embeds=torch.randn(1, V, 6, H // 4, W // 4, generator=g),
    )


def tiny_wan(seed: int = 0) -> WanTransformer3DModel:
    m = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    return _randomise(m, seed)


def wan_inputs(frames: int = 3, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, 4, frames, 8, 8, generator=g),
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 5, 16, generator=g),
        return_dict=False,
    )


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    m = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
    )
    return _randomise(m, seed)


def unet_inputs(batch: int = 2, H: int = 8, W: int = 12, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, 4, H, W, generator=g),
        timestep=torch.tensor(10),
        encoder_hidden_states=torch.randn(batch, 3, 16, generator=g),
        return_dict=False,
    )


def tiny_flux(seed: int = 0) -> FluxTransformer2DModel:
    m = FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4),
    )
    return _randomise(m, seed)


def flux_inputs(batch: int = 2, h: int = 3, w: int = 4, T: int = 5, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(h * w, 3)
    ids[:, 1] = torch.arange(h).repeat_interleave(w)
    ids[:, 2] = torch.arange(w).repeat(h)
    return dict(
        hidden_states=torch.randn(batch, h * w, 8, generator=g),
        encoder_hidden_states=torch.randn(batch, T, 16, generator=g),
        pooled_projections=torch.randn(batch, 8, generator=g),
        timestep=torch.full((batch,), 0.5),
        img_ids=ids,
        txt_ids=torch.zeros(T, 3),
        return_dict=False,
    )


def run(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out[0] if isinstance(out, tuple) else out


def assert_clean(model: torch.nn.Module, processors: dict | None = None) -> None:
    """No hooks on any module, every kernel reference restored, no active frames, same processors."""
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, f"hooks left on {name!r}"
    assert attention_processor.F is torch.nn.functional
    assert transformer_wan.dispatch_attention_fn is attention_dispatch.dispatch_attention_fn
    assert transformer_flux.dispatch_attention_fn is attention_dispatch.dispatch_attention_fn
    assert interception.active_frames() == []
    if processors is not None:
        now = model.attn_processors
        assert now.keys() == processors.keys()
        assert all(now[k] is processors[k] for k in now)


class Setup:
    """A model, its inputs and how to make it multi-image (a context manager or nothing)."""

    def __init__(self, name):
        self.name = name
        if name == "dit":
            self.model, self.inputs, self.group = tiny_dit(), dit_inputs(), None
        elif name == "wan":
            self.model, self.inputs, self.group = tiny_wan(), wan_inputs(), None
        elif name == "unet_multiview":
            self.model, self.inputs, self.group = tiny_unet(), unet_inputs(batch=2), None
            self.model.set_attn_processor(multiview_attention_processors(self.model, 2))
        elif name == "unet_extended":
            self.model, self.inputs, self.group = tiny_unet(), unet_inputs(batch=2), 2
        elif name == "flux_extended":
            self.model, self.inputs, self.group = tiny_flux(), flux_inputs(batch=2), 2

    def grouped(self):
        if self.group is None:
            return _Nothing()
        return extended_attention(self.model, self.group)


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


FAMILIES = ["dit", "wan", "unet_multiview", "unet_extended", "flux_extended"]


# ------------------------------------------------------------------------------------------ layouts
def test_token_centres_follow_the_pixel_convention():
    layout = TokenLayout(num_images=2, grid=(2, 4), image_size=(16, 32))
    c = layout.token_centres()
    assert c.dtype == torch.float64 and c.shape == (8, 2)
    # token (r=1, c=2): x = 2.5 * 8 - 0.5, y = 1.5 * 8 - 0.5
    # computed centres: compared up to float64 rounding
    assert c[1 * 4 + 2].tolist() == pytest.approx([19.5, 11.5], abs=1e-12)
    # an 8 px patch covers pixels 0..7: its centre is 3.5
    assert c[0].tolist() == pytest.approx([3.5, 3.5], abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), sh=st.integers(1, 5), sw=st.integers(1, 5))
def test_pixel_to_token_inverts_token_centres(h, w, sh, sw):
    layout = TokenLayout(1, (h, w), (h * sh, w * sw))
    assert torch.equal(layout.pixel_to_token(layout.token_centres()), torch.arange(h * w))


def test_pixel_to_token_covers_boxes_and_clamps():
    layout = TokenLayout(1, (2, 2), (8, 8))
    xy = torch.tensor([[3.4, 0.0], [3.6, 0.0], [0.0, 3.6], [-5.0, -5.0], [100.0, 100.0], [7.5, 0.0]])
    assert layout.pixel_to_token(xy).tolist() == [0, 1, 2, 0, 3, 1]
    with pytest.raises(ShapeError, match="xy"):
        layout.pixel_to_token(torch.zeros(3, 3))
    with pytest.raises(ValueRangeError, match="xy"):
        layout.pixel_to_token(torch.tensor([[float("nan"), 0.0]]))


def test_token_layout_rejects_bad_arguments():
    with pytest.raises(ValueRangeError, match="num_images"):
        TokenLayout(0, (2, 2), (8, 8))
    with pytest.raises(ValueRangeError, match="grid"):
        TokenLayout(1, (0, 2), (8, 8))
    with pytest.raises(CorrlabError, match="image_size"):
        TokenLayout(1, (2, 2), "big")


@pytest.mark.parametrize("images_in", ["sequence", "batch"])
def test_image_tokens_select_is_a_view_at_the_documented_positions(images_in):
    B, V, heads, h, w, d, T = 2, 3, 2, 2, 3, 4, 5
    layout = TokenLayout(V, (h, w), (h, w))
    tokens = ImageTokens(layout, images_in, text_tokens=T)
    if images_in == "sequence":
        x = torch.randn(B, heads, T + V * h * w, d)
        expect = lambda b, v, t: x[b, :, T + v * h * w + t]  # noqa: E731
    else:
        x = torch.randn(B * V, heads, T + h * w, d)
        expect = lambda b, v, t: x[b * V + v, :, T + t]  # noqa: E731
    sel = tokens.select(x)
    assert sel.shape == (B, V, heads, h * w, d)
    assert sel.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    for b, v, t in [(0, 0, 0), (1, 2, 5), (1, 1, 3)]:
        assert torch.equal(sel[b, v, :, t], expect(b, v, t))  # exact: a view of x, no arithmetic
    with pytest.raises(ShapeError, match="x"):
        tokens.select(torch.randn(B * V, heads, T + h * w + 1, d))


def test_grid_from_token_count_rounds_up_per_level():
    assert grid_from_token_count(8 * 12, (8, 12)) == (8, 12)
    assert grid_from_token_count(3 * 4, (5, 7)) == (3, 4)
    with pytest.raises(ShapeError, match="num_tokens"):
        grid_from_token_count(7, (8, 12))


# ------------------------------------------------------------------------------------------ observe only
@pytest.mark.parametrize("family", FAMILIES)
def test_observing_taps_leave_outputs_bit_identical_and_restore_everything(family):
    s = Setup(family)
    processors = dict(s.model.attn_processors)
    with s.grouped():
        ref = run(s.model, s.inputs)
        seen = []
        with AttentionTaps(s.model, None, lambda c: seen.append((c.layer, tuple(c.q.shape), c.layout))):
            tapped = run(s.model, s.inputs)
        again = run(s.model, s.inputs)
    assert torch.equal(tapped, ref) and torch.equal(again, ref)  # exact: same computation twice (taps only read)
    names = [n.name for n in list_layers(s.model)]
    assert [layer for layer, _, _ in seen] == names  # every layer, in forward order, once
    for _, shape, layout in seen:
        assert shape[1] == layout.num_images and shape[3] == layout.tokens_per_image
        assert layout.num_images == {"dit": 3, "wan": 3}.get(family, 2)
    assert_clean(s.model, processors)


@pytest.mark.parametrize("family", FAMILIES)
def test_everything_is_restored_after_an_exception(family):
    s = Setup(family)
    processors = dict(s.model.attn_processors)
    with s.grouped():
        ref = run(s.model, s.inputs)
    last = list_layers(s.model)[-1].name

    def boom(call):
        if call.layer == last:  # mid-forward, after other layers ran
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), s.grouped():
        with AttentionTaps(s.model, None, boom):
            run(s.model, s.inputs)
    assert_clean(s.model, processors)
    with pytest.raises(KeyError), s.grouped():  # raised in the with-body, outside the model
        with AttentionTaps(s.model, None, lambda c: None):
            raise KeyError("outside")
    assert_clean(s.model, processors)
    with s.grouped():
        assert torch.equal(run(s.model, s.inputs), ref)  # exact: same computation twice (model restored)


def test_call_tensors_are_views_of_the_models_tensors():
    s = Setup("dit")
    flags = []
    def record(c):
        flags.append([t._is_view() for t in (c.q, c.k, c.v, c.out)])

    with AttentionTaps(s.model, ["blocks.0.attn"], record):
        run(s.model, s.inputs)
    assert flags == [[True] * 4]


# ------------------------------------------------------------------------------------------ q, k, out
def test_dit_q_k_are_the_layers_projections_and_out_is_their_attention():
    s = Setup("dit")
    attn = s.model.blocks[1].attn
    hidden, calls = [], []
    handle = attn.register_forward_pre_hook(lambda m, args: hidden.append(args[0].detach().clone()))
    try:
        with AttentionTaps(s.model, ["blocks.1.attn"], lambda c: calls.append(c) and None):
            run(s.model, s.inputs)
    finally:
        handle.remove()
    (call,) = calls
    B, V, heads, n, d = call.q.shape
    x = hidden[0]  # (B, V*n, C)
    with torch.no_grad():
        q = attn.to_q(x).view(B, V, n, heads, d).permute(0, 1, 3, 2, 4)
        k = attn.to_k(x).view(B, V, n, heads, d).permute(0, 1, 3, 2, 4)
        v = attn.to_v(x).view(B, V, n, heads, d).permute(0, 1, 3, 2, 4)
    torch.testing.assert_close(call.q, q, atol=1e-6, rtol=0)
    torch.testing.assert_close(call.k, k, atol=1e-6, rtol=0)
    torch.testing.assert_close(call.v, v, atol=1e-6, rtol=0)
    assert call.scale == pytest.approx(d ** -0.5)
    flat = lambda t: t.permute(0, 2, 1, 3, 4).reshape(B, heads, V * n, d)  # noqa: E731
    weights = torch.softmax(flat(call.q) @ flat(call.k).transpose(-1, -2) * call.scale, dim=-1)
    out = (weights @ flat(call.v)).view(B, heads, V, n, d).transpose(1, 2)
    torch.testing.assert_close(call.out, out, atol=1e-5, rtol=0)


def _first_layer_q(model, layer: str, inputs: dict, grouped=None) -> tuple[torch.Tensor, TokenLayout]:
    calls = []
    ctx = grouped if grouped is not None else _Nothing()
    with ctx, AttentionTaps(model, [layer], lambda c: calls.append((c.q.clone(), c.layout)) and None):
        run(model, inputs)
    return calls[0]


def _changed_tokens(q0: torch.Tensor, q1: torch.Tensor) -> list[tuple[int, int, int]]:
    """(batch, image, token) entries of (B, V, heads, n, d) where q differs."""
    diff = (q0 - q1).abs().amax(dim=(2, 4)) > 1e-6
    return [tuple(i) for i in diff.nonzero().tolist()]


def test_dit_layout_marker_arrives_at_its_image_and_token():
    s = Setup("dit")
    p, (v, r, c) = 4, (2, 3, 1)
    base = dict(s.inputs, sample=torch.zeros_like(s.inputs["sample"]))
    marked = dict(base, sample=base["sample"].clone())
    marked["sample"][0, v, :, r * p:(r + 1) * p, c * p:(c + 1) * p] = 1.0
    q0, layout = _first_layer_q(s.model, "blocks.0.attn", base)
    q1, _ = _first_layer_q(s.model, "blocks.0.attn", marked)
    w = layout.grid[1]
    assert layout.grid == (4, 3) and layout.image_size == (16, 12)
    assert _changed_tokens(q0, q1) == [(0, v, r * w + c)]
    # the marked patch's pixels map to that token, and its centre lies inside the patch
    ys, xs = torch.meshgrid(torch.arange(r * p, (r + 1) * p), torch.arange(c * p, (c + 1) * p), indexing="ij")
    pix = torch.stack([xs.flatten(), ys.flatten()], 1).double()
    assert set(layout.pixel_to_token(pix).tolist()) == {r * w + c}
    assert layout.token_centres()[r * w + c].tolist() == pytest.approx([c * p + (p - 1) / 2, r * p + (p - 1) / 2], abs=1e-12)


def test_wan_latent_frames_are_the_images():
    s = Setup("wan")
    frame, r, c = 1, 2, 3
    base = dict(s.inputs, hidden_states=torch.zeros_like(s.inputs["hidden_states"]))
    marked = dict(base, hidden_states=base["hidden_states"].clone())
    marked["hidden_states"][0, :, frame, 2 * r:2 * r + 2, 2 * c:2 * c + 2] = 1.0
    q0, layout = _first_layer_q(s.model, "blocks.0.attn1", base)
    q1, _ = _first_layer_q(s.model, "blocks.0.attn1", marked)
    assert layout == TokenLayout(3, (4, 4), (8, 8))
    assert _changed_tokens(q0, q1) == [(0, frame, r * 4 + c)]


def test_flux_extended_image_tokens_exclude_text_and_map_batch_entries_to_images():
    s = Setup("flux_extended")
    image, token = 1, 7
    marked = dict(s.inputs, hidden_states=s.inputs["hidden_states"].clone())
    marked["hidden_states"][image, token] += 1.0
    q0, layout = _first_layer_q(s.model, "transformer_blocks.0.attn", s.inputs, extended_attention(s.model, 2))
    q1, _ = _first_layer_q(s.model, "transformer_blocks.0.attn", marked, extended_attention(s.model, 2))
    assert layout == TokenLayout(2, (3, 4), (6, 8)) and q0.shape == (1, 2, 2, 12, 8)
    assert _changed_tokens(q0, q1) == [(0, image, token)]


def test_unet_multiview_views_are_batch_entries_with_per_level_grids():
    unet = tiny_unet()
    inputs = unet_inputs(batch=4)  # two groups of two views
    first = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    batched = ("sample", "encoder_hidden_states")
    single = [
        _first_layer_q(unet, first, {k: (x[i:i + 1] if k in batched else x) for k, x in inputs.items()})[0]
        for i in range(4)
    ]
    unet.set_attn_processor(multiview_attention_processors(unet, 2))
    grids = {}
    qs = []

    def record(call):
        grids[call.layer] = call.layout.grid
        if call.layer.startswith("down_blocks.0"):
            qs.append(call.q.clone())

    with AttentionTaps(unet, None, record):
        run(unet, inputs)
    (q,) = qs
    assert q.shape[:2] == (2, 2)
    for i in range(4):  # first layer: no mixing yet, so view v of group b is batch entry 2b + v alone
        torch.testing.assert_close(q[i // 2, i % 2], single[i][0, 0], atol=1e-5, rtol=0)
    assert grids == {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1": (8, 12),
        "mid_block.attentions.0.transformer_blocks.0.attn1": (4, 6),
        "up_blocks.1.attentions.0.transformer_blocks.0.attn1": (8, 12),
        "up_blocks.1.attentions.1.transformer_blocks.0.attn1": (8, 12),
    }


# ------------------------------------------------------------------------------------------ replacement
@pytest.mark.parametrize("family", ["dit", "wan", "unet_multiview", "flux_extended"])
def test_replacing_out_changes_the_output_and_identity_keeps_it(family):
    s = Setup(family)
    with s.grouped():
        ref = run(s.model, s.inputs)
        with AttentionTaps(s.model, None, lambda c: c.out):
            same = run(s.model, s.inputs)
        with AttentionTaps(s.model, None, lambda c: c.out * 0):
            zeroed = run(s.model, s.inputs)
    assert torch.equal(same, ref)  # exact: same computation twice (the identity writes the layer's own output back)
    assert not torch.allclose(zeroed, ref, atol=1e-4)


def test_replacement_is_written_only_into_image_tokens():
    """On Flux the text tokens' attention output is left alone: the text stream of the joint block is unchanged."""
    s = Setup("flux_extended")
    block = s.model.transformer_blocks[0].attn
    outs = []
    handle = block.register_forward_hook(lambda m, a, o: outs.append(tuple(t.clone() for t in o)))
    try:
        with extended_attention(s.model, 2):
            run(s.model, s.inputs)
            with AttentionTaps(s.model, ["transformer_blocks.0.attn"], lambda c: c.out * 0):
                run(s.model, s.inputs)
    finally:
        handle.remove()
    (img0, txt0), (img1, txt1) = outs
    # exact: same computation twice (the kernel is the same; only the image rows are overwritten afterwards)
    assert torch.equal(txt0, txt1)
    assert not torch.allclose(img0, img1)


def test_replacement_of_the_wrong_shape_is_rejected():
    s = Setup("dit")
    with pytest.raises(ShapeError, match="on_call"):
        with AttentionTaps(s.model, ["blocks.0.attn"], lambda c: c.out[:, :1]):
            run(s.model, s.inputs)
    assert_clean(s.model)


# ------------------------------------------------------------------------------------------ bookkeeping
def test_call_index_and_timestep_come_from_the_denoiser_forward():
    s = Setup("dit")
    seen = []
    with AttentionTaps(s.model, ["blocks.1.attn"], lambda c: seen.append((c.call_index, c.timestep))):
        run(s.model, dit_inputs(t=0.75))
        run(s.model, dit_inputs(t=0.25))
    assert seen == [(0, 0.75), (1, 0.25)]  # exact: the timesteps passed in, recorded as is


def test_list_layers_is_stable_sorted_and_discoverable():
    a, b = list_layers(tiny_unet(seed=0)), list_layers(tiny_unet(seed=5))
    assert a == b
    names = [info.name for info in a]
    assert names == [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1",
        "mid_block.attentions.0.transformer_blocks.0.attn1",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn1",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn1",
    ]
    unet = tiny_unet()
    for info in a:
        assert unet.get_submodule(info.name).heads == info.num_heads
    # config grids (sample_size 8) agree with the grids a forward at 8 x 8 actually uses
    measured = list_layers(unet, sample_inputs=unet_inputs(batch=1, H=8, W=8))
    assert [i.grid for i in measured] == [i.grid for i in a] == [(8, 8), (4, 4), (8, 8), (8, 8)]

    flux = list_layers(tiny_flux())
    assert [(i.name, i.kind, i.grid) for i in flux] == [
        ("transformer_blocks.0.attn", "flux_joint", None),
        ("single_transformer_blocks.0.attn", "flux_single", None),
    ]
    assert [i.grid for i in list_layers(tiny_flux(), sample_inputs=flux_inputs(batch=1))] == [(3, 4), (3, 4)]
    dit = list_layers(tiny_dit())
    assert [(i.name, i.grid, i.num_heads, i.head_dim) for i in dit] == [
        ("blocks.0.attn", (4, 4), 2, 16), ("blocks.1.attn", (4, 4), 2, 16)
    ]
    assert [i.name for i in list_layers(tiny_wan())] == ["blocks.0.attn1", "blocks.1.attn1"]


def test_layer_names_sort_by_parsed_index():
    from corrlab.probing.layouts import layer_sort_key

    dit = ["blocks.10.attn", "blocks.2.attn", "blocks.1.attn"]
    assert sorted(dit, key=layer_sort_key) == ["blocks.1.attn", "blocks.2.attn", "blocks.10.attn"]
    unet = ["up_blocks.0.a.attn1", "mid_block.a.attn1", "down_blocks.10.a.attn1", "down_blocks.2.a.attn1"]
    assert sorted(unet, key=layer_sort_key) == [
        "down_blocks.2.a.attn1", "down_blocks.10.a.attn1", "mid_block.a.attn1", "up_blocks.0.a.attn1"
    ]
    flux = ["single_transformer_blocks.0.attn", "transformer_blocks.11.attn", "transformer_blocks.3.attn"]
    assert sorted(flux, key=layer_sort_key) == [
        "transformer_blocks.3.attn", "transformer_blocks.11.attn", "single_transformer_blocks.0.attn"
    ]


def test_layer_sort_key_is_the_forward_order_of_flux_blocks():
    """The one layer order (taps, records, plots, widgets) is the order a Flux forward runs its attention:
    the joint blocks, then the single blocks (a natural name sort put ``single_...`` first), indices as numbers."""
    import random

    from corrlab import plotting
    from corrlab.probing.layouts import layer_sort_key

    m = FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=11, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4),
    ).eval()
    ran: list[str] = []
    handles = [mod.register_forward_pre_hook(lambda _m, _a, name=name: ran.append(name))
               for name, mod in m.named_modules() if name.endswith(".attn")]
    try:
        with torch.no_grad():
            m(**flux_inputs(batch=1))
    finally:
        for h in handles:
            h.remove()
    assert len(ran) == 13 and ran[0] == "transformer_blocks.0.attn" and ran[-1] == "single_transformer_blocks.10.attn"
    shuffled = list(ran)
    random.Random(0).shuffle(shuffled)
    assert sorted(shuffled, key=layer_sort_key) == ran
    assert plotting.layer_sort_key is layer_sort_key  # one definition
    assert [i.name for i in list_layers(m)] == ran


def test_the_step_clock_counts_steps_slots_and_generations():
    from corrlab.probing.taps import StepClock

    clock, seen = StepClock(), []
    for t in [1.0, 1.0, 0.5, 0.5, 0.0, 1.0, 0.5, None, None, 0.2]:
        clock.tick(t)
        seen.append((clock.step, clock.slot, clock.generation))
    assert seen == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0), (2, 0, 0), (3, 0, 1), (4, 0, 1), (5, 0, 1),
                    (6, 0, 1), (7, 0, 1)]
    assert clock.calls == 10


def test_bad_arguments_raise_clear_errors():
    s = Setup("dit")
    with pytest.raises(CorrlabError, match="layers: unknown layer names"):
        AttentionTaps(s.model, ["blocks.9.attn"], lambda c: None)
    with pytest.raises(CorrlabError, match="on_call"):
        AttentionTaps(s.model, None, "not callable")
    with pytest.raises(CorrlabError, match="model_or_pipeline"):
        AttentionTaps(torch.nn.Linear(2, 2), None, lambda c: None)
    with pytest.raises(CorrlabError, match="extended attention supports"):
        extended_attention(s.model, 2)
    with pytest.raises(ValueRangeError, match="num_images"):
        extended_attention(tiny_unet(), 0)
    assert_clean(s.model)


def test_pipeline_layers_and_pixel_scale():
    class Pipe:  # the attributes a diffusers pipeline exposes
        def __init__(self):
            self.unet, self.vae_scale_factor = tiny_unet(), 8

    pipe = Pipe()
    pipe.unet.set_attn_processor(multiview_attention_processors(pipe.unet, 2))
    layouts = []
    with AttentionTaps(pipe, ["mid_block.attentions.0.transformer_blocks.0.attn1"], lambda c: layouts.append(c.layout)):
        run(pipe.unet, unet_inputs(batch=2))
    assert layouts == [TokenLayout(2, (4, 6), (64, 96))]


# ------------------------------------------------------------------------------------------ extended attention
def test_group_attention_matches_a_naive_reference():
    g = torch.Generator().manual_seed(3)
    B, V, heads, T, S, d = 2, 3, 2, 4, 5, 8
    q, k, v = (torch.randn(B * V, heads, T + S, d, generator=g) for _ in range(3))
    call = interception.KernelCall(torch.nn.Identity(), None, None, False, V)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    out = GroupAttention(V, lambda: T)(call, q, k, v, sdpa)
    for b in range(B):
        imgs_k = torch.cat([k[b * V + j, :, T:] for j in range(V)], dim=1)
        imgs_v = torch.cat([v[b * V + j, :, T:] for j in range(V)], dim=1)
        for i in range(V):
            kk = torch.cat([k[b * V + i, :, :T], imgs_k], dim=1)
            vv = torch.cat([v[b * V + i, :, :T], imgs_v], dim=1)
            w = torch.softmax(q[b * V + i] @ kk.transpose(-1, -2) / d ** 0.5, dim=-1)
            torch.testing.assert_close(out[b * V + i], w @ vv, atol=1e-5, rtol=0)
    out0 = GroupAttention(V)(call, q[:, :, T:], k[:, :, T:], v[:, :, T:], sdpa)
    joint = lambda x: x[:, :, T:].unflatten(0, (B, V)).transpose(1, 2).reshape(B, heads, V * S, d)  # noqa: E731
    ref = sdpa(joint(q), joint(k), joint(v)).unflatten(2, (V, S)).transpose(1, 2).reshape(B * V, heads, S, d)
    torch.testing.assert_close(out0, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["unet", "flux"])
def test_extended_attention_with_one_image_reproduces_the_model(family):
    model, inputs = (tiny_unet(), unet_inputs(batch=2)) if family == "unet" else (tiny_flux(), flux_inputs(batch=2))
    processors = dict(model.attn_processors)
    ref = run(model, inputs)
    with extended_attention(model, 1):
        # exact: same computation twice (with one image per group the kernel gets the layer's own q, k, v)
        assert torch.equal(run(model, inputs), ref)
    assert_clean(model, processors)


@pytest.mark.parametrize("family", ["unet", "flux"])
def test_extended_attention_lets_images_influence_each_other(family):
    model, inputs = (tiny_unet(), unet_inputs(batch=2)) if family == "unet" else (tiny_flux(), flux_inputs(batch=2))
    key = "sample" if family == "unet" else "hidden_states"
    changed = dict(inputs, **{key: inputs[key].clone()})
    changed[key][1] += 1.0  # change image 1 only
    plain = run(model, inputs), run(model, changed)
    # sanity: without extension image 0 ignores image 1. exact: same computation twice for batch entry 0
    # (same shapes, same inputs in its rows; the other entry's values do not enter its arithmetic)
    assert torch.equal(plain[0][0], plain[1][0])
    with extended_attention(model, 2) as handle:
        ext = run(model, inputs), run(model, changed)
    assert not torch.allclose(ext[0][0], ext[1][0], atol=1e-5)
    assert not torch.allclose(ext[0][0], plain[0][0], atol=1e-5)
    handle.remove()  # idempotent
    assert_clean(model)
    assert torch.equal(run(model, inputs), plain[0])  # exact: same computation twice (model restored)


def test_extended_unet_over_identical_images_equals_the_single_image_model():
    """Attention over [K; K] equals attention over K: two copies of an image reproduce it (up to rounding)."""
    unet = tiny_unet()
    one = unet_inputs(batch=1)
    two = {k: (torch.cat([x, x]) if k in ("sample", "encoder_hidden_states") else x) for k, x in one.items()}
    ref = run(unet, one)
    with extended_attention(unet, 2):
        out = run(unet, two)
    torch.testing.assert_close(out, torch.cat([ref, ref]), atol=1e-5, rtol=1e-5)
    unet.set_attn_processor(multiview_attention_processors(unet, 2))
    torch.testing.assert_close(run(unet, two), torch.cat([ref, ref]), atol=1e-5, rtol=1e-5)


def test_extended_attention_rejects_batches_that_do_not_split_into_groups():
    unet = tiny_unet()
    with pytest.raises(ShapeError, match="B\\*3"), extended_attention(unet, 3):
        run(unet, unet_inputs(batch=2))
    assert_clean(unet)


def test_corrlab_pipeline_is_probed_through_its_model():
    from corrlab.model import CorrlabPipeline

    pipe = CorrlabPipeline(tiny_dit())
    assert [i.name for i in list_layers(pipe)] == ["blocks.0.attn", "blocks.1.attn"]  # `transformer` alias skipped
    x = dit_inputs()
    args = (x["sample"], 0.5, x["prompt_embeds"], x["ray_embeds"])
    with torch.no_grad():
        ref = pipe.velocity(*args, guidance_scale=2.0)
        seen = []
        with AttentionTaps(pipe, ["blocks.1.attn"], lambda c: seen.append((c.q.shape, c.layout, c.timestep))):
            out = pipe.velocity(*args, guidance_scale=2.0)
    assert torch.equal(out, ref)  # exact: same computation twice (taps only read)
    assert seen == [(torch.Size([2, 3, 2, 12, 16]), TokenLayout(3, (4, 3), (16, 12)), 0.5)]  # CFG batch of 2


def test_two_transformer_pipelines_get_prefixed_names_and_shared_call_index():
    class WanPipe:  # Wan 2.2: a high-noise and a low-noise transformer
        def __init__(self):
            self.transformer, self.transformer_2, self.vae_scale_factor_spatial = tiny_wan(0), tiny_wan(1), 8

    pipe = WanPipe()
    names = [i.name for i in list_layers(pipe)]
    assert names == ["blocks.0.attn1", "blocks.1.attn1", "transformer_2.blocks.0.attn1", "transformer_2.blocks.1.attn1"]
    seen = []
    with AttentionTaps(pipe, ["blocks.0.attn1", "transformer_2.blocks.0.attn1"],
                       lambda c: seen.append((c.layer, c.call_index, c.layout.image_size))):
        run(pipe.transformer, wan_inputs())
        run(pipe.transformer_2, wan_inputs())
    assert seen == [("blocks.0.attn1", 0, (64, 64)), ("transformer_2.blocks.0.attn1", 1, (64, 64))]
    assert_clean(pipe.transformer)
    assert_clean(pipe.transformer_2)


def test_taps_entered_before_extended_attention_still_see_per_image_tensors():
    s = Setup("unet_extended")
    seen = {}

    def record(order):
        return lambda c: seen.setdefault(order, []).append((c.layout, c.q.clone(), c.out.clone())) and None

    with extended_attention(s.model, 2), AttentionTaps(s.model, None, record("extended first")):
        first = run(s.model, s.inputs)
    with AttentionTaps(s.model, None, record("taps first")), extended_attention(s.model, 2):
        second = run(s.model, s.inputs)
    # exact: same computation twice (the nesting order changes which wrapper is outermost, not the kernel calls)
    assert torch.equal(first, second)
    for (la, qa, oa), (lb, qb, ob) in zip(seen["extended first"], seen["taps first"], strict=True):
        assert la == lb and la.num_images == 2
        assert torch.equal(qa, qb) and torch.equal(oa, ob)
    assert_clean(s.model)


def test_a_processor_without_a_supported_kernel_call_is_reported():
    from diffusers.models.attention_processor import AttnProcessor

    unet = tiny_unet()
    unet.set_attn_processor(AttnProcessor())  # computes attention with baddbmm, no SDPA call
    with pytest.raises(CorrlabError, match="scaled_dot_product_attention"):
        with AttentionTaps(unet, None, lambda c: None):
            run(unet, unet_inputs())
    assert_clean(unet)
