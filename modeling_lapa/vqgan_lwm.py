"""LWM's VQGAN in PyTorch: the image tokenizer of Large World Model and of the released LAPA-7B.

A 256 x 256 RGB image in [-1, 1] becomes a 16 x 16 grid of codebook indices (8192 codes of size 64); the decoder
turns such a grid back into pixels. This is our own re-implementation of the authors' Flax module
(`lwm/vqgan.py`, used unchanged by LAPA's `latent_pretraining/vqgan.py`), written to reproduce it numerically:

    pixels (B, 3, 256, 256) in [-1, 1]
      encoder:  conv_in 3x3 -> 5 levels x [num_res_blocks ResnetBlocks (+ Downsample except the last level)]
                -> mid (2 ResnetBlocks, no attention) -> GroupNorm -> swish -> conv_out 3x3 (z_channels)
      quant_conv 1x1 -> nearest codebook entry (squared distance |z|^2 + |e|^2 - 2 z.e, first index on ties)
    codes (B, 16, 16)
      codebook lookup -> post_quant_conv 1x1
      decoder:  conv_in 3x3 -> mid -> 5 levels (deepest first) x [num_res_blocks + 1 ResnetBlocks (+ Upsample
                except the last)] -> GroupNorm -> swish -> conv_out 3x3 -> clip to [-1, 1]
    pixels (B, 3, 256, 256)

Details that matter for bit-for-bit codes (LWM's Flax module as described in the golden data's layout notes,
checked against the authors' JAX outputs in tests/test_lwm_vqgan.py):
    * ResnetBlock: GroupNorm -> swish -> conv3x3 -> GroupNorm -> swish -> (dropout) -> conv3x3, plus the input,
      through a 1x1 conv when the width changes.
    * GroupNorm: 32 groups, eps 1e-6, variance computed as E[x^2] - E[x]^2 as flax 0.7 does, then
      (x - mean) * (rsqrt(var + eps) * scale) + bias (6x closer to the golden features than torch's group_norm).
    * Downsample: pad 0 rows/cols before and 1 after (bottom/right only), then 3x3 stride 2 without padding.
      PyTorch's symmetric `padding=1` would shift the grid by one pixel.
    * Upsample: nearest x2 (each pixel repeated 2 x 2), then 3x3 conv.
    * 3x3 convs otherwise use SAME padding (1 on every side).
    * The quantized features the official `encode` returns are z + (e - z) (the straight-through form), which
      differs from e in the last bits; `decode` from codes uses e itself.

The module names mirror the Flax tree (`encoder.down.{level}.block.{i}`, `decoder.up.{k}` in the Flax creation
order, i.e. `up.0` is the deepest level, as `UpsamplingBlock_0`); `convert_lwm_vqgan.py` maps a Flax param tree
onto them. Tensors are NCHW as usual in PyTorch; the Flax code is NHWC.

The official image preprocessing (albumentations LongestMaxSize + Resize with cv2 INTER_LINEAR on uint8, reproduced
bit for bit in NumPy, then x / 127.5 - 1) is the processor's job: `processing_lapa.LWMImageProcessor`.

diffusers' `VQModel` (DownEncoderBlock2D/UpDecoderBlock2D, `mid_block_add_attention=False`, block_out_channels
(128, 256, 256, 512, 768), 64 latent channels, 8192 codes) has the same layer graph, but its quantizer measures
distances with `torch.cdist` and its decoder does not clip, so its codes are not guaranteed identical near ties;
this module keeps the official arithmetic and does not depend on diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .loading import StrictLoadingMixin

# LWM's `VQGANConfig.get_default_config()`: the sizes of the released `vqgan` file (146,244,675 parameters,
# 585 MB as fp32) that LAPA-7B reads images with.
LWM_VQGAN_RELEASED = dict(
    hidden_channels=128,
    channel_mult=(1, 2, 2, 4, 6),
    num_res_blocks=2,
    z_channels=64,
    quantized_embed_dim=64,
    num_embeddings=8192,
    num_channels=3,
    resolution=256,
    attn_resolutions=(),
    no_attn_mid_block=True,
    resample_with_conv=True,
    dropout=0.0,
    commitment_cost=0.25,
)

# The structure of the authors' tiny golden VQGAN (same layout, smaller widths, 1024 codes).
LWM_VQGAN_TINY = dict(LWM_VQGAN_RELEASED, hidden_channels=32, channel_mult=(1, 1, 1, 1, 2), num_embeddings=1024)

PRESETS = {"released": LWM_VQGAN_RELEASED, "tiny": LWM_VQGAN_TINY}


class LWMVQGANConfig(PretrainedConfig):
    r"""Configuration of [`LWMVQGANModel`]; the defaults are the released model's (LWM's default config).

    Args:
        hidden_channels (`int`, defaults to 128): width of the first level.
        channel_mult (`tuple[int]`, defaults to `(1, 2, 2, 4, 6)`): width of each level as a multiple of
            `hidden_channels`; one level per entry, each but the last halves the resolution (5 levels: 256 -> 16).
        num_res_blocks (`int`, defaults to 2): ResnetBlocks per encoder level (the decoder has one more per level).
        z_channels (`int`, defaults to 64): channels of the encoder output and of the decoder input.
        quantized_embed_dim (`int`, defaults to 64): size of a codebook vector.
        num_embeddings (`int`, defaults to 8192): number of codebook vectors.
        num_channels (`int`, defaults to 3): image channels.
        resolution (`int`, defaults to 256): image side the model was trained on (informative; any side divisible
            by 2**(levels-1) works).
        attn_resolutions (`tuple[int]`, defaults to `()`), no_attn_mid_block (`bool`, defaults to `True`): LWM's
            attention options. The released model uses none; attention is not implemented here and a config
            asking for it is refused.
        resample_with_conv (`bool`, defaults to `True`): strided-conv downsampling and conv after upsampling (else
            2x2 average pooling / plain nearest upsampling).
        dropout (`float`, defaults to 0.0): dropout inside ResnetBlocks (training only).
        commitment_cost (`float`, defaults to 0.25): VQ commitment weight (kept for completeness; unused here).
        norm_num_groups (`int`, defaults to 32), norm_eps (`float`, defaults to 1e-6): Flax `nn.GroupNorm` defaults.
        clip_output (`bool`, defaults to `True`): clip decoded pixels to [-1, 1] as LWM's `decode` does.
    """

    model_type = "lwm_vqgan"

    def __init__(
        self,
        hidden_channels: int = 128,
        channel_mult=(1, 2, 2, 4, 6),
        num_res_blocks: int = 2,
        z_channels: int = 64,
        quantized_embed_dim: int = 64,
        num_embeddings: int = 8192,
        num_channels: int = 3,
        resolution: int = 256,
        attn_resolutions=(),
        no_attn_mid_block: bool = True,
        resample_with_conv: bool = True,
        dropout: float = 0.0,
        commitment_cost: float = 0.25,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        clip_output: bool = True,
        **kwargs,
    ):
        channel_mult = [int(m) for m in channel_mult]
        attn_resolutions = [int(r) for r in attn_resolutions]
        if not channel_mult or min(channel_mult) < 1:
            raise ValueError(f"`channel_mult` must be a non-empty list of positive ints, got {channel_mult}.")
        if attn_resolutions or not no_attn_mid_block:
            # Out of scope, not missing: LWM's VQGAN (the one LAPA-7B reads) has no attention blocks.
            raise ValueError(
                "LWMVQGANConfig: unsupported VQGAN variant with attention blocks (attn_resolutions / "
                "no_attn_mid_block=False); LWM's VQGAN has none (attn_resolutions=(), no_attn_mid_block=True)."
            )
        widths = [hidden_channels * m for m in channel_mult]
        bad = [w for w in widths if w % norm_num_groups]
        if bad:
            raise ValueError(f"every level width must be divisible by norm_num_groups={norm_num_groups}, got {widths}.")
        self.hidden_channels = int(hidden_channels)
        self.channel_mult = channel_mult
        self.num_res_blocks = int(num_res_blocks)
        self.z_channels = int(z_channels)
        self.quantized_embed_dim = int(quantized_embed_dim)
        self.num_embeddings = int(num_embeddings)
        self.num_channels = int(num_channels)
        self.resolution = int(resolution)
        self.attn_resolutions = attn_resolutions
        self.no_attn_mid_block = bool(no_attn_mid_block)
        self.resample_with_conv = bool(resample_with_conv)
        self.dropout = float(dropout)
        self.commitment_cost = float(commitment_cost)
        self.norm_num_groups = int(norm_num_groups)
        self.norm_eps = float(norm_eps)
        self.clip_output = bool(clip_output)
        super().__init__(**kwargs)

    @property
    def num_resolutions(self) -> int:
        return len(self.channel_mult)

    @property
    def downsample_factor(self) -> int:
        """Pixels per token side: 2 ** (levels - 1) (16 for the released model)."""
        return 2 ** (self.num_resolutions - 1)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "LWMVQGANConfig":
        """`"released"` (LWM's default, the LAPA-7B tokenizer) or `"tiny"` (the authors' tiny golden model)."""
        if name not in PRESETS:
            raise ValueError(f"unknown LWM VQGAN preset {name!r}; choose from {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_param_shapes(cls, shapes: dict, **overrides) -> "LWMVQGANConfig":
        """Read the sizes from a Flax param tree: `shapes` maps '/'-joined key paths ("encoder/Conv_0/kernel") to
        array shapes (or arrays). The layout conventions (GroupNorm groups/eps, no attention) are LWM's."""
        shapes = {k: tuple(getattr(v, "shape", v)) for k, v in shapes.items()}

        def need(key):
            if key not in shapes:
                raise KeyError(f"LWM VQGAN param tree has no {key!r}; is this an LWM VQGAN?")
            return shapes[key]

        if any("Attn" in k for k in shapes):
            raise ValueError("unsupported VQGAN: its param tree has attention blocks; LWMVQGANModel is LWM's "
                             "attention-free VQGAN (the one LAPA-7B uses).")
        hidden = need("encoder/Conv_0/kernel")[-1]
        levels = 0
        while f"encoder/DownsamplingBlock_{levels}/ResnetBlock_0/Conv_0/kernel" in shapes:
            levels += 1
        if levels == 0:
            raise KeyError("LWM VQGAN param tree has no encoder/DownsamplingBlock_0.")
        mult = []
        for level in range(levels):
            width = need(f"encoder/DownsamplingBlock_{level}/ResnetBlock_0/Conv_0/kernel")[-1]
            if width % hidden:
                raise ValueError(f"level {level} width {width} is not a multiple of hidden_channels {hidden}.")
            mult.append(width // hidden)
        blocks = 0
        while f"encoder/DownsamplingBlock_0/ResnetBlock_{blocks}/Conv_0/kernel" in shapes:
            blocks += 1
        values = dict(
            hidden_channels=hidden,
            channel_mult=tuple(mult),
            num_res_blocks=blocks,
            z_channels=need("encoder/Conv_1/kernel")[-1],
            quantized_embed_dim=need("quant_conv/kernel")[-1],
            num_embeddings=need("quantize/embeddings")[0],
            num_channels=need("encoder/Conv_0/kernel")[2],
            resample_with_conv="encoder/DownsamplingBlock_0/Downsample_0/Conv_0/kernel" in shapes,
        )
        values.update(overrides)
        return cls(**values)


# ------------------------------------------------------------------------------------------------------ layers
class LWMGroupNorm(nn.Module):
    """Flax `nn.GroupNorm` (flax 0.7): statistics over (H, W, channels of the group) with var = E[x^2] - E[x]^2,
    then (x - mean) * (rsqrt(var + eps) * scale) + bias. Input (B, C, H, W)."""

    def __init__(self, channels: int, num_groups: int = 32, eps: float = 1e-6):
        super().__init__()
        self.num_groups, self.eps = num_groups, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        groups = x.reshape(b, self.num_groups, -1)
        mean = groups.mean(dim=-1, keepdim=True)
        var = (groups.square().mean(dim=-1, keepdim=True) - mean.square()).clamp_min(0.0)
        inv = torch.rsqrt(var + self.eps)  # (b, groups, 1)
        per_channel = c // self.num_groups
        inv = inv.repeat_interleave(per_channel, dim=1).reshape(b, c, 1, 1)
        mean = mean.repeat_interleave(per_channel, dim=1).reshape(b, c, 1, 1)
        mul = inv * self.weight.reshape(1, c, 1, 1)
        return (x - mean) * mul + self.bias.reshape(1, c, 1, 1)


class LWMResnetBlock(nn.Module):
    """Flax `ResnetBlock`: norm1 -> swish -> conv1 -> norm2 -> swish -> dropout -> conv2, plus the input through
    `nin_shortcut` (1x1 conv) when the width changes. (B, C_in, H, W) -> (B, C_out, H, W)."""

    def __init__(self, config: LWMVQGANConfig, in_channels: int, out_channels: int):
        super().__init__()
        g, eps = config.norm_num_groups, config.norm_eps
        self.norm1 = LWMGroupNorm(in_channels, g, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = LWMGroupNorm(out_channels, g, eps)
        self.dropout = nn.Dropout(config.dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class LWMDownsample(nn.Module):
    """Halve H and W: pad one row at the bottom and one column at the right, then 3x3 stride-2 conv without
    padding (Flax `Downsample`); or 2x2 average pooling when `resample_with_conv` is off."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.avg_pool2d(x, 2, 2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class LWMUpsample(nn.Module):
    """Double H and W by nearest-neighbour repetition, then a 3x3 conv (Flax `Upsample`)."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class LWMMidBlock(nn.Module):
    """Two ResnetBlocks at constant width (LWM's `MidBlock` with `no_attn_mid_block=True`)."""

    def __init__(self, config: LWMVQGANConfig, channels: int):
        super().__init__()
        self.block = nn.ModuleList([LWMResnetBlock(config, channels, channels) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return x


class LWMLevel(nn.Module):
    """One resolution level: ResnetBlocks, then an optional Down/Upsample (`resample`)."""

    def __init__(self, blocks: list[nn.Module], resample: nn.Module | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.resample = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return self.resample(x) if self.resample is not None else x


class LWMEncoder(nn.Module):
    """(B, num_channels, H, W) -> (B, z_channels, H / 2**(levels-1), W / 2**(levels-1))."""

    def __init__(self, config: LWMVQGANConfig):
        super().__init__()
        widths = [config.hidden_channels * m for m in config.channel_mult]
        self.conv_in = nn.Conv2d(config.num_channels, widths[0], 3, padding=1)
        levels, width = [], widths[0]
        for level, out in enumerate(widths):
            blocks = []
            for _ in range(config.num_res_blocks):
                blocks.append(LWMResnetBlock(config, width, out))
                width = out
            last = level == len(widths) - 1
            levels.append(LWMLevel(blocks, None if last else LWMDownsample(width, config.resample_with_conv)))
        self.down = nn.ModuleList(levels)
        self.mid = LWMMidBlock(config, width)
        self.norm_out = LWMGroupNorm(width, config.norm_num_groups, config.norm_eps)
        self.conv_out = nn.Conv2d(width, config.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        x = self.mid(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class LWMDecoder(nn.Module):
    """(B, z_channels, h, w) -> (B, num_channels, h * 2**(levels-1), w * 2**(levels-1)), unclipped.

    `up[k]` is Flax's `UpsamplingBlock_k`: `up[0]` works at the deepest level (width hidden*channel_mult[-1])."""

    def __init__(self, config: LWMVQGANConfig):
        super().__init__()
        widths = [config.hidden_channels * m for m in config.channel_mult]
        width = widths[-1]
        self.conv_in = nn.Conv2d(config.z_channels, width, 3, padding=1)
        self.mid = LWMMidBlock(config, width)
        levels = []
        for level in reversed(range(len(widths))):
            out = widths[level]
            blocks = []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(LWMResnetBlock(config, width, out))
                width = out
            levels.append(LWMLevel(blocks, LWMUpsample(width, config.resample_with_conv) if level != 0 else None))
        self.up = nn.ModuleList(levels)
        self.norm_out = LWMGroupNorm(width, config.norm_num_groups, config.norm_eps)
        self.conv_out = nn.Conv2d(width, config.num_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(x))
        for level in self.up:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class LWMVectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantizer. `embedding.weight` (num_embeddings, quantized_embed_dim) is Flax's
    `quantize/embeddings`."""

    def __init__(self, config: LWMVQGANConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.num_embeddings, config.quantized_embed_dim)

    def codes(self, z: torch.Tensor) -> torch.LongTensor:
        """z (N, D) -> (N,) argmin over the codebook of |z|^2 + |e|^2 - 2 z.e, computed in fp32 with the same
        formula as the official code; ties go to the lowest index (torch.argmin, like jnp.argmin)."""
        z = z.float()
        e = self.embedding.weight.float()
        d = z.square().sum(dim=1, keepdim=True) + e.square().sum(dim=1)[None, :] - 2.0 * (z @ e.t())
        return d.argmin(dim=1)

    def lookup(self, codes: torch.LongTensor) -> torch.Tensor:
        return self.embedding(codes)


@dataclass
class LWMVQGANOutput(ModelOutput):
    """Output of [`LWMVQGANModel.forward`].

    Args:
        codes (`torch.LongTensor` of shape `(batch_size, h, w)`): codebook indices (16 x 16 for 256 px images).
        quantized (`torch.FloatTensor` of shape `(batch_size, quantized_embed_dim, h, w)`): the official encode
            output z + (e - z) (straight-through form).
        latents (`torch.FloatTensor` of shape `(batch_size, quantized_embed_dim, h, w)`): z, after `quant_conv`.
        reconstruction (`torch.FloatTensor` of shape `(batch_size, num_channels, H, W)`, *optional*): decoded
            pixels in [-1, 1], when `forward(..., decode=True)`.
    """

    codes: torch.LongTensor | None = None
    quantized: torch.FloatTensor | None = None
    latents: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None


class LWMVQGANPreTrainedModel(StrictLoadingMixin, PreTrainedModel):
    config_class = LWMVQGANConfig
    base_model_prefix = "lwm_vqgan"
    main_input_name = "pixel_values"
    _no_split_modules = ["LWMResnetBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Flax-like initialisation (the model is meant to be loaded from converted weights): convs lecun-normal
        weights and zero biases, GroupNorm ones/zeros, codebook uniform(+-1/num_embeddings) as LWM."""
        if isinstance(module, nn.Conv2d):
            fan_in = module.weight[0].numel()
            init.normal_(module.weight, std=fan_in**-0.5)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, LWMGroupNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, LWMVectorQuantizer):
            n = self.config.num_embeddings
            init.uniform_(module.embedding.weight, -1.0 / n, 1.0 / n)


class LWMVQGANModel(LWMVQGANPreTrainedModel):
    """LWM's VQGAN: `encode` turns images into codebook indices, `decode` turns indices into images.

    Pixels are NCHW floats in [-1, 1] (`processing_lapa.LWMImageProcessor` makes them from images the official way); 5-D input
    (B, T, C, H, W) is encoded frame by frame like the official code's video path.

    Example:

    ```python
    >>> import torch
    >>> from modeling_lapa.vqgan_lwm import LWMVQGANConfig, LWMVQGANModel
    >>> model = LWMVQGANModel(LWMVQGANConfig.from_preset("tiny")).eval()
    >>> codes, quantized = model.encode(torch.rand(1, 3, 256, 256) * 2 - 1)   # (1, 16, 16), (1, 64, 16, 16)
    >>> pixels = model.decode(codes)                                          # (1, 3, 256, 256) in [-1, 1]
    ```
    """

    def __init__(self, config: LWMVQGANConfig):
        super().__init__(config)
        self.encoder = LWMEncoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.quantized_embed_dim, 1)
        self.quantize = LWMVectorQuantizer(config)
        self.post_quant_conv = nn.Conv2d(config.quantized_embed_dim, config.z_channels, 1)
        self.decoder = LWMDecoder(config)
        self.post_init()

    def _check_pixels(self, pixel_values: torch.Tensor) -> None:
        c = self.config
        if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
            raise TypeError(
                "`pixel_values` must be a float tensor (B, 3, H, W) in [-1, 1] (use processing_lapa.LWMImageProcessor on images)."
            )
        if pixel_values.ndim != 4 or pixel_values.shape[1] != c.num_channels:
            raise ValueError(
                f"`pixel_values` must have shape (batch, {c.num_channels}, H, W) (or (batch, frames, "
                f"{c.num_channels}, H, W)), got {tuple(pixel_values.shape)}."
            )
        h, w = pixel_values.shape[-2:]
        f = c.downsample_factor
        if h % f or w % f:
            raise ValueError(f"image sides must be multiples of {f}, got {h}x{w} (resize to {c.resolution} first).")

    def encode_latents(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> z (B, quantized_embed_dim, H/16, W/16), before quantisation."""
        self._check_pixels(pixel_values)
        dtype = self.quant_conv.weight.dtype
        return self.quant_conv(self.encoder(pixel_values.to(dtype)))

    def encode(self, pixel_values: torch.Tensor) -> tuple[torch.LongTensor, torch.Tensor]:
        """Images -> (codes, quantized features).

        Args:
            pixel_values: `(B, C, H, W)` floats in [-1, 1] (or `(B, T, C, H, W)` video frames).
        Returns:
            codes: `(B, H/16, W/16)` int64 (`(B, T, H/16, W/16)` for video); flatten row-major for the 256
                vision tokens of LWM / LAPA.
            quantized: `(B, quantized_embed_dim, H/16, W/16)` (`(B, T, ...)` for video), the official encode
                output z + (e - z).
        """
        video = pixel_values.ndim == 5
        if video:
            b, t = pixel_values.shape[:2]
            pixel_values = pixel_values.reshape(b * t, *pixel_values.shape[2:])
        z = self.encode_latents(pixel_values)
        codes, quantized = self._quantize(z)
        if video:
            codes = codes.reshape(b, t, *codes.shape[1:])
            quantized = quantized.reshape(b, t, *quantized.shape[1:])
        return codes, quantized

    def _quantize(self, z: torch.Tensor) -> tuple[torch.LongTensor, torch.Tensor]:
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        codes = self.quantize.codes(flat)
        e = self.quantize.lookup(codes).to(flat.dtype)
        quantized = flat + (e - flat)  # the official straight-through form, forward value included
        quantized = quantized.reshape(b, h, w, d).permute(0, 3, 1, 2)
        return codes.reshape(b, h, w), quantized

    def decode(self, codes: torch.LongTensor) -> torch.Tensor:
        """Codes -> pixels.

        Args:
            codes: `(B, h, w)` integer codebook indices, or `(B, h*w)` for a square grid (the 256 flattened vision
                tokens), or `(B, T, h, w)` video.
        Returns:
            `(B, C, 16h, 16w)` floats, clipped to [-1, 1] (`(B, T, C, 16h, 16w)` for video).
        """
        if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.dtype == torch.bool:
            raise TypeError("`codes` must be an integer tensor (B, h, w) or (B, h*w).")
        if codes.ndim == 2:
            side = int(round(codes.shape[1] ** 0.5))
            if side * side != codes.shape[1]:
                raise ValueError(f"flat `codes` must hold a square number of tokens, got {codes.shape[1]}.")
            codes = codes.reshape(codes.shape[0], side, side)
        video = codes.ndim == 4
        if video:
            b, t = codes.shape[:2]
            codes = codes.reshape(b * t, *codes.shape[2:])
        if codes.ndim != 3:
            raise ValueError(f"`codes` must have shape (B, h, w), (B, h*w) or (B, T, h, w), got {tuple(codes.shape)}.")
        n = self.config.num_embeddings
        if codes.numel() and (codes.min() < 0 or codes.max() >= n):
            raise ValueError(f"`codes` must lie in [0, {n - 1}], got [{codes.min().item()}, {codes.max().item()}].")
        quantized = self.quantize.lookup(codes.long()).permute(0, 3, 1, 2)
        pixels = self.decode_features(quantized)
        if video:
            pixels = pixels.reshape(b, t, *pixels.shape[1:])
        return pixels

    def decode_features(self, quantized: torch.Tensor) -> torch.Tensor:
        """Quantized features (B, quantized_embed_dim, h, w) -> pixels (B, C, 16h, 16w), clipped to [-1, 1]."""
        pixels = self.decoder(self.post_quant_conv(quantized.to(self.post_quant_conv.weight.dtype)))
        return pixels.clamp(-1.0, 1.0) if self.config.clip_output else pixels

    def forward(self, pixel_values: torch.Tensor, decode: bool = False, return_dict: bool | None = None):
        """Encode (and with `decode=True` reconstruct) `(B, C, H, W)` images; returns [`LWMVQGANOutput`]."""
        z = self.encode_latents(pixel_values)
        codes, quantized = self._quantize(z)
        reconstruction = self.decode_features(quantized) if decode else None
        out = LWMVQGANOutput(codes=codes, quantized=quantized, latents=z, reconstruction=reconstruction)
        return out if return_dict is not False else out.to_tuple()


__all__ = [
    "LWMVQGANConfig",
    "LWMVQGANModel",
    "LWMVQGANOutput",
    "LWMVQGANPreTrainedModel",
    "PRESETS",
]
