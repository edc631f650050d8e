"""Complete tiny diffusers pipelines with random weights, built offline from configs (tests, CI, notebook 5).

>>> from corrlab.tiny_pipelines import build_tiny_pipelines
>>> paths = build_tiny_pipelines("out/tiny")     # {"wan": ..., "flux": ..., "sd": ..., "unet_mv": ...}  # doctest: +SKIP
>>> pipe = corrlab.load_pipeline(paths["wan"])                                                   # doctest: +SKIP

Every component is real: ``WanPipeline`` (``WanTransformer3DModel``, ``AutoencoderKLWan``, a
``UMT5EncoderModel`` from a ``UMT5Config``), ``FluxPipeline`` (``FluxTransformer2DModel``, ``AutoencoderKL``,
``CLIPTextModel``, ``T5EncoderModel``), ``StableDiffusionPipeline`` (``UNet2DConditionModel``,
``AutoencoderKL``, ``CLIPTextModel``) and corrlab's :class:`~corrlab.pipelines.MultiViewUNetPipeline`. The
tokenizers are word-level vocabularies built with the ``tokenizers`` library and wrapped in
``transformers.PreTrainedTokenizerFast`` (nothing is downloaded). Weights are seeded; each pipeline is
saved with ``save_pretrained`` (safetensors) so it loads back exactly as a user's would.

Sizes (:data:`TINY_CALL` holds call arguments that fit them): Wan 64 x 64 px, 9 frames -> 3 latent frames
of 4 x 4 tokens; Flux 32 x 32 px -> 8 x 8 tokens; SD / multi-view UNet 16 x 16 px -> 8 x 8 latent tokens at
the highest UNet level.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["TINY_KINDS", "TINY_CALL", "tiny_tokenizer", "build_tiny_pipeline", "build_tiny_pipelines"]

TINY_KINDS = ("wan", "flux", "sd", "unet_mv")

#: keyword arguments of each tiny pipeline's ``__call__`` that fit its sizes (add prompt, steps, generator)
TINY_CALL: dict[str, dict[str, Any]] = {
    "wan": dict(height=64, width=64, num_frames=9, max_sequence_length=16, guidance_scale=1.0),
    "flux": dict(height=32, width=32, max_sequence_length=16, guidance_scale=1.0),
    "sd": dict(height=16, width=16, guidance_scale=2.0),
    "unet_mv": dict(height=16, width=16, guidance_scale=2.0),
}

_WORDS = (
    "a an the of and with on in at around over under near to from by is are view aerial close up shot photo "
    "red orange yellow green cyan blue purple pink white black grey gray brown "
    "striped checkered dotted plain sphere box cylinder cone cube ball object car road roundabout "
    "driving moving rotating turning spinning flying walking running cat dog person tree house sky street "
    "city field water mountain table chair lamp robot toy wooden metal glass small large big tiny bright dark"
).split()


def tiny_tokenizer(max_length: int, template: str = "$A </s>"):
    """A word-level ``PreTrainedTokenizerFast`` (lower-cased, split on whitespace and punctuation).

    Ids: ``<pad>`` 0, ``<unk>`` 1, ``</s>`` 2, ``<s>`` 3, then the words. ``template`` is the single-sequence
    post-processor (``"$A </s>"`` T5-style, ``"<s> $A </s>"`` CLIP-style).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "</s>", "<s>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(_WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("</s>", 2), ("<s>", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>", bos_token="<s>",
        model_max_length=max_length,
    )


def _vocab_size() -> int:
    return 4 + len(set(_WORDS))


def _seeded(seed: int, make: Callable[[], Any]) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = make()
    return out.eval() if isinstance(out, torch.nn.Module) else out


def _clip(seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=_vocab_size(), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, projection_dim=16, pad_token_id=0, eos_token_id=2, bos_token_id=3,
    )
    return _seeded(seed, lambda: CLIPTextModel(cfg)), tiny_tokenizer(16, "<s> $A </s>")


def _t5(seed: int, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    kw = dict(
        vocab_size=_vocab_size(), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0, eos_token_id=2,
        decoder_start_token_id=0,
    )
    model = _seeded(seed, lambda: UMT5EncoderModel(UMT5Config(**kw)) if umt5 else T5EncoderModel(T5Config(**kw)))
    return model, tiny_tokenizer(512)


def tiny_wan(seed: int = 0):
    """A ``WanPipeline``: 2-block ``WanTransformer3DModel``, ``AutoencoderKLWan`` (8x spatial, 4x temporal)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    transformer = _seeded(seed, lambda: WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ))
    vae = _seeded(seed + 1, lambda: AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
    ))
    text_encoder, tokenizer = _t5(seed + 2, umt5=True)
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer)


def tiny_flux(seed: int = 0):
    """A ``FluxPipeline``: 1 joint + 1 single block, ``AutoencoderKL`` (2x), CLIP + T5 text encoders."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    transformer = _seeded(seed, lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
    ))
    vae = _seeded(seed + 1, lambda: AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1, latent_channels=4,
        norm_num_groups=4, sample_size=32, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
        scaling_factor=1.5035,
    ))
    clip, clip_tok = _clip(seed + 2)
    t5, t5_tok = _t5(seed + 3)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip, tokenizer=clip_tok,
                        text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)


def _sd_parts(seed: int):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    unet = _seeded(seed, lambda: UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
    ))
    vae = _seeded(seed + 1, lambda: AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1, latent_channels=4,
        norm_num_groups=4, sample_size=16,
    ))
    clip, tok = _clip(seed + 2)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1,
                              set_alpha_to_one=False)
    return dict(vae=vae, text_encoder=clip, tokenizer=tok, unet=unet, scheduler=scheduler)


def tiny_sd(seed: int = 0):
    """A ``StableDiffusionPipeline`` (no safety checker) with a 2-level ``UNet2DConditionModel``."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**_sd_parts(seed), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def tiny_unet_mv(seed: int = 0, num_views: int = 4):
    """corrlab's :class:`~corrlab.pipelines.MultiViewUNetPipeline` (views = batch entries, ``num_views`` each)."""
    from .multiview_unet import MultiViewUNetPipeline

    return MultiViewUNetPipeline(**_sd_parts(seed), num_views=num_views)


_BUILDERS = {"wan": tiny_wan, "flux": tiny_flux, "sd": tiny_sd, "unet_mv": tiny_unet_mv}


def build_tiny_pipeline(kind: str, seed: int = 0):
    """One tiny pipeline object (not saved); ``kind`` in :data:`TINY_KINDS`."""
    from .errors import check_choice

    check_choice("kind", kind, TINY_KINDS)
    return _BUILDERS[kind](seed)


def build_tiny_pipelines(out: str | os.PathLike, kinds=TINY_KINDS, seed: int = 0) -> dict[str, Path]:
    """Build and ``save_pretrained`` each tiny pipeline into ``out/<kind>``; returns ``{kind: folder}``.

    A folder is written to a temporary sibling first and renamed when complete, so an interrupted build
    never leaves a half-written pipeline behind; an existing complete folder is replaced.
    """
    import shutil
    import tempfile

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind in kinds:
        pipe = build_tiny_pipeline(kind, seed)
        tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=root))
        try:
            pipe.save_pretrained(tmp, safe_serialization=True)
            final = root / kind
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        paths[kind] = final
    return paths
