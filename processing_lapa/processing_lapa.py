"""The LAPA processor: (image, instruction[, target]) -> the token layout a LAPA VLA reads and predicts.

Every example becomes

    [bos] + image part + tokens("What action should the robot take to {instruction}?") + targets

where the image part is what the backbone's own processor puts in place of one image (`image_layout`):

    "plain"     <image> x num_image_tokens                      (LLaVA-style backbones, the tiny models built in code)
    "idefics3"  <fake_token_around_image> <global-img> <image> x num_image_tokens <fake_token_around_image>
                                                                (Idefics3 / SmolVLM: exactly what `Idefics3Processor`
                                                                and `SmolVLMProcessor` build for one image that is
                                                                not split into tiles)

Only the `<image>` placeholders are image positions (the model writes the image features over them, and
`num_image_tokens` counts them); the wrapper tokens are ordinary prompt tokens, with the backbone tokenizer's own ids.
Idefics3/SmolVLM image splitting (a grid of `<row_i_col_j>` tiles before the global image) is deliberately not used,
i.e. the layout is the one those processors build with `do_image_splitting=False`: LAPA feeds one frame per example
at the vision encoder's own resolution (`LAPAImageProcessor` resizes the whole frame to that square, as the backbone's
image processor does to the global image without splitting). Robot frames are mostly no larger than that (this
project's Meta-World frames are 128 px, SmolVLM-256M reads 512 px), so tiles would mostly be upsampled crops of the
same frame: little new detail, many times the image tokens (64 per tile for SmolVLM-256M, on top of the global
image's 64), and a prompt length that depends on the frame size.

The targets are s latent-action tokens `<latent_k>` (latent pretraining) or k x D action-bin tokens
`<action_k>` (action finetuning; k = `action_chunk_size`, 1 by default: one action, as in the paper; with k > 1 the
D tokens of each of the k future actions in time order, "action chunking"). Both kinds are new special tokens appended to the backbone tokenizer, so a LAPA checkpoint
stays an ordinary image-text-to-text checkpoint; the model restricts its logits to the right id block at each target
position. Batches are always LEFT padded (training and generation share one layout; positions come from the
attention mask) and `labels` are -100 everywhere except at the target tokens.

The action tokenizer (per-dataset bin statistics) is saved next to the processor as `action_tokenizer.json`.
"""

from __future__ import annotations

import inspect
import os

import numpy as np
from tokenizers import AddedToken
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.utils import cached_file

from .action_tokenizer import ACTION_TOKENIZER_NAME, ActionTokenizer

DEFAULT_PROMPT_TEMPLATE = "What action should the robot take to {instruction}?"
IGNORE_INDEX = -100
# The tokens Idefics3/SmolVLM's processors wrap an image in (their names in transformers' `Idefics3Processor`).
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
IMAGE_LAYOUTS = ("plain", "idefics3")
# Backbone families (their config's `model_type`) whose own processor wraps the image placeholders.
_FAMILY_IMAGE_LAYOUTS = {"idefics3": "idefics3", "smolvlm": "idefics3"}


def image_layout_for(model_type: str) -> str:
    """The `image_layout` whose image part matches what the processor of a backbone of this `model_type` builds:
    "idefics3" for the Idefics3 and SmolVLM families, "plain" for the others."""
    return _FAMILY_IMAGE_LAYOUTS.get(model_type, "plain")


def latent_token(code: int) -> str:
    """Token text of latent code `code` (0 <= code < |C|)."""
    return f"<latent_{code}>"


def action_token(bin_index: int) -> str:
    """Token text of action bin `bin_index` (0 <= bin_index < N)."""
    return f"<action_{bin_index}>"


class LAPAProcessor(ProcessorMixin):
    r"""Builds LAPA model inputs and decodes its latent-action and action tokens.

    Build one with [`~LAPAProcessor.from_components`], which adds the latent and action tokens to the tokenizer;
    the constructor itself expects a tokenizer that already has them (as a saved LAPA processor's has).

    Args:
        image_processor ([`LAPAImageProcessor`] or any image processor returning `pixel_values`).
        tokenizer ([`PreTrainedTokenizerBase`]): the backbone's tokenizer, with the image token, the |C| latent
            tokens and the N action tokens, each block at contiguous ids.
        num_latent_codes (`int`, defaults to 8): codebook size |C| of the latent action quantizer.
        latent_sequence_length (`int`, defaults to 4): number s of latent codes per action.
        num_action_bins (`int`, defaults to 256): number N of bins per action dimension.
        num_image_tokens (`int`, defaults to 256): image placeholder tokens per image (the model replaces them
            with image features; 256 is the paper's 16 x 16 VQGAN grid).
        image_token (`str`, defaults to `"<image>"`): the placeholder token.
        prompt_template (`str`): the text around the instruction; must contain `{instruction}`.
        add_bos (`bool`, defaults to True): start every sequence with the tokenizer's BOS token.
        action_chunk_size (`int`, defaults to 1): k, the future actions one action target holds (action chunking).
            Must equal the model's `config.action_chunk_size`. A processor saved before chunking existed loads as 1.
        image_layout (`str`, defaults to `"plain"`): the image part of the prompt (see the module docstring):
            `"plain"` (the placeholders only) or `"idefics3"` (wrapped as Idefics3/SmolVLM's processor does, one
            global image; the tokenizer must hold `<fake_token_around_image>` and `<global-img>`, as these backbones'
            tokenizers do). [`image_layout_for`] gives a backbone family's layout. A processor saved before this
            setting existed loads as `"plain"`, the layout it was saved with.
        chat_template (`str`, *optional*): passed to [`ProcessorMixin`]; unused by LAPA's own prompt.
    """

    _min_action_bins = 2  # subclasses whose model may have no action block allow 0

    def __init__(
        self,
        image_processor,
        tokenizer,
        num_latent_codes: int = 8,
        latent_sequence_length: int = 4,
        num_action_bins: int = 256,
        num_image_tokens: int = 256,
        image_token: str = "<image>",
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        add_bos: bool = True,
        chat_template: str | None = None,
        action_chunk_size: int = 1,
        image_layout: str = "plain",
    ):
        if image_layout not in IMAGE_LAYOUTS:
            raise ValueError(f"image_layout must be one of {IMAGE_LAYOUTS}, got {image_layout!r}")
        for name, value, minimum in (
            ("action_chunk_size", action_chunk_size, 1),
            ("num_latent_codes", num_latent_codes, 1),
            ("latent_sequence_length", latent_sequence_length, 1),
            ("num_action_bins", num_action_bins, self._min_action_bins),
            ("num_image_tokens", num_image_tokens, 0),
        ):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        if not isinstance(prompt_template, str) or "{instruction}" not in prompt_template:
            raise ValueError(f"prompt_template must be a string containing '{{instruction}}', got {prompt_template!r}")
        try:
            prompt_template.format(instruction="")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"prompt_template may only use the field {{instruction}}: {err}") from None
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

        self.num_latent_codes = int(num_latent_codes)
        self.latent_sequence_length = int(latent_sequence_length)
        self.num_action_bins = int(num_action_bins)
        self.num_image_tokens = int(num_image_tokens)
        self.image_token = image_token
        self.prompt_template = prompt_template
        self.add_bos = bool(add_bos)
        self.action_chunk_size = int(action_chunk_size)
        self.image_layout = image_layout
        # None when the model has no action block (a latent-pretrained LWM checkpoint: `LWMProcessor`).
        self.action_tokenizer = ActionTokenizer(num_bins=self.num_action_bins) if self.num_action_bins else None

        if self.add_bos and tokenizer.bos_token_id is None:
            raise ValueError("add_bos=True but the tokenizer has no BOS token; pass add_bos=False or set bos_token")
        if tokenizer.pad_token_id is None:
            raise ValueError(
                "the tokenizer has no pad token, which left padding needs; set one first (e.g. "
                "tokenizer.pad_token = tokenizer.eos_token)"
            )
        self._image_token_id, self._latent_offset, self._action_offset = self._locate_special_tokens()
        self._image_prompt_ids = self._build_image_prompt_ids()

    # ------------------------------------------------------------------------------------------------------------
    # Construction
    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_components(cls, tokenizer, image_processor, action_tokenizer: ActionTokenizer | None = None,
                        **settings) -> LAPAProcessor:
        r"""Make a processor from a backbone tokenizer, adding the LAPA tokens to it (in place) if missing.

        `settings` are the keyword arguments of the constructor (`num_latent_codes`, `latent_sequence_length`,
        `num_action_bins`, `num_image_tokens`, `image_token`, `prompt_template`, `add_bos`, `image_layout`, ...),
        with its defaults.
        Missing tokens are added as special tokens (never split, skipped by `decode(..., skip_special_tokens=True)`)
        in this order: the image token, `<latent_0>` ... `<latent_{C-1}>`, `<action_0>` ... `<action_{N-1}>`. New
        tokens get fresh ids after the existing vocabulary, so no existing id changes meaning; the model's embedding
        matrix must then be resized to `processor.vocab_size`. The wrapper tokens of `image_layout="idefics3"` are
        never added: they are the backbone's own (trained) tokens, so a tokenizer without them is an error.
        """
        parameters = inspect.signature(cls.__init__).parameters
        unknown = sorted(set(settings) - (set(parameters) - {"self", "image_processor", "tokenizer"}))
        if unknown:
            raise TypeError(f"{cls.__name__}.from_components got unknown setting(s) {unknown}")
        layout = {name: settings.get(name, parameters[name].default)
                  for name in ("image_token", "num_latent_codes", "num_action_bins")}
        vocab = tokenizer.get_vocab()
        if layout["image_token"] not in vocab:
            tokenizer.add_tokens([_special(layout["image_token"])], special_tokens=True)
        new_tokens = [latent_token(k) for k in range(layout["num_latent_codes"])]
        new_tokens += [action_token(k) for k in range(layout["num_action_bins"])]
        missing = [token for token in new_tokens if token not in vocab]
        if missing:
            tokenizer.add_tokens([_special(token) for token in missing], special_tokens=True)
        # The processor pads on the left itself; keep the tokenizer's own padding consistent with it.
        tokenizer.padding_side = "left"
        processor = cls(image_processor, tokenizer, **settings)
        if action_tokenizer is not None:
            processor.set_action_tokenizer(action_tokenizer)
        return processor

    def _locate_special_tokens(self) -> tuple[int, int, int]:
        """Ids of the image token, `<latent_0>` and `<action_0>`; checks that each block is present and contiguous."""
        vocab = self.tokenizer.get_vocab()
        if self.image_token not in vocab:
            raise ValueError(
                f"the tokenizer has no image token {self.image_token!r}; build the processor with "
                "LAPAProcessor.from_components(...), which adds it"
            )
        offsets = []
        for kind, make, count in (
            ("latent", latent_token, self.num_latent_codes),
            ("action", action_token, self.num_action_bins),
        ):
            names = [make(k) for k in range(count)]
            missing = [name for name in names if name not in vocab]
            if missing:
                raise ValueError(
                    f"the tokenizer lacks {len(missing)} of the {count} {kind} tokens (e.g. {missing[0]}); build the "
                    "processor with LAPAProcessor.from_components(...), which adds them"
                )
            ids = np.array([vocab[name] for name in names])
            if not np.array_equal(ids, ids[0] + np.arange(count)):
                raise ValueError(
                    f"the {kind} tokens {names[0]} ... {names[-1]} do not have contiguous ids (got ids from "
                    f"{ids.min()} to {ids.max()}); LAPA decodes them by offset, so they must be added in order to a "
                    "tokenizer that has none of them"
                )
            offsets.append(int(ids[0]))
        return int(vocab[self.image_token]), offsets[0], offsets[1]

    def _build_image_prompt_ids(self) -> list[int]:
        """The ids one image takes in the prompt (see `image_layout`), the wrapper tokens looked up in the tokenizer."""
        placeholders = [self._image_token_id] * self.num_image_tokens
        if self.image_layout == "plain":
            return placeholders
        vocab = self.tokenizer.get_vocab()
        missing = [token for token in (FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN) if token not in vocab]
        if missing:
            raise ValueError(
                f"image_layout='idefics3' wraps each image as {FAKE_IMAGE_TOKEN} {GLOBAL_IMAGE_TOKEN} <image>... "
                f"{FAKE_IMAGE_TOKEN} (Idefics3/SmolVLM's own layout), but the tokenizer has no "
                f"{' and no '.join(repr(token) for token in missing)} token; use the backbone's own tokenizer (those "
                "of SmolVLM and Idefics3 hold them), or image_layout='plain' for a backbone that has no such tokens"
            )
        fake, global_image = vocab[FAKE_IMAGE_TOKEN], vocab[GLOBAL_IMAGE_TOKEN]
        return [fake, global_image] + placeholders + [fake]

    # ------------------------------------------------------------------------------------------------------------
    # Token ids
    # ------------------------------------------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        """Id of the image placeholder token."""
        return self._image_token_id

    @property
    def image_prompt_ids(self) -> list[int]:
        """The ids one image takes in the prompt: `num_image_tokens` placeholders, with the wrapper tokens of
        `image_layout` around them ("idefics3"); ordinary prompt tokens except the placeholders."""
        return list(self._image_prompt_ids)

    @property
    def latent_token_offset(self) -> int:
        """Id of `<latent_0>`; latent code k has id `latent_token_offset + k`."""
        return self._latent_offset

    @property
    def action_token_offset(self) -> int:
        """Id of `<action_0>`; action bin k has id `action_token_offset + k`."""
        return self._action_offset

    @property
    def vocab_size(self) -> int:
        """Size of the tokenizer's vocabulary including the added tokens (`len(tokenizer)`)."""
        return len(self.tokenizer)

    # ------------------------------------------------------------------------------------------------------------
    # Action statistics
    # ------------------------------------------------------------------------------------------------------------
    def fit_action_tokenizer(
        self, actions, dataset: str, gripper_dims=None, gripper_threshold: float = 0.0
    ) -> ActionTokenizer:
        """Fit the action bins of one dataset (see [`ActionTokenizer.fit`]); returns the action tokenizer."""
        return self.action_tokenizer.fit(
            actions, dataset=dataset, gripper_dims=gripper_dims, gripper_threshold=gripper_threshold
        )

    def set_action_tokenizer(self, action_tokenizer: ActionTokenizer) -> None:
        """Use an already fitted action tokenizer (its number of bins must match `num_action_bins`)."""
        if not isinstance(action_tokenizer, ActionTokenizer):
            raise TypeError(f"expected an ActionTokenizer, got {type(action_tokenizer).__name__}")
        if action_tokenizer.num_bins != self.num_action_bins:
            raise ValueError(
                f"the action tokenizer has {action_tokenizer.num_bins} bins but the processor has "
                f"num_action_bins={self.num_action_bins}"
            )
        self.action_tokenizer = action_tokenizer

    # ------------------------------------------------------------------------------------------------------------
    # Encoding
    # ------------------------------------------------------------------------------------------------------------
    def __call__(
        self,
        images=None,
        text=None,
        latent_codes=None,
        actions=None,
        dataset: str | None = None,
        center_crop: bool = False,
        return_tensors: str | None = "pt",
        task: str | None = None,
    ) -> BatchFeature:
        r"""Build a batch.

        Args:
            images: one image per instruction, in any form [`LAPAImageProcessor`] accepts.
            text (`str` or `list[str]`): the instructions (B of them).
            latent_codes (`(B, s)` ints in `[0, |C|)`, *optional*): latent-action targets.
            actions (`(B, k, D)` floats, *optional*): robot-action targets (k = `action_chunk_size` future actions
                per example, binned with the action tokenizer into k x D tokens, time-major); `(B, D)` when k = 1.
            dataset (`str`, *optional*): whose action statistics bin `actions`; may be omitted with one dataset.
            center_crop (`bool`, defaults to False): apply the image processor's evaluation center crop.
            return_tensors (`str`, defaults to `"pt"`): `"pt"` or `"np"`.
            task (`str`, *optional*): `"latent"` or `"action"`, what the prompt asks for (inferred from the targets;
                `"latent"` without them). The default prompt is the same for both; `LWMProcessor`'s is not.

        Returns:
            [`BatchFeature`] with `input_ids` `(B, L)` int64 (left padded with the pad id), `attention_mask` `(B, L)`
            int64 (0 on the padding), `pixel_values` `(B, 3, S, S)` float32 and, when targets are given, `labels`
            `(B, L)` int64 equal to `input_ids` at the target positions (the last s or k x D tokens) and -100
            elsewhere.
            Without targets the sequences end right after the prompt: a generation prompt.
        """
        instructions = self._check_instructions(text)
        batch_size = len(instructions)
        if images is None:
            raise ValueError("images are required: every LAPA example has one image per instruction")
        if latent_codes is not None and actions is not None:
            raise ValueError("pass either latent_codes (latent pretraining) or actions (finetuning), not both")

        pixel_values = self.image_processor(images, center_crop=center_crop, return_tensors=None)["pixel_values"]
        pixel_values = np.asarray(pixel_values, dtype=np.float32)
        if pixel_values.shape[0] != batch_size:
            raise ValueError(
                f"batch size mismatch: {pixel_values.shape[0]} image(s) for {batch_size} instruction(s); pass one "
                "image per instruction"
            )

        targets = None  # (B, T) target token ids
        if latent_codes is not None:
            targets = self._latent_codes_to_ids(latent_codes, batch_size)
        elif actions is not None:
            targets = self._actions_to_ids(actions, batch_size, dataset)
        inferred = "action" if actions is not None else "latent"
        if task is None:
            task = inferred
        elif task not in ("latent", "action") or (targets is not None and task != inferred):
            raise ValueError(f"task must be 'latent' or 'action' and agree with the targets, got {task!r}")

        sequences, label_rows = [], []
        for i, sequence in enumerate(self._prompt_sequences(instructions, task)):
            labels = [IGNORE_INDEX] * len(sequence)
            if targets is not None:
                sequence = sequence + targets[i].tolist()
                labels += targets[i].tolist()
            sequences.append(sequence)
            label_rows.append(labels)

        # Left padding: every sequence ends at the last column, so generation appends to all rows at once.
        length = max(len(sequence) for sequence in sequences)
        input_ids = np.full((batch_size, length), self.tokenizer.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((batch_size, length), dtype=np.int64)
        labels = np.full((batch_size, length), IGNORE_INDEX, dtype=np.int64)
        for i, (sequence, label_row) in enumerate(zip(sequences, label_rows)):
            input_ids[i, length - len(sequence) :] = sequence
            attention_mask[i, length - len(sequence) :] = 1
            labels[i, length - len(sequence) :] = label_row

        data = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}
        if targets is not None:
            data["labels"] = labels
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _prompt_sequences(self, instructions: list[str], task: str) -> list[list[int]]:
        """The prompt ids of every example (what precedes its targets): [bos] + the image part + the instruction."""
        prompts = [self.prompt_template.format(instruction=instruction) for instruction in instructions]
        prompt_ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        bos = [self.tokenizer.bos_token_id] if self.add_bos else []
        prefix = bos + self._image_prompt_ids
        for i, ids in enumerate(prompt_ids):
            self._check_text_ids(ids, instructions[i])
        return [prefix + list(ids) for ids in prompt_ids]

    def _check_text_ids(self, ids, instruction: str) -> None:
        reserved_low, reserved_high = self._reserved_id_range()
        image_ids = set(self._image_prompt_ids) | {self._image_token_id}
        if any(t in image_ids or reserved_low <= t < reserved_high for t in ids):
            raise ValueError(
                f"instruction {instruction!r} contains the image token or a latent/action token as text (or one of "
                "the image's wrapper tokens)"
            )

    def _check_instructions(self, text) -> list[str]:
        if text is None:
            raise ValueError("text is required: one instruction (str) or a list of instructions")
        instructions = [text] if isinstance(text, str) else text
        if not isinstance(instructions, (list, tuple)) or not instructions:
            raise ValueError(f"text must be a string or a non-empty list of strings, got {type(text).__name__}")
        for i, instruction in enumerate(instructions):
            if not isinstance(instruction, str):
                raise TypeError(f"text[{i}] must be a string, got {type(instruction).__name__}")
        return list(instructions)

    def _latent_codes_to_ids(self, latent_codes, batch_size: int) -> np.ndarray:
        codes = _to_numpy(latent_codes)
        if codes.size and not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"latent_codes must be integers, got dtype {codes.dtype}")
        expected = (batch_size, self.latent_sequence_length)
        if codes.shape != expected:
            raise ValueError(
                f"latent_codes must have shape (batch, s) = {expected} (s = latent_sequence_length), got "
                f"{tuple(codes.shape)}"
            )
        if codes.min() < 0 or codes.max() >= self.num_latent_codes:
            raise ValueError(
                f"latent codes must lie in [0, {self.num_latent_codes}) (num_latent_codes), got values from "
                f"{codes.min()} to {codes.max()}"
            )
        return codes.astype(np.int64) + self._latent_offset

    def _actions_to_ids(self, actions, batch_size: int, dataset: str | None) -> np.ndarray:
        """(B, k, D) actions (or (B, D) with k = 1) -> (B, k * D) action token ids, time-major."""
        actions = _to_numpy(actions)
        k = self.action_chunk_size
        if actions.ndim == 2 and k == 1:
            actions = actions[:, None]
        if actions.ndim != 3 or actions.shape[1] != k:
            expected = "(batch, D) or (batch, 1, D)" if k == 1 else f"(batch, {k}, D) (k = action_chunk_size = {k})"
            raise ValueError(f"actions must have shape {expected}, got shape {tuple(actions.shape)}")
        if actions.shape[0] != batch_size:
            raise ValueError(f"batch size mismatch: {actions.shape[0]} action rows for {batch_size} instruction(s)")
        bins = self.action_tokenizer.encode(actions, dataset=dataset)
        return bins.reshape(batch_size, -1) + self._action_offset

    def num_action_tokens(self, dataset: str | None = None) -> int:
        """Action tokens one prediction holds: k x D (k = `action_chunk_size`, D the dataset's action size)."""
        return self.action_chunk_size * self.action_tokenizer.action_dim(dataset)

    def _reserved_id_range(self) -> tuple[int, int]:
        """Half-open id range covering the latent and the action tokens (they may be separate blocks)."""
        low = min(self._latent_offset, self._action_offset)
        high = max(self._latent_offset + self.num_latent_codes, self._action_offset + self.num_action_bins)
        return low, high

    # ------------------------------------------------------------------------------------------------------------
    # Decoding
    # ------------------------------------------------------------------------------------------------------------
    def decode_latent_actions(self, token_ids):
        r"""Latent-action token ids -> latent codes.

        Args:
            token_ids (`(B, s)` or `(s,)` ints, numpy or torch): ids of `<latent_k>` tokens.

        Returns:
            the codes `token_ids - latent_token_offset` in `[0, |C|)`, int64, torch if the input was torch.
        """
        ids, as_torch = _to_numpy(token_ids), _is_torch(token_ids)
        if ids.ndim == 0 or ids.shape[-1] != self.latent_sequence_length:
            raise ValueError(
                f"expected {self.latent_sequence_length} latent tokens per example (last axis), got shape "
                f"{tuple(ids.shape)}"
            )
        codes = ids.astype(np.int64) - self._latent_offset
        bad = (codes < 0) | (codes >= self.num_latent_codes)
        if bad.any():
            raise ValueError(
                f"token ids {sorted(set(ids[bad].tolist()))[:8]} are not latent-action tokens (those are ids "
                f"{self._latent_offset} ... {self._latent_offset + self.num_latent_codes - 1})"
            )
        if as_torch:
            import torch

            return torch.from_numpy(codes)
        return codes

    def decode_actions(self, token_ids, dataset: str | None = None) -> np.ndarray:
        r"""Action token ids -> continuous actions (bin midpoints; gripper dims to the dataset's low/high).

        Args:
            token_ids (`(B, D)` or `(D,)` ints, numpy or torch): ids of `<action_k>` tokens; with
                `action_chunk_size` k > 1, `(B, k * D)` or `(k * D,)` (time-major, as the model emits them).
            dataset (`str`, *optional*): whose statistics to use; may be omitted when only one is fitted.

        Returns:
            `np.ndarray` `(B, D)` (or `(D,)`), float32; `(B, k, D)` (or `(k, D)`) when k > 1.
        """
        ids = _to_numpy(token_ids).astype(np.int64)
        k = self.action_chunk_size
        if k > 1:
            expected = self.num_action_tokens(dataset)
            if ids.ndim == 0 or ids.shape[-1] != expected:
                raise ValueError(f"expected k x D = {expected} action tokens per example (last axis; k = "
                                 f"action_chunk_size = {k}), got shape {tuple(ids.shape)}")
            ids = ids.reshape(*ids.shape[:-1], k, expected // k)
        bins = ids - self._action_offset
        bad = (bins < 0) | (bins >= self.num_action_bins)
        if bad.any():
            raise ValueError(
                f"token ids {sorted(set(ids[bad].tolist()))[:8]} are not action tokens (those are ids "
                f"{self._action_offset} ... {self._action_offset + self.num_action_bins - 1})"
            )
        return self.action_tokenizer.decode(bins, dataset=dataset)

    # ------------------------------------------------------------------------------------------------------------
    # Saving and loading: the ProcessorMixin files plus action_tokenizer.json
    # ------------------------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> list[str]:
        """Save like any processor (`processor_config.json`, tokenizer files, code with `auto_map` when registered)
        and also `action_tokenizer.json`. With `push_to_hub=True` the folder is then uploaded with `push_to_hub`."""
        hub_kwargs = {}
        if push_to_hub:
            hub_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key != "max_shard_size"}
        files = super().save_pretrained(save_directory, push_to_hub=False, **kwargs)
        if self.action_tokenizer is not None:
            files.append(self.action_tokenizer.save(os.path.join(save_directory, ACTION_TOKENIZER_NAME)))
        if push_to_hub:
            repo_id = hub_kwargs.pop("repo_id", os.path.basename(os.path.normpath(save_directory)))
            self.push_to_hub(repo_id, **hub_kwargs)
        return files

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load like any processor, then read `action_tokenizer.json` from the same folder or Hub repository (a
        processor saved without it gets an empty action tokenizer)."""
        loaded = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        processor = loaded[0] if isinstance(loaded, tuple) else loaded
        path = os.fspath(pretrained_model_name_or_path)
        if not os.path.isfile(path):
            action_file = cached_file(
                path,
                ACTION_TOKENIZER_NAME,
                subfolder=kwargs.get("subfolder", "") or "",
                cache_dir=kwargs.get("cache_dir"),
                force_download=kwargs.get("force_download", False),
                local_files_only=kwargs.get("local_files_only", False),
                token=kwargs.get("token"),
                revision=kwargs.get("revision"),
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
            )
            if action_file is not None:
                processor.set_action_tokenizer(ActionTokenizer.load(action_file))
        return loaded


def _special(token: str) -> AddedToken:
    # normalized=False: matched on the raw text, so normalisers (lower-casing, prefix spaces) never break it apart.
    return AddedToken(token, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)


def _is_torch(value) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _to_numpy(values) -> np.ndarray:
    if _is_torch(values):
        return values.detach().cpu().numpy()
    return np.asarray(values)
