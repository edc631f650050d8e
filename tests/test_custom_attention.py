"""Worked examples: probes and CorrAdapter on the attention real multi-view models use.

1. A tiny SDXL-style UNet (text_time added conditioning, no attention at the finest level) whose decoder
   self-attention is corrlab's row-wise multi-view processor (MV-Adapter's design: view i's row y attends to
   row y of every view; query length w, key length V*w).
2. An ldm-style ``CrossAttention`` (to_q / to_k / to_v, einsum, softmax, no SDPA call: SyncDreamer's kind),
   written here, registered through corrlab's extension point (:mod:`corrlab.probing.custom`).

Each: bit-identity with the adapter at eta = 1, restoration, and a known shift between the views recovered
by the probe and by the adapter. The shift is exact by construction: with circular padding the UNet is
equivariant to horizontal rolls by multiples of 4 latent pixels, and the ldm model (no positional encoding)
to any roll; q = k = G * LayerNorm(h) at the matched layer then makes the true partner the unique best match
(equal norms, so the dot product peaks at the identical feature).
"""
from __future__ import annotations


import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn

import corrlab
from corrlab.errors import CorrlabError, ShapeError
from corrlab.interventions import CorrAdapterConfig, corr_adapter, default_adapter_layers
from corrlab.probing import AttentionTaps, TokenLayout, list_layers
from corrlab.probing.custom import Family, ImageTokens, register_attention_module, register_family
from corrlab.probing.custom import unregister_attention_module, unregister_family
from corrlab.probing.row_attention import RowWiseMultiViewAttnProcessor, row_wise_attention_processors


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


def assert_no_hooks(model: nn.Module) -> None:
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, f"hooks left on {name!r}"


# =============================================================================== 1. row-wise SDXL-style UNet
V_UNET, LATENT = 3, (8, 16)
UNET_SHIFTS = (0, 4, 8)  # latent columns; tokens at up_blocks.1 (8 columns): 0, 2, 4
ROW_LAYER = "up_blocks.1.attentions.0.transformer_blocks.0.attn1"


def tiny_sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    unet = UNet2DConditionModel(
        sample_size=LATENT, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4,
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for m in unet.modules():  # circular padding: rolls by multiples of 4 latent pixels commute with the UNet
            if isinstance(m, nn.Conv2d) and m.padding != (0, 0):
                m.padding_mode = "circular"
        block = unet.get_submodule(ROW_LAYER.rsplit(".", 1)[0])
        block.norm1.weight.fill_(1.0)
        block.norm1.bias.zero_()
        eye = 3.0 * torch.eye(block.attn1.to_q.weight.shape[0])
        block.attn1.to_q.weight.copy_(eye)
        block.attn1.to_k.weight.copy_(eye)
    unet.set_attn_processor(row_wise_attention_processors(unet, V_UNET, latent_size=LATENT))
    return unet.eval()


def unet_inputs(t: int = 500, seed: int = 1) -> dict:
    """A CFG-sized batch of 2 sets of V views; view j is view 0 rolled by UNET_SHIFTS[j] latent columns."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(2, 1, 4, *LATENT, generator=g)
    views = torch.cat([base.roll(s, dims=-1) for s in UNET_SHIFTS], dim=1).flatten(0, 1)  # (2*V, 4, h, w)
    return dict(
        sample=views, timestep=torch.tensor(t),
        encoder_hidden_states=torch.randn(2, 1, 3, 16, generator=g).expand(2, V_UNET, 3, 16).flatten(0, 1),
        added_cond_kwargs={"text_embeds": torch.randn(2, 1, 8, generator=g).expand(2, V_UNET, 8).flatten(0, 1),
                           "time_ids": torch.zeros(2 * V_UNET, 6)},
        return_dict=False,
    )


def run_unet(unet, steps=(900, 600, 300)) -> list[torch.Tensor]:
    with torch.no_grad():
        return [unet(**unet_inputs(t))[0] for t in steps]


@pytest.fixture(scope="module")
def unet():
    return tiny_sdxl_unet()


def test_row_wise_layers_are_found_and_the_default_is_the_finest_decoder_level(unet):
    seen = {}

    def record(call):
        seen[call.layer] = (call.layout, tuple(call.q.shape), tuple(call.k.shape))

    with AttentionTaps(unet, None, record):
        run_unet(unet, steps=(500,))
    layout, qs, ks = seen[ROW_LAYER]
    assert layout == TokenLayout(V_UNET, (4, 8), LATENT, row_wise=True)
    assert qs == ks == (2, V_UNET, 2 * 2, 32, 4)  # (B, V, heads, h*w, d): the row-wise call read back per view
    assert not seen["down_blocks.1.attentions.0.transformer_blocks.0.attn1"][0].row_wise  # encoder: untouched
    # MV-Adapter's release adapts up_blocks.1 only: corrlab's default is the finest multi-image decoder level
    assert default_adapter_layers(unet) == [
        "up_blocks.1.attentions.0.transformer_blocks.0.attn1", "up_blocks.1.attentions.1.transformer_blocks.0.attn1"]
    assert_no_hooks(unet)


def test_row_wise_tokens_read_back_what_the_processor_computed(unet):
    """q, k, v of the row-wise kernel call, read back per view, are the layer's own projections."""
    attn = unet.get_submodule(ROW_LAYER)
    inputs = {}
    handle = attn.register_forward_pre_hook(lambda m, args, kwargs: inputs.update(h=args[0] if args else kwargs["hidden_states"]),
                                            with_kwargs=True)
    got = {}
    try:
        with AttentionTaps(unet, [ROW_LAYER], lambda c: got.update(q=c.q.clone(), k=c.k.clone(), v=c.v.clone())):
            run_unet(unet, steps=(500,))
    finally:
        handle.remove()
    hs = inputs["h"]  # (B*V, h*w, C)
    for name, proj in (("q", attn.to_q), ("k", attn.to_k), ("v", attn.to_v)):
        x = proj(hs).view(2, V_UNET, 32, attn.heads, -1).transpose(2, 3)
        torch.testing.assert_close(got[name], x, rtol=0, atol=1e-6)


def test_adapter_on_row_wise_layout_eta_one_is_bit_identical_and_restores(unet):
    plain = run_unet(unet)
    for config in (CorrAdapterConfig.build(eta=1.0, threshold=0.0, active_steps=None),
                   CorrAdapterConfig.preset("mvadapter", eta=1.0)):
        with corr_adapter(unet, config) as handle:
            same = run_unet(unet)
        assert handle.stats["adapted_calls"] == 3 * len(handle.layers) and handle.stats["kept"] > 0
        assert all(torch.equal(a, b) for a, b in zip(same, plain))
    with corr_adapter(unet, CorrAdapterConfig.preset("mvadapter")) as handle:
        changed = run_unet(unet)
    assert handle.stats["matcher_refreshes"] == 3 * len(handle.layers)  # every call on a row-wise layout
    assert not torch.equal(changed[0], plain[0])
    with pytest.raises(RuntimeError, match="boom"):
        with corr_adapter(unet, eta=0.0, threshold=0.0):
            run_unet(unet, steps=(500,))
            raise RuntimeError("boom")
    assert_no_hooks(unet)
    assert all(torch.equal(a, b) for a, b in zip(run_unet(unet), plain))


def expected_row_match(i: int, j: int, grid: tuple[int, int], token_shifts) -> torch.Tensor:
    h, w = grid
    y, x = torch.arange(h * w) // w, torch.arange(h * w) % w
    return y * w + (x + token_shifts[j] - token_shifts[i]) % w


def test_probe_on_row_wise_layout_recovers_the_known_shift(unet):
    with corrlab.probe(unet, layers=[ROW_LAYER], steps=[0], heads="mean", batch_index=0) as rec:
        run_unet(unet, steps=(500,))
    ds = rec.ds
    assert rec.ds.attrs["row_wise_layers"] == f'["{ROW_LAYER}"]'
    token_shifts = [s // 2 for s in UNET_SHIFTS]
    for i in range(V_UNET):
        for j in range(V_UNET):
            if i == j:
                continue
            row = ds["match_row"].isel(layer=0, step=0, src=i, tgt=j, head=0).values.reshape(-1)
            col = ds["match_col"].isel(layer=0, step=0, src=i, tgt=j, head=0).values.reshape(-1)
            expected = expected_row_match(i, j, (4, 8), token_shifts)
            assert (row == (torch.arange(32) // 8).numpy()).all()  # matches stay on the source row
            assert ((row * 8 + col) == expected.numpy()).mean() > 0.95


class Capture:
    """Outer observer: sees the layer's output after the adapter (attached inside it) replaced it."""

    def __init__(self):
        self.out = self.v = None

    def __call__(self, call):
        self.out, self.v = call.out.clone(), call.v.clone()


def test_adapter_on_row_wise_layout_aggregates_at_the_known_shift(unet):
    """eta = 0, r = 0, all matches kept: the output becomes the matched value, which by the views' shift is
    the view's own value at the same token."""
    cap = Capture()
    with AttentionTaps(unet, [ROW_LAYER], cap):
        with corr_adapter(unet, layers=[ROW_LAYER], eta=0.0, window_radius=0, threshold=0.0, heads="mean", active_steps=None):
            run_unet(unet, steps=(500,))
    close = ((cap.out - cap.v).abs().amax(dim=-1) < 1e-4).float().mean()
    assert close > 0.95
    with AttentionTaps(unet, [ROW_LAYER], cap):
        run_unet(unet, steps=(500,))
    assert ((cap.out - cap.v).abs().amax(dim=-1) < 1e-4).float().mean() < 0.05  # without the adapter: not so


def test_row_wise_processor_is_row_wise_and_rejects_bad_input():
    attn_unet = tiny_sdxl_unet()
    proc = attn_unet.attn_processors[ROW_LAYER + ".processor"]
    assert isinstance(proc, RowWiseMultiViewAttnProcessor) and proc.grid(32) == (4, 8)
    attn = attn_unet.get_submodule(ROW_LAYER)
    x = torch.randn(V_UNET, 32, 16)
    base = proc(attn, x)
    y = x.clone()
    y[1, 8:16] += 1.0  # change row 1 of view 1: rows 0, 2, 3 of every view stay as they were
    changed = (proc(attn, y) - base).abs().amax(dim=-1) > 0
    rows = changed.view(V_UNET, 4, 8).any(dim=-1)
    assert rows[:, 1].all() and not rows[:, [0, 2, 3]].any()
    with pytest.raises(ShapeError, match="hidden_states"):
        proc(attn, torch.randn(V_UNET + 1, 32, 16))
    with pytest.raises(CorrlabError, match="encoder_hidden_states"):
        proc(attn, x, encoder_hidden_states=x)


# =============================================================================== 2. ldm-style CrossAttention
class CrossAttention(nn.Module):
    """ldm-style attention: separate projections, einsum, softmax; no scaled_dot_product_attention call."""

    def __init__(self, query_dim: int, heads: int = 2, dim_head: int = 8):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head ** -0.5
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(query_dim, inner, bias=False)
        self.to_v = nn.Linear(query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        h = self.heads
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)

        def split(t):  # 'b n (h d) -> (b h) n d'
            return t.unflatten(-1, (h, -1)).permute(0, 2, 1, 3).flatten(0, 1)

        q, k, v = split(q), split(k), split(v)
        sim = torch.einsum("b i d, b j d -> b i j", q, k) * self.scale
        attn = sim.softmax(dim=-1)
        out = torch.einsum("b i j, b j d -> b i d", attn, v)
        out = out.unflatten(0, (-1, h)).permute(0, 2, 1, 3).flatten(2)  # '(b h) n d -> b n (h d)'
        return self.to_out(out)


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn1 = CrossAttention(dim)
        self.ff = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, x):
        x = x + self.attn1(self.norm1(x))
        return x + self.ff(x)


class TinyLdmMultiView(nn.Module):
    """V views in one token sequence (multi-view self-attention over all of them), ldm naming."""

    def __init__(self, dim: int = 16, seed: int = 0):
        super().__init__()
        self.time_embed = nn.Linear(1, dim)
        self.input_blocks = nn.ModuleList([Block(dim)])
        self.output_blocks = nn.ModuleList([Block(dim), Block(dim)])
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            attn = self.output_blocks[1].attn1
            attn.to_q.weight.copy_(3.0 * torch.eye(dim))
            attn.to_k.weight.copy_(3.0 * torch.eye(dim))

    def forward(self, x, timesteps):
        B, V, C, h, w = x.shape
        tok = x.permute(0, 1, 3, 4, 2).reshape(B, V * h * w, C) + self.time_embed(timesteps.float().view(-1, 1))[:, None]
        for blk in list(self.input_blocks) + list(self.output_blocks):
            tok = blk(tok)
        return tok.reshape(B, V, h, w, C).permute(0, 1, 4, 2, 3)


class LdmFamily(Family):
    """How corrlab finds TinyLdmMultiView's multi-view layers and their token layout (the extension point)."""

    name = "tiny_ldm"
    timestep_argument = "timesteps"

    def matches(self, model):
        return isinstance(model, TinyLdmMultiView)

    def layers(self, model):
        return [(f"input_blocks.{i}.attn1", b.attn1, self.name) for i, b in enumerate(model.input_blocks)] + [
            (f"output_blocks.{i}.attn1", b.attn1, self.name) for i, b in enumerate(model.output_blocks)]

    def read_forward(self, model, arguments):
        x = arguments["x"]
        return {"views": int(x.shape[1]), "grid": (int(x.shape[3]), int(x.shape[4]))}

    def image_tokens(self, state, q, group_size, scale, kind, k=None):
        h, w = state["grid"]
        return ImageTokens(TokenLayout(state["views"], (h, w), (int(h * scale), int(w * scale))), "sequence")


LDM_GRID, LDM_SHIFTS = (4, 5), ((0, 0), (1, 2), (2, -1))
LDM_LAYER = "output_blocks.1.attn1"


@pytest.fixture
def ldm():
    register_attention_module(CrossAttention, q="to_q", k="to_k", v="to_v", out="to_out", heads="heads", scale="scale")
    family = register_family(LdmFamily())
    try:
        yield TinyLdmMultiView()
    finally:
        unregister_family(family)
        unregister_attention_module(CrossAttention)


def ldm_inputs(t: float, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(2, 1, 16, *LDM_GRID, generator=g)
    x = torch.cat([base.roll(s, dims=(-2, -1)) for s in LDM_SHIFTS], dim=1)  # (B=2, V=3, C, h, w)
    return x, torch.full((2,), t)


def run_ldm(model, steps=(900.0, 600.0, 300.0)):
    with torch.no_grad():
        return [model(*ldm_inputs(t)) for t in steps]


def test_registered_module_is_listed_and_its_taps_see_its_q_k_v(ldm):
    infos = list_layers(ldm)
    assert [i.name for i in infos] == ["input_blocks.0.attn1", "output_blocks.0.attn1", LDM_LAYER]
    assert (infos[0].num_heads, infos[0].head_dim) == (2, 8)
    assert default_adapter_layers(ldm) == [LDM_LAYER]  # one grid everywhere: the last block
    got = {}
    with AttentionTaps(ldm, [LDM_LAYER], lambda c: got.update(q=c.q.clone(), k=c.k.clone(), v=c.v.clone(),
                                                             out=c.out.clone(), scale=c.scale, layout=c.layout,
                                                             t=c.timestep)):
        run_ldm(ldm, steps=(700.0,))
    assert got["layout"] == TokenLayout(3, LDM_GRID, LDM_GRID) and got["t"] == 700.0
    assert got["scale"] == 8 ** -0.5 and got["q"].shape == (2, 3, 2, 20, 8)
    # the tapped output is the attention of the tapped q, k, v over all views' tokens (no kernel call involved)
    q, k, v = (got[n].transpose(1, 2).flatten(2, 3) for n in ("q", "k", "v"))  # (B, heads, V*N, d)
    expected = torch.softmax(q @ k.transpose(-1, -2) * got["scale"], dim=-1) @ v
    torch.testing.assert_close(got["out"], expected.unflatten(2, (3, 20)).transpose(1, 2), rtol=0, atol=1e-5)
    assert_no_hooks(ldm)


def test_registered_module_eta_one_is_bit_identical_and_restores(ldm):
    plain = run_ldm(ldm)
    with corr_adapter(ldm, eta=1.0, threshold=0.0, active_steps=None) as handle:
        same = run_ldm(ldm)
    assert handle.stats["adapted_calls"] == 3 and handle.stats["kept"] > 0
    assert all(torch.equal(a, b) for a, b in zip(same, plain))
    with corr_adapter(ldm, CorrAdapterConfig.preset("syncdreamer", num_steps=3)) as handle:
        changed = run_ldm(ldm)
    assert handle.stats["matcher_refreshes"] == 2  # steps 0 and the last step 2 (refresh_every 5)
    assert not torch.equal(changed[0], plain[0])
    with pytest.raises(RuntimeError, match="boom"):
        with corr_adapter(ldm, eta=0.0, threshold=0.0):
            run_ldm(ldm, steps=(500.0,))
            raise RuntimeError("boom")
    assert_no_hooks(ldm)
    assert all(torch.equal(a, b) for a, b in zip(run_ldm(ldm), plain))


def test_probe_on_registered_module_recovers_the_known_shift(ldm):
    with corrlab.probe(ldm, layers=[LDM_LAYER], steps=[0], heads="mean", batch_index=1) as rec:
        run_ldm(ldm, steps=(500.0,))
    ds = rec.ds
    h, w = LDM_GRID
    for i in range(3):
        for j in range(3):
            if i == j:
                continue
            dy, dx = LDM_SHIFTS[j][0] - LDM_SHIFTS[i][0], LDM_SHIFTS[j][1] - LDM_SHIFTS[i][1]
            row = ds["match_row"].isel(layer=0, step=0, src=i, tgt=j, head=0).values
            col = ds["match_col"].isel(layer=0, step=0, src=i, tgt=j, head=0).values
            yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            ok = (row == ((yy + dy) % h).numpy()) & (col == ((xx + dx) % w).numpy())
            assert ok.mean() > 0.95


def test_adapter_on_registered_module_aggregates_at_the_known_shift(ldm):
    cap = Capture()
    with AttentionTaps(ldm, [LDM_LAYER], cap):
        with corr_adapter(ldm, layers=[LDM_LAYER], eta=0.0, window_radius=0, threshold=0.0, heads="mean", active_steps=None):
            run_ldm(ldm, steps=(500.0,))
    assert ((cap.out - cap.v).abs().amax(dim=-1) < 1e-4).float().mean() > 0.95
    with AttentionTaps(ldm, [LDM_LAYER], cap):
        run_ldm(ldm, steps=(500.0,))
    assert ((cap.out - cap.v).abs().amax(dim=-1) < 1e-4).float().mean() < 0.05


def test_unregistered_module_is_not_a_layer_and_bad_specs_raise():
    model = TinyLdmMultiView()
    with pytest.raises(CorrlabError, match="model_or_pipeline"):
        list_layers(model)
    with pytest.raises(CorrlabError, match="module_type"):
        register_attention_module(int)
    with pytest.raises(CorrlabError, match="family"):
        register_family(object())
    register_attention_module(CrossAttention, out="missing")
    family = register_family(LdmFamily())
    try:
        with pytest.raises(CorrlabError, match="missing"):
            with AttentionTaps(model, [LDM_LAYER], lambda c: None):
                pass
        assert_no_hooks(model)
    finally:
        unregister_family(family)
        unregister_attention_module(CrossAttention)


# =============================================================================== epipolar scoring of row-wise layers
def row_wise_record(num_images: int = 3):
    from corrlab.probing import ProbeRecord, RecordBuilder

    builder = RecordBuilder({"similarity": "softmax"}, batch_index=0)
    layout = TokenLayout(num_images, (4, 4), (64, 64), row_wise=True)
    builder.add_layer("rows", layout.grid, 1, layout.token_centres(), layout.image_size, row_wise=True)
    for i in range(num_images):
        tgts = [j for j in range(num_images) if j != i]
        index = torch.arange(16).repeat(1, len(tgts), 1)
        builder.add("rows", 0, 1.0, i, tgts, index, torch.ones(index.shape), torch.ones(index.shape, dtype=torch.bool),
                    num_images)
    return ProbeRecord(builder=builder)


def test_scoring_a_row_wise_layer_knows_the_row_constraint():
    import warnings

    from corrlab.evaluation.native import RowConstraintWarning, rows_are_epipolar, score_record
    from corrlab.scenes.cameras import orbit_camera

    ortho = [orbit_camera(a, 0.0, 2.0, 64, model="orthographic") for a in (0, 45, 90)]
    persp = [orbit_camera(a, 0.0, 2.0, 64) for a in (0, 45, 90)]
    elevated = [orbit_camera(a, 20.0, 2.0, 64, model="orthographic") for a in (0, 45, 90)]
    assert rows_are_epipolar(ortho) and not rows_are_epipolar(persp) and not rows_are_epipolar(elevated)
    rec = row_wise_record()
    with pytest.warns(RowConstraintWarning, match="orthographic views at elevation 0"):
        df = score_record(rec, cameras=persp)
    assert df.attrs["row_wise_layers"] == ["rows"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RowConstraintWarning)
        score_record(rec, cameras=ortho)
