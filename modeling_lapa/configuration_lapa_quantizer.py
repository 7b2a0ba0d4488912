"""Configuration of the LAPA latent action quantizer (LAQ).

The defaults are the sizes of the authors' released quantizer (`laq_openx.pt`): a frame pair at 256 x 256 px cut
into 32 px patches (an 8 x 8 grid), width 1024, 8-layer spatial and temporal encoder stacks, an 8-layer spatial
decoder, 16 heads of 64, and a latent action of s = 4 codes from a codebook of |C| = 8 vectors of size 32.
"""

from __future__ import annotations

import math

from transformers import PretrainedConfig

# How the NSVQ downsampling CNN turns the (q, h, w) token grid into s code vectors, for the values of s the
# reference supports. Each entry: grid side the stack is built for, then the conv layers as
# (kernel, stride, padding); a ReLU sits between consecutive convs.
CNN_ENCODER_LAYOUTS: dict[int, tuple[int, tuple[tuple, ...]]] = {
    1: (8, ((3, 2, 1), (4, 1, 0))),
    2: (8, ((3, 2, 1), ((3, 4), 1, 0))),
    4: (8, ((3, 2, 1), (3, 1, 0))),
    16: (16, ((3, 2, 1), (3, 2, 1))),
    64: (16, ((3, 2, 1),)),
    256: (32, ((3, 2, 1),)),
}

# Steps at which the reference replaces unused codes: every 10 steps below 100, every 100 below 1000, every 500
# below 5000, never at step 0.
REFERENCE_REPLACEMENT_STEPS: tuple[int, ...] = tuple(
    sorted({s for s in range(10, 100, 10)} | {s for s in range(100, 1000, 100)} | {s for s in range(1000, 5000, 500)})
)

PRESETS: dict[str, dict] = {
    # The released quantizer's sizes (about 0.34B parameters).
    "reference": dict(
        hidden_size=1024, quant_dim=32, codebook_size=8, code_seq_len=4, image_size=256, patch_size=32,
        spatial_depth=8, temporal_depth=8, num_heads=16, head_dim=64,
    ),
    # A CPU-sized model for 64 x 64 px frames (8 x 8 grid of 8 px patches, so the same NSVQ layout as the
    # reference); about 1.2M parameters; trains at roughly 50-80 pairs/s on 2 CPU cores in fp32 (about twice that
    # with --mixed-precision bf16; benchmarks/quantizer_speed.py).
    "tiny": dict(
        hidden_size=128, quant_dim=32, codebook_size=8, code_seq_len=4, image_size=64, patch_size=8,
        spatial_depth=2, temporal_depth=2, num_heads=4, head_dim=32,
    ),
}


class LAPAQuantizerConfig(PretrainedConfig):
    r"""Configuration of [`LAPAQuantizerModel`].

    Args:
        hidden_size (`int`, defaults to 1024): width of every transformer stack (the reference's `dim`).
        quant_dim (`int`, defaults to 32): size q of a latent action vector and of a codebook entry.
        codebook_size (`int`, defaults to 8): number |C| of codebook vectors.
        code_seq_len (`int`, defaults to 4): number s of codes per frame pair (1, 2, 4, 16, 64 or 256).
        image_size (`int`, defaults to 256): side of the square input frames, in pixels.
        patch_size (`int`, defaults to 32): side of a patch; the token grid is `image_size // patch_size` square.
        num_channels (`int`, defaults to 3): channels of a frame.
        spatial_depth (`int`, defaults to 8): layers of the encoder's and the decoder's spatial stacks.
        temporal_depth (`int`, defaults to 8): layers of the encoder's temporal stack.
        num_heads (`int`, defaults to 16), head_dim (`int`, defaults to 64): attention heads and their size.
        attention_logit_scale (`float`, defaults to 8.0): fixed multiplier of the cosine-similarity logits.
        num_cross_attention_null_kv (`int`, defaults to 2): learned null key/value pairs of the decoder's
            cross-attention.
        ff_mult (`float`, defaults to 4): feed-forward width multiplier (inner width `int(ff_mult * 2/3 * hidden)`).
        codebook_replacement (`bool`, defaults to True): replace unused codes during training (NSVQ).
        replacement_steps (`list[int]`, *optional*): training steps at which to replace; `None` = the reference
            schedule (10, 20, ..., 90, 100, ..., 900, 1000, 1500, ..., 4500).
        replacement_threshold (`float`, defaults to 0.1): a code is unused when its hits since the last replacement,
            divided by the batch size, fall below this.
        replacement_seed (`int`, defaults to 0): seed of the random choices of a replacement; mixed with the step, so
            every rank of a distributed run draws the same choices.
        replacement_noise (`float`, defaults to 1e-12): standard deviation of the Gaussian noise added to the copies
            of used codes that replace unused ones. At 1e-12 or below it is absolute: the reference's rule exactly
            (1e-12), which float32 cannot represent next to entries of ordinary size, so the copies are exact
            duplicates of used codes, ties go to the lower index and a copy never takes pairs from its original.
            Above 1e-12 it is relative to the root-mean-square entry of the copied code (e.g. 0.1), so that a copy
            lands near its original and can split its pairs.
        replacement_min_share (`float`, *optional*): also count a code as unused when its share of the quantised
            vectors since the last replacement (of its slot's, with per-slot codebooks) is below this, e.g. 0.03.
            The reference rule compares hits with one batch, which over intervals of 100-500 steps almost never
            fires after the first few hundred steps; a share rule keeps rarely chosen codes in play. `None` (the
            default) = the reference rule only.
        codebook_per_slot (`bool`, defaults to False): give each of the s slots its own codebook of |C| vectors
            (shape (s, |C|, q)) and run the replacement rule per slot. The reference shares one codebook; its slots
            see different parts of the frame (the 2 x 2 output of the NSVQ CNN for s = 4) and on robot video they
            split the shared codes between them (e.g. the slots over the arm use some, the slots over the table
            the others), so that no slot uses all of them. Off for the reference (and converted checkpoints).
        initializer_range (`float`, defaults to 0.02): kept for transformers' conventions; the weights are
            initialised like the reference (PyTorch's defaults), see `_init_weights`.
        gap_seconds (`float`, *optional*): the time between the two frames of the pairs the model was trained on
            (reference: 0.6 s for robot video). Not used by the model: it is what the quantizer tells the stages
            after it (labelling pairs frames with the same gap). `training/train_quantizer.py` writes it; `None`
            (unknown, e.g. a converted reference checkpoint) lets the labelling use its default.
    """

    model_type = "lapa_quantizer"

    def __init__(
        self,
        hidden_size: int = 1024,
        quant_dim: int = 32,
        codebook_size: int = 8,
        code_seq_len: int = 4,
        image_size: int = 256,
        patch_size: int = 32,
        num_channels: int = 3,
        spatial_depth: int = 8,
        temporal_depth: int = 8,
        num_heads: int = 16,
        head_dim: int = 64,
        attention_logit_scale: float = 8.0,
        num_cross_attention_null_kv: int = 2,
        ff_mult: float = 4,
        codebook_replacement: bool = True,
        replacement_steps: list[int] | None = None,
        replacement_threshold: float = 0.1,
        replacement_seed: int = 0,
        codebook_per_slot: bool = False,
        replacement_noise: float = 1e-12,
        replacement_min_share: float | None = None,
        initializer_range: float = 0.02,
        gap_seconds: float | None = None,
        **kwargs,
    ):
        if gap_seconds is not None and not gap_seconds > 0:
            raise ValueError(f"gap_seconds must be positive (or None = unknown), got {gap_seconds}")
        self.gap_seconds = gap_seconds
        self.hidden_size = hidden_size
        self.quant_dim = quant_dim
        self.codebook_size = codebook_size
        self.code_seq_len = code_seq_len
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.spatial_depth = spatial_depth
        self.temporal_depth = temporal_depth
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attention_logit_scale = attention_logit_scale
        self.num_cross_attention_null_kv = num_cross_attention_null_kv
        self.ff_mult = ff_mult
        self.codebook_replacement = codebook_replacement
        self.replacement_steps = list(replacement_steps) if replacement_steps is not None else None
        self.replacement_threshold = replacement_threshold
        self.replacement_seed = replacement_seed
        self.codebook_per_slot = codebook_per_slot
        self.replacement_noise = replacement_noise
        if replacement_min_share is not None and not 0.0 <= replacement_min_share < 1.0 / codebook_size:
            raise ValueError(
                f"replacement_min_share must be in [0, 1/codebook_size) = [0, {1.0 / codebook_size:.4g}), got "
                f"{replacement_min_share}: at 1/|C| or above every code would count as unused"
            )
        self.replacement_min_share = replacement_min_share
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})."
            )
        if self.code_seq_len not in CNN_ENCODER_LAYOUTS:
            raise ValueError(
                f"code_seq_len={self.code_seq_len} is not supported; the reference quantizer supports "
                f"{sorted(CNN_ENCODER_LAYOUTS)}."
            )
        grid_side, _ = CNN_ENCODER_LAYOUTS[self.code_seq_len]
        if self.grid_size != grid_side:
            raise ValueError(
                f"code_seq_len={self.code_seq_len} needs a {grid_side}x{grid_side} token grid, but image_size "
                f"{self.image_size} / patch_size {self.patch_size} gives {self.grid_size}x{self.grid_size}."
            )
        for name in ("hidden_size", "quant_dim", "codebook_size", "num_heads", "head_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")

    @property
    def grid_size(self) -> int:
        """Side h = w of the patch grid."""
        return self.image_size // self.patch_size

    @property
    def action_grid(self) -> tuple[int, int]:
        """How the s action tokens are laid out as a grid (only matters for shapes): sqrt(s) square, or 2 x 1."""
        side = math.isqrt(self.code_seq_len)
        if side * side == self.code_seq_len:
            return side, side
        return 2, 1

    @property
    def ff_inner_size(self) -> int:
        # Same expression, in the same order, as the reference, so rounding gives the same width.
        return int(self.ff_mult * (2 / 3) * self.hidden_size)

    def is_replacement_step(self, step: int) -> bool:
        """Whether codebook replacement runs at training step `step` (never at step 0)."""
        if not self.codebook_replacement or step <= 0:
            return False
        steps = self.replacement_steps if self.replacement_steps is not None else REFERENCE_REPLACEMENT_STEPS
        return step in steps

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "LAPAQuantizerConfig":
        """Build a config from a named preset (`"reference"` or `"tiny"`), with keyword overrides."""
        if name not in PRESETS:
            raise ValueError(f"Unknown quantizer preset {name!r}; choose one of {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_reference_kwargs(cls, kwargs: dict, **overrides) -> "LAPAQuantizerConfig":
        """Build a config from the reference constructor's arguments (`dim`, `heads`, `dim_head`, ...)."""
        renames = {"dim": "hidden_size", "heads": "num_heads", "dim_head": "head_dim", "channels": "num_channels"}
        known = {
            "dim", "quant_dim", "codebook_size", "image_size", "patch_size", "spatial_depth", "temporal_depth",
            "dim_head", "heads", "code_seq_len", "channels", "attn_dropout", "ff_dropout",
        }
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"Unknown reference constructor arguments {unknown}; expected a subset of {sorted(known)}.")
        for dropout_key in ("attn_dropout", "ff_dropout"):
            if kwargs.get(dropout_key, 0.0) not in (0, 0.0):
                raise ValueError(f"{dropout_key}={kwargs[dropout_key]} is not supported (the released model uses 0).")
        for size_key in ("image_size", "patch_size"):
            value = kwargs.get(size_key)
            if isinstance(value, (list, tuple)):
                if len(set(value)) != 1:
                    raise ValueError(f"Only square {size_key} is supported, got {value}.")
                kwargs = {**kwargs, size_key: value[0]}
        args = {renames.get(k, k): v for k, v in kwargs.items() if k not in ("attn_dropout", "ff_dropout")}
        return cls(**{**args, **overrides})


__all__ = ["LAPAQuantizerConfig", "PRESETS", "REFERENCE_REPLACEMENT_STEPS"]
