"""LWM, the backbone of the authors' LAPA VLA, in PyTorch: LLaMA-2 reading VQGAN image tokens.

The authors' model (`latent_pretraining/delta_llama.py` in LAPA, built on LWM's `FlaxVideoLLaMA`) keeps one input
table and one output head per vocabulary: text (`wte`, `lm_head`), vision (`vte`, `vision_head`: 8192 VQGAN codes,
end-of-frame 8192, end-of-vision 8193, padded to 8448), latent actions (`dte`, `delta_head`: |C| = 8) and, after
action finetuning, action bins (`ate`, `action_head`). A boolean mask per vocabulary says which table each position
reads, and the caller picks the head. Here the four vocabularies are blocks of ONE vocabulary, in that order:

    ids [0, T)                text           (T = text_vocab_size, 32000)
    ids [T, T + V)            vision codes   (V = vision_vocab_size, 8448)
    ids [T + V, T + V + C)    latent actions (C = latent_vocab_size, 8)
    ids [T + V + C, ... + A)  action bins    (A = action_vocab_size, 0 unless finetuned)

`model.embed_tokens` stacks the authors' four input tables (row blocks, bit for bit) and `lm_head` their four
heads, so every row block of the logits is exactly one of the authors' heads. This is the project's token design
(latent and action tokens are ordinary ids after the text vocabulary, and the VLA restricts the softmax to a block
at a target position), and the model stays a stock LLaMA for everything that reads one (SDPA/flash attention,
PEFT, generation, quantization).

Everything else is LLaMA with two details of the authors' code:
* RoPE. The authors rotate interleaved pairs (x[2i], x[2i+1]) (Meta's layout); transformers' LLaMA rotates halves
  (x[i], x[i + d/2]). The converter permutes the rows of every head of `wq` and `wk` (even rows first, then odd
  rows), which turns one layout into the other exactly: q.k is unchanged by the same permutation of both, and each
  rotated pair keeps its frequency. The model then runs transformers' own attention unchanged.
* The RoPE table. The authors precompute cos/sin for `max_position_embeddings` positions and take rows by position;
  left-pad positions are -1 and wrap to the last row (`jnp.take`). Their model dtype is bf16 in training and
  serving, which rounds the angles and then cos/sin to bf16: `rope_table_dtype="bfloat16"` reproduces that table
  (the released LAPA-7B was trained with it), "float32" gives the exact one.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel

from .loading import StrictLoadingMixin
from .transformers_compat import CACHE_NAME


class LWMConfig(PretrainedConfig):
    r"""
    Configuration of [`LWMForCausalLM`]. Defaults are the released LAPA-7B (LWM = LLaMA-2-7B, RoPE theta 5e7).

    Args:
        text_vocab_size (`int`, defaults to 32000): LLaMA-2's SentencePiece vocabulary; ids [0, text_vocab_size).
        vision_vocab_size (`int`, defaults to 8448): VQGAN codes plus end-of-frame/end-of-vision, padded.
        latent_vocab_size (`int`, defaults to 8): latent-action codes |C| (the authors' "delta" vocabulary).
        action_vocab_size (`int`, defaults to 0): action bins (the authors' finetuned model: 256); 0 = no block.
        end_of_frame_code (`int`, defaults to 8192): the vision-vocabulary code ending a frame (`<eof>`).
        end_of_vision_code (`int`, defaults to 8193): the vision-vocabulary code ending the image (`<eov>`).
        hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim,
        hidden_act, rms_norm_eps, attention_bias, attention_dropout, mlp_bias: as in `LlamaConfig`.
        max_position_embeddings (`int`, defaults to 32768): rows of the RoPE table (the authors' inference
            `max_sequence_length`; it only decides where position -1 wraps to).
        rope_theta (`float`, defaults to 5e7): RoPE base.
        rope_table_dtype (`str`, defaults to "float32"): "bfloat16" rounds the RoPE angles and cos/sin to bf16 like
            the authors' bf16 runs (the released model's table); "float32" is the exact table.
        vocab_size: always `text + vision + latent + action` (derived; pass it only to check).
    """

    model_type = "lwm"
    keys_to_ignore_at_inference = [CACHE_NAME]

    def __init__(
        self,
        text_vocab_size: int = 32000,
        vision_vocab_size: int = 8448,
        latent_vocab_size: int = 8,
        action_vocab_size: int = 0,
        end_of_frame_code: int = 8192,
        end_of_vision_code: int = 8193,
        hidden_size: int = 4096,
        intermediate_size: int = 11008,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 32768,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 5e7,
        rope_table_dtype: str = "float32",
        initializer_range: float = 0.02,
        use_cache: bool = True,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        mlp_bias: bool = False,
        vocab_size: int | None = None,
        pad_token_id: int | None = 0,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        if rope_table_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"rope_table_dtype must be 'float32' or 'bfloat16', got {rope_table_dtype!r}")
        if tie_word_embeddings:
            raise ValueError("LWM has separate input tables and output heads; tie_word_embeddings must be False")
        for name, code in (("end_of_frame_code", end_of_frame_code), ("end_of_vision_code", end_of_vision_code)):
            if not 0 <= code < vision_vocab_size:
                raise ValueError(f"{name}={code} is not a vision code (vision_vocab_size {vision_vocab_size})")
        # Derived from rope_theta (a saved config carries both; rope_theta is the one we read).
        kwargs.pop("rope_parameters", None)
        self.text_vocab_size = text_vocab_size
        self.vision_vocab_size = vision_vocab_size
        self.latent_vocab_size = latent_vocab_size
        self.action_vocab_size = action_vocab_size
        total = text_vocab_size + vision_vocab_size + latent_vocab_size + action_vocab_size
        if vocab_size is not None and vocab_size != total:
            raise ValueError(
                f"vocab_size={vocab_size} but the blocks add up to {total} (text {text_vocab_size} + vision "
                f"{vision_vocab_size} + latent {latent_vocab_size} + action {action_vocab_size})"
            )
        self.vocab_size = total
        self.end_of_frame_code = end_of_frame_code
        self.end_of_vision_code = end_of_vision_code
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        # transformers' LLaMA code and tools read `rope_parameters`; our rotary module reads `rope_theta`.
        self.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
        self.rope_table_dtype = rope_table_dtype
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.mlp_bias = mlp_bias
        self.pretraining_tp = 1
        super().__init__(
            pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
            tie_word_embeddings=False, **kwargs,
        )

    # -- the vocabulary blocks (global ids) ---------------------------------------------------------------------------
    @property
    def vision_token_offset(self) -> int:
        """Id of vision code 0; code v is `vision_token_offset + v`."""
        return self.text_vocab_size

    @property
    def latent_token_offset(self) -> int:
        """Id of latent code 0 (the authors' delta id 0)."""
        return self.text_vocab_size + self.vision_vocab_size

    @property
    def action_token_offset(self) -> int:
        """Id of action bin 0 (the authors' action id 0)."""
        return self.latent_token_offset + self.latent_vocab_size

    @property
    def end_of_frame_token_id(self) -> int:
        return self.vision_token_offset + self.end_of_frame_code

    @property
    def end_of_vision_token_id(self) -> int:
        return self.vision_token_offset + self.end_of_vision_code

    def block_slices(self) -> dict[str, slice]:
        """The id range of each vocabulary block (also the row blocks of `embed_tokens` and `lm_head`)."""
        blocks, start = {}, 0
        for name, size in (("text", self.text_vocab_size), ("vision", self.vision_vocab_size),
                           ("latent", self.latent_vocab_size), ("action", self.action_vocab_size)):
            blocks[name] = slice(start, start + size)
            start += size
        return blocks


def lwm_rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, table_dtype: str = "float32"):
    """cos and sin of the authors' RoPE table at integer `positions` (any shape), each (*positions.shape, head_dim/2).

    Same arithmetic as the authors' `precompute_freqs_cis`: frequencies 1 / theta^(2i/d) in float32, angles
    position x frequency rounded once to float32; with `table_dtype="bfloat16"` the angles are rounded to bf16 and
    cos/sin are computed from them and rounded to bf16 (what a bf16 model dtype does)."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device)[: head_dim // 2].float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    angles = positions.float()[..., None] * inv_freq
    if table_dtype == "bfloat16":
        angles = angles.to(torch.bfloat16).float()
        return angles.cos().to(torch.bfloat16).float(), angles.sin().to(torch.bfloat16).float()
    return angles.cos(), angles.sin()


class LWMRotaryEmbedding(nn.Module):
    """cos/sin in transformers' half-split layout (the frequencies repeated twice), taken from the authors' table.

    Positions below 0 (the authors' left padding gives -1) wrap around like `jnp.take`: -1 reads the last row
    (`max_position_embeddings - 1`). Positions at or past the table's end raise (the authors' table has no row)."""

    def __init__(self, config: LWMConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.theta = config.rope_theta
        self.max_positions = config.max_position_embeddings
        self.table_dtype = config.rope_table_dtype

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.LongTensor):
        positions = torch.where(position_ids < 0, position_ids + self.max_positions, position_ids)
        if positions.numel() and (positions.min() < 0 or positions.max() >= self.max_positions):
            raise ValueError(
                f"position ids must lie in [-{self.max_positions}, {self.max_positions}) (the RoPE table's rows), "
                f"got {int(position_ids.min())} .. {int(position_ids.max())}"
            )
        cos, sin = lwm_rope_cos_sin(positions, self.head_dim, self.theta, self.table_dtype)
        cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)
        return cos.to(x.dtype), sin.to(x.dtype)


class LWMPreTrainedModel(StrictLoadingMixin, LlamaPreTrainedModel):
    config_class = LWMConfig
    config: LWMConfig
    base_model_prefix = "model"
    _no_split_modules = ["LlamaDecoderLayer"]


class LWMModel(LWMPreTrainedModel, LlamaModel):
    """The LLaMA decoder over the combined vocabulary, with the authors' RoPE table."""

    def __init__(self, config: LWMConfig):
        super().__init__(config)
        self.rotary_emb = LWMRotaryEmbedding(config)


class LWMForCausalLM(LWMPreTrainedModel, LlamaForCausalLM):
    """LWM with one output matrix whose row blocks are the authors' heads (text, vision, latent, action).

    `forward(input_ids, attention_mask, position_ids, cache, use_cache, logits_to_keep, ...)` (LLaMA's; the cache is
    `past_key_values` before transformers 5.24) returns a `CausalLMOutputWithPast` with logits (B, L', vocab_size)
    over the combined vocabulary and a transformers `Cache`. `input_ids` are combined ids (see `official_to_combined_ids` for the authors' per-vocabulary layout).
    """

    _tied_weights_keys = {}

    def __init__(self, config: LWMConfig):
        # LlamaForCausalLM.__init__ would build a LlamaModel first; build ours directly.
        LlamaPreTrainedModel.__init__(self, config)
        self.model = LWMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def head_logits(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split combined logits (..., vocab_size) into the authors' heads: text, vision, latent (and action)."""
        return {name: logits[..., block] for name, block in self.config.block_slices().items()
                if block.stop > block.start}


# -- the authors' input conventions ---------------------------------------------------------------------------------
def official_to_combined_ids(input_ids, vision_masks, delta_masks=None, action_masks=None,
                             config: LWMConfig | None = None) -> torch.LongTensor:
    """Combined ids from the authors' layout: per-vocabulary ids plus one boolean mask per non-text vocabulary
    (`vision_masks`, `delta_masks`, `action_masks`, as their samplers build them). Arrays or tensors, (B, L)."""
    config = config or LWMConfig()
    ids = torch.as_tensor(input_ids).long()
    out = ids.clone()
    for mask, offset, size, name in ((vision_masks, config.vision_token_offset, config.vision_vocab_size, "vision"),
                                     (delta_masks, config.latent_token_offset, config.latent_vocab_size, "delta"),
                                     (action_masks, config.action_token_offset, config.action_vocab_size, "action")):
        if mask is None:
            continue
        mask = torch.as_tensor(mask).bool()
        if mask.any():
            block = ids[mask]
            if block.min() < 0 or block.max() >= size:
                raise ValueError(f"{name} ids must lie in [0, {size}), got {int(block.min())} .. {int(block.max())}")
        out = torch.where(mask, ids + offset, out)
    text = (out == ids) & (ids >= config.text_vocab_size)
    if text.any():
        raise ValueError(f"text ids must lie below {config.text_vocab_size}")
    return out


def official_position_ids(attention_mask) -> torch.LongTensor:
    """The authors' generation positions: cumsum(attention_mask) - 1, so left pads get -1 (which the RoPE table
    wraps to its last row) and the first real token 0."""
    mask = torch.as_tensor(attention_mask).long()
    return mask.cumsum(-1) - 1


# `AutoConfig`/`AutoModelForCausalLM` know "lwm" once this module is imported (converted folders load with them).
AutoConfig.register(LWMConfig.model_type, LWMConfig, exist_ok=True)
AutoModelForCausalLM.register(LWMConfig, LWMForCausalLM, exist_ok=True)


__all__ = [
    "LWMConfig",
    "LWMForCausalLM",
    "LWMModel",
    "LWMPreTrainedModel",
    "LWMRotaryEmbedding",
    "lwm_rope_cos_sin",
    "official_position_ids",
    "official_to_combined_ids",
]
