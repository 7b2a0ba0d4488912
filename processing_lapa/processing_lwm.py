"""The processor of the authors' LWM-based LAPA (the released LAPA-7B): their prompt, token layout and padding.

The authors' sampler (`latent_pretraining`'s DeltaSampler / DeltaActionSampler) builds, per example,

    <s> <s> "You are a helpful assistant. USER: What action should the robot take to `{instruction}` ASSISTANT:
    <vision>"  +  256 VQGAN codes  +  <eov>  +  "</vision> <delta>"   (or "</vision> <action>" after finetuning)

then the s latent (or D action) tokens. Their LLaMA tokenizer splits on "<s>" and strips the spaces around it, so the
text part is [bos, bos] + sp.encode(template) and the suffix is sp.encode("</vision> <delta>"), each with
SentencePiece's leading "▁". Their text prompt is LEFT padded with id 0 (`<unk>`, LLaMA has no pad token) before the
vision block; padding to a fixed 128 or to the longest prompt is the same for the model (pads are masked, positions
count real tokens only).

Ids are those of `LWMForCausalLM`'s combined vocabulary, computed by offset (the 8448 vision codes, |C| latent and N
action ids are not tokenizer entries):

    text [0, T) | vision [T, T + V) | latent [T + V, T + V + C) | action [T + V + C, T + V + C + N)

The 256 image positions hold a placeholder id, vision code `end_of_vision_code + 1` (a padding row of the vision
vocabulary the VQGAN never emits); `LAPAForActionPrediction` replaces them with the image's VQGAN codes.
"""

from __future__ import annotations

from .processing_lapa import LAPAProcessor

LWM_PROMPT_TEMPLATE = (
    "You are a helpful assistant. USER: What action should the robot take to `{instruction}` ASSISTANT: <vision>"
)
LWM_LATENT_SUFFIX = "</vision> <delta>"
LWM_ACTION_SUFFIX = "</vision> <action>"


class LWMProcessor(LAPAProcessor):
    r"""[`LAPAProcessor`] with the authors' LWM layout (see the module docstring).

    Args:
        image_processor ([`LWMImageProcessor`]): the authors' resize to 256 x 256 and [-1, 1] scaling.
        tokenizer: LLaMA-2's tokenizer (text ids only), with a pad token (the authors pad with id 0, `<unk>`).
        num_latent_codes (`int`, defaults to 8), latent_sequence_length (`int`, defaults to 4): |C| and s.
        num_action_bins (`int`, defaults to 0): N, 0 for a latent-pretrained model (no action block).
        num_image_tokens (`int`, defaults to 256): VQGAN codes per image (16 x 16).
        text_vocab_size (`int`, defaults to 32000), vision_vocab_size (`int`, defaults to 8448),
        end_of_vision_code (`int`, defaults to 8193): the combined vocabulary of `LWMConfig`.
        prompt_template (`str`): the text between the BOS tokens and the image.
        num_bos (`int`, defaults to 2): BOS tokens opening the prompt (the authors' "<s> <s>").
        latent_prompt_suffix, action_prompt_suffix (`str`): the text after `<eov>` asking for latent actions or
            actions.
    """

    _min_action_bins = 0

    def __init__(
        self,
        image_processor,
        tokenizer,
        # the LWM layout first: the combined vocabulary and the authors' prompt
        text_vocab_size: int = 32000,
        vision_vocab_size: int = 8448,
        end_of_vision_code: int = 8193,
        prompt_template: str = LWM_PROMPT_TEMPLATE,
        num_bos: int = 2,
        latent_prompt_suffix: str = LWM_LATENT_SUFFIX,
        action_prompt_suffix: str = LWM_ACTION_SUFFIX,
        # then LAPA's blocks (spelled out, not **kwargs: ProcessorMixin saves exactly the constructor's parameters)
        num_latent_codes: int = 8,
        latent_sequence_length: int = 4,
        num_action_bins: int = 0,
        num_image_tokens: int = 256,
        chat_template: str | None = None,
        action_chunk_size: int = 1,
    ):
        if num_action_bins == 1:
            raise ValueError("num_action_bins must be 0 (no action block) or >= 2")
        if len(tokenizer) > text_vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than text_vocab_size={text_vocab_size}")
        if not 0 <= end_of_vision_code < vision_vocab_size - 1:
            raise ValueError(f"end_of_vision_code {end_of_vision_code} leaves no placeholder row in the vision "
                             f"vocabulary ({vision_vocab_size})")
        if num_image_tokens > end_of_vision_code:
            raise ValueError("num_image_tokens exceeds the VQGAN codes below end_of_vision_code")
        self.text_vocab_size = int(text_vocab_size)
        self.vision_vocab_size = int(vision_vocab_size)
        self.end_of_vision_code = int(end_of_vision_code)
        self.num_bos = int(num_bos)
        self.latent_prompt_suffix = latent_prompt_suffix
        self.action_prompt_suffix = action_prompt_suffix
        super().__init__(
            image_processor, tokenizer, num_latent_codes=num_latent_codes,
            latent_sequence_length=latent_sequence_length, num_action_bins=num_action_bins,
            num_image_tokens=num_image_tokens, prompt_template=prompt_template, add_bos=num_bos > 0,
            chat_template=chat_template, action_chunk_size=action_chunk_size,
        )

    def _locate_special_tokens(self) -> tuple[int, int, int]:
        """(image placeholder id, `<latent_0>` id, `<action_0>` id) in the combined vocabulary, by offset."""
        latent_offset = self.text_vocab_size + self.vision_vocab_size
        image_placeholder = self.vision_token_offset + self.end_of_vision_code + 1
        return image_placeholder, latent_offset, latent_offset + self.num_latent_codes

    @property
    def vision_token_offset(self) -> int:
        """Id of vision code 0."""
        return self.text_vocab_size

    @property
    def end_of_vision_token_id(self) -> int:
        return self.vision_token_offset + self.end_of_vision_code

    @property
    def vocab_size(self) -> int:
        """Size of the combined vocabulary (text + vision + latent + action)."""
        return self.text_vocab_size + self.vision_vocab_size + self.num_latent_codes + self.num_action_bins

    def _prompt_sequences(self, instructions: list[str], task: str) -> list[list[int]]:
        if task == "action" and not self.num_action_bins:
            raise ValueError("this processor has no action tokens (num_action_bins=0: a latent-pretrained model)")
        texts = [self.prompt_template.format(instruction=instruction) for instruction in instructions]
        text_ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        suffix_text = self.latent_prompt_suffix if task == "latent" else self.action_prompt_suffix
        suffix = list(self.tokenizer(suffix_text, add_special_tokens=False)["input_ids"])
        vision = [self.image_token_id] * self.num_image_tokens + [self.end_of_vision_token_id]
        bos = [self.tokenizer.bos_token_id] * self.num_bos
        for ids, instruction in zip(text_ids, instructions):
            self._check_text_ids(ids, instruction)
        return [bos + list(ids) + vision + suffix for ids in text_ids]


__all__ = ["LWMProcessor", "LWM_PROMPT_TEMPLATE", "LWM_LATENT_SUFFIX", "LWM_ACTION_SUFFIX"]
