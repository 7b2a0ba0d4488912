"""Configuration of the latent VLA (`LAPAForActionPrediction`)."""

from __future__ import annotations

import numbers

from transformers import AutoConfig, PretrainedConfig

from .modeling_lwm import LWMConfig
from .vqgan_lwm import LWMVQGANConfig

# Backbone families we build and test. Each entry says where the family keeps its vision tower and whether its
# forward wants one image axis per sample ((B, N_images, 3, H, W)) rather than (B, 3, H, W).
# "lwm" is the authors' own backbone (LWMForCausalLM, a text model over text + VQGAN-code + latent + action ids): its
# image encoder is LWM's VQGAN, held by LAPAForActionPrediction itself (`model.vqgan`), whose codes become tokens.
BACKBONE_FAMILIES: dict[str, dict] = {
    "llava": dict(vision_module="vision_tower", images_axis=False),
    "paligemma": dict(vision_module="vision_tower", images_axis=False),
    "idefics3": dict(vision_module="vision_model", images_axis=True),
    "smolvlm": dict(vision_module="vision_model", images_axis=True),
    "lwm": dict(vision_module=None, images_axis=False),
}


def count_image_tokens(backbone_config: PretrainedConfig, vqgan_config: LWMVQGANConfig | None = None) -> int:
    """Number of placeholder tokens one square image takes in the prompt of this backbone (one image, no tiling).

    For "lwm" these are the VQGAN's codes (16 x 16 = 256 for LWM's VQGAN; the end-of-vision and `</vision>` tokens
    around them are ordinary prompt tokens, not placeholders)."""
    family = backbone_config.model_type
    if family == "lwm":
        vqgan_config = vqgan_config if vqgan_config is not None else LWMVQGANConfig()
        return (vqgan_config.resolution // vqgan_config.downsample_factor) ** 2
    vision = backbone_config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    if family == "llava":
        strategy = backbone_config.vision_feature_select_strategy
        # "full" keeps the CLS token of CLIP-like towers; "default" drops it.
        return patches + (1 if strategy == "full" else 0)
    if family in ("idefics3", "smolvlm"):
        return patches // (backbone_config.scale_factor**2)
    if family == "paligemma":
        return patches
    raise ValueError(f"unsupported backbone family {family!r}; supported: {sorted(BACKBONE_FAMILIES)}")


def tiny_backbone_config(family: str = "llava", image_size: int = 32, patch_size: int = 8, hidden_size: int = 64,
                         num_layers: int = 2, vocab_size: int = 512, vision_hidden_size: int = 32,
                         vision_num_layers: int = 2) -> PretrainedConfig:
    """A tiny random-init backbone config of `family`, built in code (tests, CPU runs). The text vocabulary is set
    later from the processor (`LAPAConfig.from_processor`). The vision encoder is `vision_num_layers` layers of width
    `vision_hidden_size` (a multiple of 32; 2 heads up to 64, then one head per 32)."""
    if vision_hidden_size < 32 or vision_hidden_size % 32:
        raise ValueError(f"vision_hidden_size must be a positive multiple of 32, got {vision_hidden_size}")
    vision = dict(hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size,
                  num_hidden_layers=vision_num_layers, num_attention_heads=max(2, vision_hidden_size // 32),
                  image_size=image_size, patch_size=patch_size)
    text = dict(model_type="llama", vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=512, tie_word_embeddings=False)
    if family == "llava":
        return AutoConfig.for_model(
            "llava", vision_config=dict(model_type="clip_vision_model", **vision), text_config=text,
            vision_feature_layer=-1, vision_feature_select_strategy="default", image_token_id=vocab_size - 1,
            tie_word_embeddings=False,
        )
    if family == "idefics3":
        return AutoConfig.for_model(
            "idefics3", vision_config=vision, text_config=text, scale_factor=2, image_token_id=vocab_size - 1,
            tie_word_embeddings=False,
        )
    raise ValueError(f"no tiny config for backbone family {family!r}; choose 'llava' or 'idefics3'")


def check_action_chunk_size(value) -> int:
    """k must be a positive int (not a bool): the number of future actions one prediction holds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"action_chunk_size must be an integer >= 1 (actions per prediction), got {value!r}")
    return int(value)


class LAPAConfig(PretrainedConfig):
    r"""
    Configuration of [`LAPAForActionPrediction`]: a transformers vision-language backbone whose vocabulary holds
    |C| latent-action tokens and N action-bin tokens after the text vocabulary (see the design's token design).

    Args:
        backbone_config (`PretrainedConfig` or `dict`): config of the vision-language backbone (an
            image-text-to-text model: LLaVA-style, Idefics3/SmolVLM, PaliGemma). Its text vocabulary must already
            include the new tokens (`LAPAConfig.from_processor` sets it).
        num_latent_codes (`int`, defaults to 8): |C|, the quantizer's codebook size.
        latent_sequence_length (`int`, defaults to 4): s, latent codes per action.
        num_action_bins (`int`, defaults to 256): N, bins per action dimension.
        action_dim (`int`, defaults to 7): D, default action dimension (the processor's fitted statistics decide
            the dimension of each dataset at prediction time).
        latent_token_offset (`int`): id of `<latent_0>`; latent code k is id `latent_token_offset + k`.
        action_token_offset (`int`): id of `<action_0>`; bin b is id `action_token_offset + b`.
        image_token_id (`int`): the backbone's image placeholder id.
        num_image_tokens (`int`): placeholders one image takes in the prompt.
        freeze_vision_encoder (`bool`, defaults to True): keep the vision tower frozen (the paper freezes it).
        vqgan_config (`LWMVQGANConfig` or `dict`, *optional*): the image tokenizer of the "lwm" backbone family
            (default: LWM's released VQGAN); unused by the other families.
        action_chunk_size (`int`, defaults to 1): k, the actions predicted per call (action chunking): the action
            target block is k x D action tokens, time-major (the D tokens of step t, then those of t + 1, ...). 1 is
            the paper's single-step policy; a config saved before chunking existed has no entry and loads as 1.
            The processor must use the same k (`LAPAProcessor(action_chunk_size=k)`); `predict_action` checks it.
    """

    model_type = "lapa"
    sub_configs = {"backbone_config": AutoConfig, "vqgan_config": LWMVQGANConfig}

    def __init__(
        self,
        backbone_config: PretrainedConfig | dict | None = None,
        num_latent_codes: int = 8,
        latent_sequence_length: int = 4,
        num_action_bins: int = 256,
        action_dim: int = 7,
        latent_token_offset: int | None = None,
        action_token_offset: int | None = None,
        image_token_id: int | None = None,
        num_image_tokens: int | None = None,
        freeze_vision_encoder: bool = True,
        vqgan_config: LWMVQGANConfig | dict | None = None,
        action_chunk_size: int = 1,
        **kwargs,
    ):
        check_action_chunk_size(action_chunk_size)
        if isinstance(backbone_config, dict):
            backbone_config = dict(backbone_config)
            model_type = backbone_config.pop("model_type", None)
            if model_type is None:
                raise ValueError("backbone_config needs a `model_type` (e.g. 'llava', 'idefics3', 'lwm')")
            if model_type == LWMConfig.model_type:  # known here even where AutoConfig has not registered it
                backbone_config = LWMConfig(**backbone_config)
            else:
                backbone_config = AutoConfig.for_model(model_type, **backbone_config)
        if isinstance(vqgan_config, dict):
            vqgan_config = LWMVQGANConfig(**{k: v for k, v in vqgan_config.items() if k != "model_type"})
        if vqgan_config is None and backbone_config is not None and backbone_config.model_type == "lwm":
            vqgan_config = LWMVQGANConfig()
        self.backbone_config = backbone_config
        self.vqgan_config = vqgan_config
        self.num_latent_codes = num_latent_codes
        self.latent_sequence_length = latent_sequence_length
        self.num_action_bins = num_action_bins
        self.action_dim = action_dim
        self.latent_token_offset = latent_token_offset
        self.action_token_offset = action_token_offset
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.freeze_vision_encoder = freeze_vision_encoder
        self.action_chunk_size = int(action_chunk_size)
        super().__init__(**kwargs)
        if backbone_config is not None:
            self._validate()

    # -- helpers -----------------------------------------------------------------------------------------------------
    @property
    def backbone_family(self) -> str:
        return self.backbone_config.model_type

    @property
    def text_vocab_size(self) -> int:
        text = getattr(self.backbone_config, "text_config", None) or self.backbone_config
        return text.vocab_size

    def get_text_config(self, *args, **kwargs) -> PretrainedConfig:
        """The backbone's text (decoder) config: what `generate` sizes its KV cache from."""
        if self.backbone_config is None:
            return super().get_text_config(*args, **kwargs)
        return self.backbone_config.get_text_config(*args, **kwargs)

    def _validate(self) -> None:
        family = self.backbone_config.model_type
        if family not in BACKBONE_FAMILIES:
            raise ValueError(f"unsupported backbone family {family!r}; supported: {sorted(BACKBONE_FAMILIES)}")
        for name in ("latent_token_offset", "action_token_offset", "image_token_id", "num_image_tokens"):
            if getattr(self, name) is None:
                raise ValueError(f"LAPAConfig.{name} is not set; build the config with LAPAConfig.from_processor")
        vocab = self.text_vocab_size
        latent_end = self.latent_token_offset + self.num_latent_codes
        action_end = self.action_token_offset + self.num_action_bins
        if max(latent_end, action_end) > vocab:
            raise ValueError(
                f"the backbone's text vocabulary ({vocab}) does not hold the new tokens (latent ids up to "
                f"{latent_end - 1}, action ids up to {action_end - 1}); set it to the processor's vocab size"
            )
        if not (latent_end <= self.action_token_offset or action_end <= self.latent_token_offset):
            raise ValueError("latent-action and action-bin token ids overlap")
        if family == "lwm":
            self._validate_lwm()
        backbone_image_id = getattr(self.backbone_config, "image_token_id", None)
        if backbone_image_id is not None and backbone_image_id != self.image_token_id:
            raise ValueError(
                f"image_token_id {self.image_token_id} differs from the backbone's image_token_id {backbone_image_id}"
            )
        expected = count_image_tokens(self.backbone_config, self.vqgan_config)
        if expected != self.num_image_tokens:
            raise ValueError(
                f"num_image_tokens={self.num_image_tokens} but the {family} backbone turns one image into {expected} "
                "tokens; build the processor with that count"
            )

    def _validate_lwm(self) -> None:
        """The LWM backbone's vocabulary blocks fix the latent/action offsets; the image placeholder must be a vision
        id the VQGAN never emits (the model replaces it with the codes)."""
        lwm = self.backbone_config
        for name, ours, theirs in (
            ("latent_token_offset", self.latent_token_offset, lwm.latent_token_offset),
            ("num_latent_codes", self.num_latent_codes, lwm.latent_vocab_size),
            ("action_token_offset", self.action_token_offset, lwm.action_token_offset),
            ("num_action_bins", self.num_action_bins, lwm.action_vocab_size),
        ):
            if ours != theirs:
                raise ValueError(f"{name}={ours} but the LWM backbone's vocabulary says {theirs}")
        vision = lwm.block_slices()["vision"]
        codes = self.vqgan_config.num_embeddings
        if not (vision.start + codes <= self.image_token_id < vision.stop) or self.image_token_id in (
                lwm.end_of_frame_token_id, lwm.end_of_vision_token_id):
            raise ValueError(
                f"image_token_id {self.image_token_id} must be an unused vision id (in [{vision.start + codes}, "
                f"{vision.stop}) and not end-of-frame/end-of-vision)"
            )
        if codes > lwm.end_of_frame_code:
            raise ValueError(
                f"the VQGAN's {codes} codes overlap the vision markers (end-of-frame {lwm.end_of_frame_code})"
            )

    @classmethod
    def from_processor(cls, backbone_config: PretrainedConfig, processor, **kwargs) -> "LAPAConfig":
        """Config for `backbone_config` with the token layout of a `LAPAProcessor` (vocab size, offsets, image token).

        The backbone's text vocabulary and image-token id are set to the processor's. An "lwm" backbone's combined
        vocabulary is fixed by its blocks instead: it must equal the processor's (an `LWMProcessor`)."""
        if backbone_config.model_type == "lwm":
            if processor.vocab_size != backbone_config.vocab_size:
                raise ValueError(f"the processor's vocabulary ({processor.vocab_size}) differs from the LWM backbone's "
                                 f"({backbone_config.vocab_size})")
        else:
            backbone_config = backbone_config.__class__.from_dict(backbone_config.to_dict())  # a copy
            text = getattr(backbone_config, "text_config", None) or backbone_config
            text.vocab_size = processor.vocab_size
            text.pad_token_id = processor.tokenizer.pad_token_id
            backbone_config.image_token_id = processor.image_token_id
        return cls(
            backbone_config=backbone_config,
            num_latent_codes=processor.num_latent_codes,
            latent_sequence_length=processor.latent_sequence_length,
            num_action_bins=processor.num_action_bins,
            latent_token_offset=processor.latent_token_offset,
            action_token_offset=processor.action_token_offset,
            image_token_id=processor.image_token_id,
            num_image_tokens=processor.num_image_tokens,
            pad_token_id=processor.tokenizer.pad_token_id,
            **{"action_chunk_size": getattr(processor, "action_chunk_size", 1), **kwargs},
        )


__all__ = ["LAPAConfig", "BACKBONE_FAMILIES", "check_action_chunk_size", "count_image_tokens", "tiny_backbone_config"]
