"""The latent VLA: a transformers vision-language backbone that predicts latent actions, then robot actions.

Token design (see the project's design notes): the |C| latent-action tokens `<latent_k>` and the N action-bin
tokens `<action_b>` are ordinary tokens after the backbone's text vocabulary. A prompt is

    [bos] <image> x num_image_tokens  "What action should the robot take to {instruction}?"  t_1 ... t_K

(left-padded; for Idefics3/SmolVLM the image part is wrapped as that backbone's own processor wraps one image:
`<fake_token_around_image> <global-img> <image> x n <fake_token_around_image>`), with K = s latent tokens (latent pretraining) or k x D action tokens (action finetuning: k =
`config.action_chunk_size` future actions, time-major; k = 1, one action, is the paper's setting). At a latent
target the loss and the decoding are a softmax over the |C| latent rows of the output matrix only, at an action
target over the N action rows only: exactly the paper's separate latent and action heads, while the checkpoint stays
an ordinary image-text-to-text model.

The "lwm" family is the authors' own model (LAPA-7B): the backbone is `LWMForCausalLM`, a text model over one
combined vocabulary (text | VQGAN codes | latent | action), and the image encoder is LWM's VQGAN, held here as
`self.vqgan`. Its prompt (`LWMProcessor`) has 256 image placeholders inside the authors' vision block; `forward`
encodes the pixels to codes and writes them, offset into the vision block, over the placeholders. Everything after
that (block loss, cached block decoding, prediction) is shared with the other families.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForImageTextToText, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_lapa import BACKBONE_FAMILIES, LAPAConfig
from .loading import StrictLoadingMixin
from .modeling_lwm import LWMForCausalLM
from .transformers_compat import accepts_either_cache_name, cache_kwargs, cache_of
from .vqgan_lwm import LWMVQGANModel


@dataclass
class LAPAOutput(CausalLMOutputWithPast):
    """
    The backbone's causal-LM output (its KV cache under the installed transformers' name for it: `cache` from 5.24
    on, `past_key_values` before; see `transformers_compat`), plus:

    Args:
        loss (`torch.FloatTensor`, *optional*): mean cross-entropy over the target tokens, each a softmax over its
            own block (latent or action ids).
        logits (`torch.FloatTensor` (B, L', V)): next-token logits over the whole vocabulary. With labels, only the
            last L' positions (from the one before the first target to the end) are computed.
        target_accuracy (`torch.FloatTensor`, *optional*): fraction of target tokens whose block argmax is right.
        num_target_tokens (`torch.LongTensor`, *optional*): number of target tokens in the batch.
    """

    target_accuracy: torch.FloatTensor | None = None
    num_target_tokens: torch.LongTensor | None = None


def positions_from_mask(attention_mask: torch.Tensor) -> torch.LongTensor:
    """Position ids of a left-padded batch: 0 at each row's first real token (pads get 0 too).

    The LWM authors' sampler gives pads -1 instead (their RoPE table wraps it to the last row); real tokens get the
    same positions either way, and pad rows are masked out as keys, so only the meaningless pad outputs differ."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class LAPAPreTrainedModel(StrictLoadingMixin, PreTrainedModel):
    config_class = LAPAConfig
    base_model_prefix = "backbone"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False
    # The "lwm" family's VQGAN: its codes are discrete, so it stays float32 when the model loads in half precision.
    _keep_in_fp32_modules_strict = ["vqgan"]

    def _init_weights(self, module: nn.Module) -> None:
        # The backbone initialises its own modules (its `_init_weights` runs in its own post_init).
        pass


class LAPAForActionPrediction(LAPAPreTrainedModel, GenerationMixin):
    """A vision-language backbone (`self.backbone`, an `AutoModelForImageTextToText` model) with LAPA's latent and
    action heads expressed as blocks of its output matrix.

    Inputs come from `LAPAProcessor`: `input_ids`/`attention_mask` (B, L) left-padded, `pixel_values`
    (B, 3, S, S), and for training `labels` (B, L) equal to the ids at target positions and -100 elsewhere.
    """

    def __init__(self, config: LAPAConfig, backbone: PreTrainedModel | None = None):
        super().__init__(config)
        is_lwm = config.backbone_family == "lwm"
        if backbone is None:
            backbone_config = config.backbone_config
            if getattr(config, "_attn_implementation_internal", None) is not None:
                backbone_config._attn_implementation = config._attn_implementation
            backbone = LWMForCausalLM(backbone_config) if is_lwm else AutoModelForImageTextToText.from_config(
                backbone_config)
        self.backbone = backbone
        if is_lwm:
            self.vqgan = LWMVQGANModel(config.vqgan_config)
        self._family = BACKBONE_FAMILIES[config.backbone_family]
        self.processor = None  # set by `from_pretrained` when the folder holds a processor, or by the user
        self.post_init()
        self.apply_freezing()

    def apply_freezing(self) -> None:
        """Freeze the vision encoder when `config.freeze_vision_encoder` (re-applied after loading, which builds new
        parameters), and always the parameters the forward pass never uses (`unused_modules`): they would get no
        gradient, which multi-process training (DistributedDataParallel) refuses."""
        if self.config.freeze_vision_encoder:
            self.vision_encoder.requires_grad_(False)
        for module in self.unused_modules():
            module.requires_grad_(False)

    def unused_modules(self) -> list[nn.Module]:
        """Backbone modules outside the forward pass: LLaVA takes the image features from the vision tower's hidden
        states (`vision_feature_layer`), so a CLIP tower's final `post_layernorm` is never applied."""
        if self.config.backbone_family != "llava":
            return []
        tower = self.vision_encoder
        tower = getattr(tower, "vision_model", tower)
        norm = getattr(tower, "post_layernorm", None)
        return [norm] if isinstance(norm, nn.Module) else []

    # -- structure ---------------------------------------------------------------------------------------------------
    @property
    def vision_encoder(self) -> nn.Module:
        """The backbone's image encoder (frozen by default); the VQGAN for the "lwm" family."""
        if self._family["vision_module"] is None:
            return self.vqgan
        return getattr(self.backbone.model, self._family["vision_module"])

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.backbone.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_output_embeddings(value)

    @property
    def latent_token_ids(self) -> range:
        c = self.config
        return range(c.latent_token_offset, c.latent_token_offset + c.num_latent_codes)

    @property
    def action_token_ids(self) -> range:
        c = self.config
        return range(c.action_token_offset, c.action_token_offset + c.num_action_bins)

    @property
    def new_token_ids(self) -> list[int]:
        """Ids of the tokens LAPA adds (latent, then action): the rows LoRA training must also train."""
        return list(self.latent_token_ids) + list(self.action_token_ids)

    @classmethod
    def from_backbone(cls, backbone: PreTrainedModel | str, processor, freeze_vision_encoder: bool = True,
                      **backbone_kwargs) -> "LAPAForActionPrediction":
        """Wrap a pretrained vision-language model (a module or a Hub id / folder) for LAPA: its embeddings are
        resized to the processor's vocabulary, the new rows initialised at the mean of the old ones."""
        if isinstance(backbone, str):
            backbone = AutoModelForImageTextToText.from_pretrained(backbone, **backbone_kwargs)
        backbone.resize_token_embeddings(processor.vocab_size, mean_resizing=True)
        config = LAPAConfig.from_processor(backbone.config, processor, freeze_vision_encoder=freeze_vision_encoder)
        backbone.config.image_token_id = processor.image_token_id
        model = cls(config, backbone=backbone)
        model.processor = processor
        return model

    # -- forward -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def image_token_ids(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """"lwm" family: (B, 3, 256, 256) pixels in [-1, 1] -> (B, 256) ids of their VQGAN codes (row-major) in the
        combined vocabulary. The VQGAN is frozen and not differentiable (argmin), hence no_grad."""
        codes, _ = self.vqgan.encode(pixel_values)
        return codes.flatten(1) + self.config.backbone_config.vision_token_offset

    def _place_image_tokens(self, input_ids: torch.LongTensor | None, pixel_values: torch.Tensor | None,
                            inputs_embeds: torch.Tensor | None, cache=None) -> torch.LongTensor | None:
        """"lwm" family: write each image's code ids over its `num_image_tokens` placeholders in `input_ids`."""
        image_id, count = self.config.image_token_id, self.config.num_image_tokens
        if input_ids is None:
            if pixel_values is not None:
                raise ValueError("the lwm family reads images as tokens: pass input_ids (not inputs_embeds) with "
                                 "images")
            return input_ids
        placeholders = input_ids == image_id
        if pixel_values is not None and not placeholders.any() and cache is not None and cache.get_seq_length() > 0:
            pixel_values = None  # a decoding step of `generate`, which passes the pixels again: already read
        if pixel_values is None:
            if placeholders.any():
                raise ValueError("input_ids hold image placeholders but no pixel_values were given")
            return input_ids
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(f"pixel_values must be (B, 3, S, S) with B = {input_ids.shape[0]}, got "
                             f"{tuple(pixel_values.shape)}")
        per_row = placeholders.sum(dim=1)
        if (per_row != count).any():
            raise ValueError(f"every row needs exactly {count} image placeholders (id {image_id}), got "
                             f"{per_row.tolist()}")
        ids = input_ids.clone()
        ids[placeholders] = self.image_token_ids(pixel_values).to(ids.device).reshape(-1)
        return ids

    def _images_for_backbone(self, pixel_values: torch.Tensor | None) -> torch.Tensor | None:
        if pixel_values is None:
            return None
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be (B, 3, S, S), got {tuple(pixel_values.shape)}")
        if self._family["images_axis"]:
            # Idefics3/SmolVLM treat an image whose values are all exactly 0 as padding and drop it (then fail on
            # the placeholder count). A real image can normalise to all zeros (a uniform image at the mean colour);
            # a 1e-6 offset on one value keeps it an image and changes nothing measurable.
            empty = pixel_values.flatten(1).eq(0).all(dim=1)
            if empty.any():
                pixel_values = pixel_values.clone()
                pixel_values[empty, 0, 0, 0] = 1e-6
            pixel_values = pixel_values.unsqueeze(1)  # one image per sample
        return pixel_values.to(self.dtype)

    @accepts_either_cache_name
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> LAPAOutput:
        if position_ids is None and attention_mask is not None and cache is None:
            position_ids = positions_from_mask(attention_mask)[:, -(input_ids if input_ids is not None else inputs_embeds).shape[1]:]
        if labels is not None:
            # Targets sit at the end of every (left-padded) row: only the positions from the one before the first
            # target onwards need logits, which saves the full-vocabulary product over the image and prompt.
            has_target = (labels != -100).any(dim=0)
            if not has_target.any():
                raise ValueError("labels hold no target token (all -100)")
            first = int(has_target.nonzero()[0])
            if first == 0:
                raise ValueError("a target at position 0 has no token before it to predict it from")
            logits_to_keep = labels.shape[1] - first + 1
        if self.config.backbone_family == "lwm":
            # LWM reads the image as VQGAN-code tokens: a plain causal LM call afterwards.
            input_ids = self._place_image_tokens(input_ids, pixel_values, inputs_embeds, cache)
        else:
            kwargs["pixel_values"] = self._images_for_backbone(pixel_values)
        outputs = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **cache_kwargs(cache),
            **kwargs,
        )
        logits = outputs.logits
        loss = accuracy = count = None
        if labels is not None:
            kept = logits.shape[1]
            # logits[:, j] predicts the token at position (L - kept + j + 1).
            targets = labels[:, labels.shape[1] - kept + 1:]
            loss, accuracy, count = self.block_loss(logits[:, :-1], targets)
        return LAPAOutput(
            loss=loss, logits=logits, **cache_kwargs(cache_of(outputs)),
            hidden_states=getattr(outputs, "hidden_states", None), attentions=getattr(outputs, "attentions", None),
            target_accuracy=accuracy, num_target_tokens=count,
        )

    def block_loss(self, logits: torch.Tensor, targets: torch.LongTensor):
        """Cross-entropy of each target token against its own block (latent or action ids) only.

        logits (B, K, V) aligned with targets (B, K) (-100 = no target). Returns (mean loss, accuracy, count)."""
        c = self.config
        total = logits.new_zeros((), dtype=torch.float32)
        correct = torch.zeros((), dtype=torch.long, device=logits.device)
        count = torch.zeros((), dtype=torch.long, device=logits.device)
        valid = targets != -100
        blocks = ((c.latent_token_offset, c.num_latent_codes), (c.action_token_offset, c.num_action_bins))
        in_a_block = torch.zeros_like(valid)
        for offset, size in blocks:
            mask = valid & (targets >= offset) & (targets < offset + size)
            in_a_block |= mask
            if not mask.any():
                continue
            block_logits = logits[mask][:, offset:offset + size].float()
            block_targets = targets[mask] - offset
            total = total + F.cross_entropy(block_logits, block_targets, reduction="sum")
            correct = correct + (block_logits.argmax(-1) == block_targets).sum()
            count = count + mask.sum()
        other = valid & ~in_a_block
        if other.any():  # plain text targets (e.g. co-training on captions): the full vocabulary
            text_logits = logits[other].float()
            total = total + F.cross_entropy(text_logits, targets[other], reduction="sum")
            correct = correct + (text_logits.argmax(-1) == targets[other]).sum()
            count = count + other.sum()
        denominator = count.clamp(min=1)
        return total / denominator, correct.float() / denominator, count

    # -- generation --------------------------------------------------------------------------------------------------
    def prepare_inputs_for_generation(self, *args, **kwargs):
        """`generate` support: the backbone decides what each step needs (pixels only on the first one)."""
        return self.backbone.prepare_inputs_for_generation(*args, **kwargs)

    @torch.no_grad()
    def generate_block(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.FloatTensor,
        num_tokens: int,
        block: str,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        return_logits: bool = False,
        cache_implementation: str | None = None,
    ):
        """Decode exactly `num_tokens` tokens, each restricted to one block ("latent" or "action"), with the KV cache.

        No end-of-sequence rule applies: every step emits a token of the block. Greedy by default; `do_sample=True`
        samples from softmax(logits / temperature), optionally restricted to the `top_k` best.
        `cache_implementation` (default: `self.generation_config.cache_implementation` when that is "static", else
        "dynamic"): "dynamic" grows a `DynamicCache` step by step; "static" is what transformers' `generate` does
        with a static cache: a preallocated `StaticCache` (its length rounded up to a multiple of
        `STATIC_CACHE_BUCKET` tokens, so prompts of similar length share it) and one decoding step compiled with
        `torch.compile` per (batch size, cache length). The first call at a new shape pays the compilation (tens of
        seconds on a CPU); later ones run the compiled step. The tokens are the same (the step's ops are the
        dynamic path's, fused). Not for the "lwm" family (its own LLaMA code has no static-cache support).
        Returns the indices within the block (B, num_tokens) and, with `return_logits`, the block logits of every
        step (B, num_tokens, block size)."""
        if block == "latent":
            offset, size = self.config.latent_token_offset, self.config.num_latent_codes
        elif block == "action":
            offset, size = self.config.action_token_offset, self.config.num_action_bins
        else:
            raise ValueError(f"block must be 'latent' or 'action', got {block!r}")
        if do_sample and temperature <= 0:
            raise ValueError("temperature must be positive when sampling")
        attention_mask = attention_mask.to(input_ids.device)
        positions = positions_from_mask(attention_mask)
        if self._cache_mode(cache_implementation) == "static":
            step = self._static_decoder(input_ids.shape[0], input_ids.shape[1] + num_tokens)
            out = step.prefill(self, input_ids, pixel_values, attention_mask, positions, num_tokens)
        else:
            step = None
            out = self(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                       position_ids=positions, use_cache=True, logits_to_keep=1)
        cache = cache_of(out)
        next_position = positions[:, -1:] + 1
        chosen, step_logits = [], []
        for index in range(num_tokens):
            logits = out.logits[:, -1, offset:offset + size].float()
            step_logits.append(logits)
            if do_sample:
                scores = logits / temperature
                if top_k is not None and top_k < size:
                    kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
                    scores = scores.masked_fill(scores < kth, float("-inf"))
                probs = scores.softmax(-1)
                pick = torch.multinomial(probs.cpu(), 1, generator=generator).to(logits.device).squeeze(-1)
            else:
                pick = logits.argmax(-1)
            chosen.append(pick)
            if index + 1 == num_tokens:
                break
            if step is not None:
                out = step(pick + offset, next_position, index)
            else:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], 1))],
                                           dim=1)
                out = self(input_ids=(pick + offset).unsqueeze(-1), attention_mask=attention_mask,
                           position_ids=next_position, cache=cache, use_cache=True, logits_to_keep=1)
                cache = cache_of(out)
            next_position = next_position + 1
        codes = torch.stack(chosen, dim=1)
        if return_logits:
            return codes, torch.stack(step_logits, dim=1)
        return codes

    def _cache_mode(self, cache_implementation: str | None) -> str:
        if cache_implementation is None:
            configured = getattr(self.generation_config, "cache_implementation", None)
            return "static" if configured == "static" else "dynamic"
        if cache_implementation not in ("dynamic", "static"):
            raise ValueError(f"cache_implementation must be 'dynamic' or 'static', got {cache_implementation!r}")
        return cache_implementation

    def _static_decoder(self, batch_size: int, length: int) -> "StaticBlockDecoder":
        """The static cache and compiled step for this batch size and (bucketed) length, built on first use."""
        if self.config.backbone_family == "lwm":
            raise ValueError("cache_implementation='static' needs a transformers backbone with static-cache support; "
                             "the 'lwm' family decodes with the dynamic cache")
        max_length = -(-length // STATIC_CACHE_BUCKET) * STATIC_CACHE_BUCKET
        key = (batch_size, max_length, self.device, self.dtype)
        decoders = self.__dict__.setdefault("_static_decoders", {})
        if key not in decoders:
            if len(decoders) >= MAX_STATIC_DECODERS:  # drop the oldest: its cache memory and compiled step
                decoders.pop(next(iter(decoders)))
            decoders[key] = StaticBlockDecoder(self, batch_size, max_length)
        return decoders[key]

    def _processor_or_raise(self, processor):
        processor = processor if processor is not None else self.processor
        if processor is None:
            raise ValueError(
                "no processor: pass processor=LAPAProcessor... or load the model from a folder that holds one "
                "(save the processor next to the model), or set model.processor"
            )
        return processor

    def _prompt_inputs(self, processor, images, instructions, center_crop: bool, task: str = "latent"):
        if isinstance(instructions, str):
            instructions = [instructions]
        inputs = processor(images=images, text=instructions, center_crop=center_crop, return_tensors="pt", task=task)
        return {k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask", "pixel_values")}

    @torch.no_grad()
    def predict_latent_actions(self, images, instructions, processor=None, center_crop: bool = False,
                               return_logits: bool = False, **sampling) -> torch.LongTensor:
        """Latent actions for a batch of (image, instruction): (B, s) codes in [0, |C|).

        `images`: anything the processor takes (PIL images, uint8 arrays (B, H, W, 3), tensors); `instructions`:
        a string or a list of B strings. `sampling`: `do_sample`, `temperature`, `top_k`, `generator` and
        `cache_implementation` (see `generate_block`)."""
        processor = self._processor_or_raise(processor)
        inputs = self._prompt_inputs(processor, images, instructions, center_crop, task="latent")
        return self.generate_block(**inputs, num_tokens=self.config.latent_sequence_length, block="latent",
                                   return_logits=return_logits, **sampling)

    @torch.no_grad()
    def predict_action(self, images, instructions, dataset: str | None = None, processor=None,
                       center_crop: bool = False, return_logits: bool = False, **sampling):
        """Continuous actions as a float32 numpy array, decoded at the bins' midpoints with the statistics of
        `dataset` (the processor's only dataset when None): (B, D) for a single-step model (k =
        `config.action_chunk_size` = 1), (B, k, D) for a chunking one (what `predict_action_chunk` returns). With
        `return_logits`, also the action-block logits: (B, D, N), or (B, k, D, N) when k > 1."""
        result = self.predict_action_chunk(images, instructions, dataset=dataset, processor=processor,
                                           center_crop=center_crop, return_logits=return_logits, **sampling)
        if self.config.action_chunk_size > 1:
            return result
        if return_logits:
            return result[0][:, 0], result[1][:, 0]
        return result[:, 0]

    @torch.no_grad()
    def predict_action_chunk(self, images, instructions, dataset: str | None = None, processor=None,
                             center_crop: bool = False, return_logits: bool = False, **sampling):
        """The next k = `config.action_chunk_size` actions of every example, (B, k, D) float32 numpy (k = 1 too),
        from one cached decoding of exactly k x D action tokens (time-major; every step restricted to the action
        block, no end-of-sequence rule). With `return_logits`, also the action-block logits (B, k, D, N)."""
        processor = self._processor_or_raise(processor)
        if not self.config.num_action_bins or processor.action_tokenizer is None:
            raise ValueError("this model has no action tokens (a latent-pretrained checkpoint): finetune it on actions "
                             "first, or use predict_latent_actions")
        self.check_processor_chunk_size(processor)
        k = self.config.action_chunk_size
        action_dim = processor.action_tokenizer.action_dim(dataset)
        inputs = self._prompt_inputs(processor, images, instructions, center_crop, task="action")
        result = self.generate_block(**inputs, num_tokens=k * action_dim, block="action",
                                     return_logits=return_logits, **sampling)
        bins, logits = result if return_logits else (result, None)
        bins = bins.cpu().numpy().reshape(len(bins), k, action_dim)
        actions = processor.action_tokenizer.decode(bins, dataset=dataset)
        if return_logits:
            return actions, logits.reshape(len(logits), k, action_dim, logits.shape[-1])
        return actions

    def check_processor_chunk_size(self, processor) -> None:
        """The processor builds and decodes action blocks of k x D tokens with its own k: it must be the model's."""
        theirs = getattr(processor, "action_chunk_size", 1)
        if theirs != self.config.action_chunk_size:
            raise ValueError(
                f"the processor's action_chunk_size ({theirs}) differs from the model's "
                f"config.action_chunk_size ({self.config.action_chunk_size}): the model predicts "
                f"{self.config.action_chunk_size} action(s) per call; use the processor saved with it, or set both "
                "to the same k")

    # -- loading -----------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, load_processor: bool = True, **kwargs):
        """`PreTrainedModel.from_pretrained` (strict), plus the processor saved in the same folder or repository, if
        any, as `model.processor` (so `predict_action(images, instructions)` needs nothing else)."""
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.apply_freezing()
        if load_processor:
            model.processor = _load_processor_if_present(pretrained_model_name_or_path, kwargs)
            if model.processor is not None:
                model.check_processor_chunk_size(model.processor)
        return loaded


STATIC_CACHE_BUCKET = 64  # static caches are sized in multiples of this many tokens
MAX_STATIC_DECODERS = 8  # (batch size, length) shapes kept compiled at once (torch's recompile limit is 8 too)


class StaticBlockDecoder:
    """One (batch size, cache length) shape of static-cache block decoding: a preallocated `StaticCache`, the
    attention mask over all of it, and the decoding step compiled once (`torch.compile`, static shapes, so the step
    is one fused graph of the backbone's ops)."""

    def __init__(self, model: "LAPAForActionPrediction", batch_size: int, max_length: int):
        from transformers import StaticCache

        self.batch_size, self.max_length = batch_size, max_length
        self.cache = StaticCache(config=model.backbone.config, max_cache_len=max_length)
        self.mask = None
        self.prompt_length = 0
        backbone = model.backbone

        def step(input_ids, attention_mask, position_ids, cache_position):
            return backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            cache_position=cache_position, use_cache=True, logits_to_keep=1,
                            **cache_kwargs(self.cache)).logits

        self.compiled_step = torch.compile(step, dynamic=False)

    def prefill(self, model, input_ids, pixel_values, attention_mask, positions, num_tokens: int):
        """The prompt's forward pass (not compiled: prompts differ in length) into the reset cache."""
        self.cache.reset()
        length = input_ids.shape[1]
        self.prompt_length = length
        # The mask over the whole cache: the prompt's (left padding included), then the decoded tokens; the slots
        # past them stay masked (and the causal mask hides them anyway).
        mask = attention_mask.new_zeros((self.batch_size, self.max_length))
        mask[:, :length] = attention_mask
        mask[:, length:length + num_tokens] = 1
        self.mask = mask
        return model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                     position_ids=positions, use_cache=True, logits_to_keep=1,
                     cache_position=torch.arange(length, device=input_ids.device), cache=self.cache)

    def __call__(self, token_ids, position_ids, index: int):
        """Decoding step `index` (0 = the first token after the prompt goes in)."""
        cache_position = torch.tensor([self.prompt_length + index], device=token_ids.device)
        logits = self.compiled_step(token_ids.unsqueeze(-1), self.mask, position_ids, cache_position)
        return LAPAOutput(logits=logits, **cache_kwargs(self.cache))


def _load_processor_if_present(path, kwargs):
    from transformers import AutoProcessor
    from transformers.utils import cached_file

    hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
    found = cached_file(str(path), "processor_config.json", _raise_exceptions_for_missing_entries=False,
                        _raise_exceptions_for_connection_errors=False, **hub_kwargs)
    if found is None:
        return None
    return AutoProcessor.from_pretrained(path, trust_remote_code=kwargs.get("trust_remote_code"), **hub_kwargs)


__all__ = ["LAPAForActionPrediction", "LAPAOutput", "LAPAPreTrainedModel", "StaticBlockDecoder", "positions_from_mask"]
