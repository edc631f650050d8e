"""corrlab's multi-view UNet pipeline: views as batch entries, joint self-attention through corrlab's processor."""
from __future__ import annotations

from diffusers import StableDiffusionPipeline

from .errors import CorrlabError

__all__ = ["MultiViewUNetPipeline"]


class MultiViewUNetPipeline(StableDiffusionPipeline):
    """A ``StableDiffusionPipeline`` generating ``num_views`` mutually attending views per prompt.

    Every ``attn1`` (self-attention) layer of the UNet runs a
    :class:`~corrlab.probing.extended_attention.MultiViewAttnProcessor`: hidden states ``(B*V, h*w, C)``,
    the V consecutive batch entries of a prompt attend jointly. ``num_views`` is part of the pipeline's
    config (saved in ``model_index.json``), so ``save_pretrained`` / ``from_pretrained`` round-trip it.
    ``__call__`` takes the ordinary ``StableDiffusionPipeline`` arguments; ``num_images_per_prompt``
    defaults to (and must be a multiple of) ``num_views``.
    """

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None, feature_extractor=None,
                 image_encoder=None, requires_safety_checker: bool = False, num_views: int = 4):
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor,
                         image_encoder, requires_safety_checker=requires_safety_checker)
        from .probing.extended_attention import multiview_attention_processors

        self.register_to_config(num_views=int(num_views))
        self.unet.set_attn_processor(multiview_attention_processors(self.unet, int(num_views)))

    @property
    def num_views(self) -> int:
        return int(self.config.num_views)

    def __call__(self, *args, num_images_per_prompt: int | None = None, **kwargs):
        n = self.num_views if num_images_per_prompt is None else num_images_per_prompt
        if not isinstance(n, int) or n < 1 or n % self.num_views:
            raise CorrlabError(
                f"num_images_per_prompt: expected a positive multiple of num_views = {self.num_views}, got {n!r}"
            )
        return super().__call__(*args, num_images_per_prompt=n, **kwargs)
