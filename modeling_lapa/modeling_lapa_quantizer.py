"""The LAPA latent action quantizer (LAQ): an inverse dynamics model and a world model joined by NSVQ codes.

Data flow for a batch of frame pairs `pixel_values` (B, 2, 3, H, W) in [0, 1]:

    frames  --patch_embedding-->  tokens (B, 2, h, w, D)
            --encoder_spatial (per frame, with the relative position bias)-->
            --encoder_temporal (per grid cell, over the 2 frames)-->  first, last (B, h*w, D)
    quantizer: z = cnn(project_in(last)) - cnn(project_in(first))   (B*s, q), the latent action
               c = nearest codebook vector;  training: z + ||z - c|| * e / ||e||,  eval: c
               project_out -> action tokens (B, s, D)
    decoder_spatial (queries: frame-0 tokens, detached; cross-attention to the action tokens) -> to_pixels
            -> predicted frame t+H (B, 3, H, W);  loss = MSE against frame t+H.

This reproduces the authors' network numerically (their released `laq_openx.pt` converts into it with
`convert_laq_checkpoint.py`), including three quirks the released weights were trained with: keys and values of
self-attention come from the un-normalised input, the temporal stack's position generator reshapes tokens laid out
((b h w), t) as if they were (b, t, h, w), and the quantizer output goes back to model width through a plain
reshape (b*s, q) -> (b, q, s). Comments mark each one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .configuration_lapa_quantizer import CNN_ENCODER_LAYOUTS, LAPAQuantizerConfig
from .loading import StrictLoadingMixin


@dataclass
class LAPAQuantizerEncoderOutput(ModelOutput):
    """Output of [`LAPAQuantizerModel.encode`].

    Args:
        codes (`torch.LongTensor` of shape `(batch_size, code_seq_len)`): the latent action, one codebook index per slot.
        latents (`torch.FloatTensor` of shape `(batch_size, code_seq_len, quant_dim)`): the pre-quantisation
            difference vectors z = enc(x_{t+H}) - enc(x_t).
        quantized (`torch.FloatTensor` of shape `(batch_size, code_seq_len, quant_dim)`): the codebook vectors of `codes`.
    """

    codes: torch.LongTensor | None = None
    latents: torch.FloatTensor | None = None
    quantized: torch.FloatTensor | None = None


@dataclass
class LAPAQuantizerOutput(ModelOutput):
    """Output of [`LAPAQuantizerModel.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`): mean squared error of the predicted frame t+H, pixels in [0, 1].
        reconstruction (`torch.FloatTensor` of shape `(batch_size, 3, H, W)`): the predicted frame t+H.
        codes (`torch.LongTensor` of shape `(batch_size, code_seq_len)`): nearest codes of the latent actions.
        perplexity (`torch.FloatTensor` of shape `()`): exp of the entropy of the batch's code histogram.
        latents (`torch.FloatTensor` of shape `(batch_size, code_seq_len, quant_dim)`): pre-quantisation latents.
        replaced_codes (`torch.LongTensor` of shape `(n,)`, *optional*): codes overwritten by a codebook
            replacement at this step (only on replacement steps in training mode).
    """

    loss: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None
    codes: torch.LongTensor | None = None
    perplexity: torch.FloatTensor | None = None
    latents: torch.FloatTensor | None = None
    replaced_codes: torch.LongTensor | None = None


def full_precision(tensor: torch.Tensor):
    """A context without autocast on `tensor`'s device: what runs in it keeps the parameters' precision (fp32) when
    training under bf16 autocast (`--mixed-precision bf16`). Without autocast it changes nothing."""
    return torch.autocast(device_type=tensor.device.type, enabled=False)


class LAPAQuantizerPatchEmbedding(nn.Module):
    """Frame (N, C, H, W) -> tokens (N, h, w, D): p x p patches flattened in (channel, row, col) order, then
    LayerNorm -> Linear -> LayerNorm. Shared by both frames of a pair."""

    def __init__(self, config: LAPAQuantizerConfig):
        super().__init__()
        patch_dim = config.num_channels * config.patch_size**2
        self.patch_size = config.patch_size
        self.input_norm = nn.LayerNorm(patch_dim)
        self.projection = nn.Linear(patch_dim, config.hidden_size)
        self.output_norm = nn.LayerNorm(config.hidden_size)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        n, c, height, width = frames.shape
        p = self.patch_size
        h, w = height // p, width // p
        patches = frames.reshape(n, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(n, h, w, c * p * p)
        return self.output_norm(self.projection(self.input_norm(patches)))


class LAPAQuantizerPositionBias(nn.Module):
    """Continuous relative position bias of the spatial stacks: an MLP of the log-scaled offsets (dy, dx) between
    every pair of grid cells, giving (num_heads, h*w, h*w) logit biases.

    The offsets depend only on the grid and are made once. The MLP has trainable weights, so with gradients enabled
    it runs on every call (once per forward: the encoder and the decoder share its output); without gradients
    (encoding, evaluation) its output is kept until a weight changes."""

    def __init__(self, config: LAPAQuantizerConfig):
        super().__init__()
        dim = config.hidden_size
        self.mlp = nn.ModuleList([nn.Linear(2, dim), nn.Linear(dim, dim), nn.Linear(dim, config.num_heads)])
        self._offsets: dict = {}
        self._bias: tuple | None = None  # (key, bias) of the last call without gradients

    def offsets(self, grid_h: int, grid_w: int, device, dtype) -> torch.Tensor:
        """(h*w, h*w, 2): sign(v) * log(|v| + 1) of the offsets (dy, dx) from every cell to every cell."""
        key = (grid_h, grid_w, str(device), dtype)
        if key not in self._offsets:
            # An ordinary tensor even when first made under inference_mode: training saves it for backward.
            with torch.inference_mode(False), torch.no_grad():
                ys, xs = torch.meshgrid(torch.arange(grid_h, device=device), torch.arange(grid_w, device=device),
                                        indexing="ij")
                positions = torch.stack([ys, xs], dim=-1).reshape(-1, 2)
                offsets = (positions[:, None, :] - positions[None, :, :]).to(dtype)
                self._offsets[key] = torch.sign(offsets) * torch.log(offsets.abs() + 1)
        return self._offsets[key]

    def forward(self, grid_h: int, grid_w: int) -> torch.Tensor:
        weight = self.mlp[0].weight
        key = None
        parameters = list(self.parameters())
        # Weights made under inference_mode have no version counter: no caching for them.
        if not torch.is_grad_enabled() and not any(p.is_inference() for p in parameters):
            # The cached bias stays valid while no weight changed: data pointers and version counters of the weights.
            key = (grid_h, grid_w, torch.is_inference_mode_enabled(),
                   tuple((p.data_ptr(), p._version, p.dtype) for p in parameters))
            if self._bias is not None and self._bias[0] == key:
                return self._bias[1]
        offsets = self.offsets(grid_h, grid_w, weight.device, weight.dtype)
        with full_precision(offsets):  # in the weights' precision even under autocast (and so cached for both)
            hidden = F.leaky_relu(self.mlp[0](offsets), 0.1)
            hidden = F.leaky_relu(self.mlp[1](hidden), 0.1)
            bias = self.mlp[2](hidden).permute(2, 0, 1)
        if key is not None:
            self._bias = (key, bias)
        return bias


def backward_will_run() -> bool:
    """Whether this forward pass records for a backward pass (training), rather than runs without gradients
    (encoding, evaluation). A few modules compute the same math in a form with a faster backward pass when it does;
    without gradients they keep the form of the reference (so encoding gives today's numbers bit for bit)."""
    return torch.is_grad_enabled()


class LAPAQuantizerPositionGenerator(nn.Module):
    """PEG: a depthwise 3x3x3 convolution over (time, height, width), causal in time (zero padding 2 before, 0 after).

    Output frame i depends on input frames i-2 .. i only: the first frame's output on the first frame alone."""

    def __init__(self, config: LAPAQuantizerConfig):
        super().__init__()
        dim = config.hidden_size
        self.conv = nn.Conv3d(dim, dim, kernel_size=3, groups=dim)

    def forward(self, hidden_states: torch.Tensor, video_shape: tuple[int, int, int, int]) -> torch.Tensor:
        # Reference quirk: a plain reshape with the video shape (b, t, h, w), whatever the token layout. In the
        # temporal stack the tokens are ((b h w), t) ordered, so the conv sees them scrambled; the released
        # weights were trained that way.
        if backward_will_run():
            return self._frame_taps(hidden_states, video_shape)
        x = hidden_states.reshape(*video_shape, -1).permute(0, 4, 1, 2, 3)
        x = F.pad(x, (1, 1, 1, 1, 2, 0))
        x = self.conv(x)
        return x.permute(0, 2, 3, 4, 1).reshape(hidden_states.shape)

    def _frame_taps(self, hidden_states: torch.Tensor, video_shape: tuple[int, int, int, int]) -> torch.Tensor:
        """The same sum as depthwise 3x3 convolutions of each frame: output frame i is the bias plus the time taps k
        that read input frame i - 2 + k >= 0 (the taps on the causal zero padding are skipped, not multiplied by
        zeros). Forward and backward together about 3.5x faster than the padded Conv3d's on CPU."""
        b, t, h, w = video_shape
        dim = hidden_states.shape[-1]
        frames = hidden_states.reshape(b, t, h, w, dim).permute(0, 1, 4, 2, 3)  # (b, t, D, h, w), channels last
        weight, bias = self.conv.weight, self.conv.bias  # (D, 1, 3 time, 3, 3), (D,)
        outputs = []
        for i in range(t):
            out = None
            for k in range(max(0, 2 - i), 3):
                tap = F.conv2d(frames[:, i - 2 + k], weight[:, :, k], bias if out is None else None, padding=1,
                               groups=dim)
                out = tap if out is None else out + tap
            outputs.append(out)
        out = outputs[0].unsqueeze(1) if t == 1 else torch.stack(outputs, dim=1)
        return out.permute(0, 1, 3, 4, 2).reshape(hidden_states.shape)


def eager_attention(q, k, v, bias, scale):
    """softmax(q k^T * scale + bias) v, written out; shapes (B, heads, L, d)."""
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        logits = logits + bias
    return torch.matmul(logits.softmax(dim=-1), v)


def sdpa_attention(q, k, v, bias, scale):
    """The same math through PyTorch's fused kernel."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        # Under bf16 autocast on CPU the fused kernel is 3-4x slower than the written-out math at these sizes
        # (64 spatial tokens, 2 temporal ones; forward and backward); in fp32 they are level.
        return eager_attention(q, k, v, bias, scale)
    if bias is not None and bias.ndim == 3:
        # A (heads, L, L) mask sends SDPA on CPU to its slow math fallback; (1, heads, L, L) takes the fused kernel
        # (about 6x faster at the reference's 64 tokens, benchmarks/quantizer_speed.py).
        bias = bias.unsqueeze(0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


ATTENTION_FUNCTIONS = {"eager": eager_attention, "sdpa": sdpa_attention}


class LAPAQuantizerAttention(nn.Module):
    """Cosine-similarity attention: q and k L2-normalised per head, scaled by learned per-dimension gains, logits
    multiplied by a fixed 8. Self-attention (no context) or cross-attention to a normalised context with learned
    null key/value pairs prepended."""

    def __init__(self, config: LAPAQuantizerConfig, is_cross_attention: bool = False):
        super().__init__()
        dim, heads, head_dim = config.hidden_size, config.num_heads, config.head_dim
        self.config = config
        self.num_heads, self.head_dim = heads, head_dim
        self.scale = config.attention_logit_scale
        self.is_cross_attention = is_cross_attention
        # The reference's LayerNorms here have a gain and a zero, non-learned bias: bias=False is the same.
        self.norm = nn.LayerNorm(dim, bias=False)
        self.context_norm = nn.LayerNorm(dim, bias=False) if is_cross_attention else None
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * head_dim, bias=False)
        self.to_out = nn.Linear(heads * head_dim, dim, bias=False)
        self.q_scale = nn.Parameter(torch.ones(head_dim))
        self.k_scale = nn.Parameter(torch.ones(head_dim))
        num_null = config.num_cross_attention_null_kv if is_cross_attention else 0
        # (heads, 2n, head_dim): entries 0, 2, ... are null keys, 1, 3, ... null values.
        self.null_kv = nn.Parameter(torch.randn(heads, 2 * num_null, head_dim)) if num_null > 0 else None

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        context: torch.Tensor | None = None,
        position_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # Reference quirk: in self-attention, keys and values come from the un-normalised input.
        kv_input = self.context_norm(context) if self.is_cross_attention else hidden_states
        q = self._split_heads(self.to_q(self.norm(hidden_states)))
        if backward_will_run():
            # Keys and values through the two halves of `to_kv`'s weight: the backward pass then needs no
            # concatenation of the two gradients, as it would after `chunk`.
            inner = self.num_heads * self.head_dim
            k = self._split_heads(F.linear(kv_input, self.to_kv.weight[:inner]))
            v = self._split_heads(F.linear(kv_input, self.to_kv.weight[inner:]))
        else:
            k, v = (self._split_heads(t) for t in self.to_kv(kv_input).chunk(2, dim=-1))
        if self.null_kv is not None:
            batch = q.shape[0]
            null_k = self.null_kv[:, 0::2].unsqueeze(0).expand(batch, -1, -1, -1)
            null_v = self.null_kv[:, 1::2].unsqueeze(0).expand(batch, -1, -1, -1)
            k = torch.cat([null_k, k], dim=2)
            v = torch.cat([null_v, v], dim=2)
            if position_bias is not None:
                position_bias = F.pad(position_bias, (null_k.shape[2], 0), value=0.0)
        q = F.normalize(q, dim=-1) * self.q_scale
        k = F.normalize(k, dim=-1) * self.k_scale
        attention = ATTENTION_FUNCTIONS[self.config._attn_implementation or "sdpa"]
        out = attention(q, k, v, position_bias, self.scale)
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class LAPAQuantizerFeedForward(nn.Module):
    """LayerNorm -> Linear -> GEGLU -> Linear, no biases on the linears."""

    def __init__(self, config: LAPAQuantizerConfig):
        super().__init__()
        inner = config.ff_inner_size
        self.norm = nn.LayerNorm(config.hidden_size)
        self.fc_in = nn.Linear(config.hidden_size, 2 * inner, bias=False)
        self.fc_out = nn.Linear(inner, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = self.norm(hidden_states)
        if backward_will_run():
            # GEGLU through the two halves of `fc_in`'s weight (value, then gate): the backward pass then needs no
            # concatenation of the two gradients, as it would after `chunk`.
            inner = self.fc_out.in_features
            value, gate = F.linear(x, self.fc_in.weight[:inner]), F.linear(x, self.fc_in.weight[inner:])
        else:
            value, gate = self.fc_in(x).chunk(2, dim=-1)
        return self.fc_out(F.gelu(gate) * value)


class LAPAQuantizerBlock(GradientCheckpointingLayer):
    """One layer: position generator, self-attention, (cross-attention), feed-forward; each with a residual add."""

    def __init__(self, config: LAPAQuantizerConfig, has_cross_attention: bool = False):
        super().__init__()
        self.position_generator = LAPAQuantizerPositionGenerator(config)
        self.self_attention = LAPAQuantizerAttention(config)
        self.cross_attention = LAPAQuantizerAttention(config, is_cross_attention=True) if has_cross_attention else None
        self.feed_forward = LAPAQuantizerFeedForward(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_bias: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        *,
        video_shape: tuple[int, int, int, int],
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.position_generator(hidden_states, video_shape)
        hidden_states = hidden_states + self.self_attention(hidden_states, position_bias=position_bias)
        if self.cross_attention is not None:
            hidden_states = hidden_states + self.cross_attention(hidden_states, context=context)
        return hidden_states + self.feed_forward(hidden_states)


class LAPAQuantizerTransformer(nn.Module):
    """A stack of [`LAPAQuantizerBlock`] and a final gain-only LayerNorm. Input (N, L, D) -> output (N, L, D)."""

    def __init__(self, config: LAPAQuantizerConfig, depth: int, has_cross_attention: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(LAPAQuantizerBlock(config, has_cross_attention) for _ in range(depth))
        self.norm_out = nn.LayerNorm(config.hidden_size, bias=False)

    def forward(self, hidden_states, *, video_shape, position_bias=None, context=None):
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_bias, context, video_shape=video_shape)
        return self.norm_out(hidden_states)


class LAPAQuantizerNSVQ(nn.Module):
    """Noise-substitution vector quantiser (NSVQ) of the *difference* of the two frames' encodings.

    `project_in` then a small CNN turns each frame's (h*w, D) tokens into s vectors of size q; the latent action is
    their difference. Codes are the nearest codebook vectors; the codebook learns only through the norm of the
    quantisation error in the noise substitute (no codebook or commitment loss)."""

    def __init__(self, config: LAPAQuantizerConfig):
        super().__init__()
        q = config.quant_dim
        self.config = config
        self.project_in = nn.Linear(config.hidden_size, q)
        _, convs = CNN_ENCODER_LAYOUTS[config.code_seq_len]
        layers: list[nn.Module] = []
        for i, (kernel, stride, padding) in enumerate(convs):
            if i > 0:
                layers.append(nn.ReLU())
            layers.append(nn.Conv2d(q, q, kernel_size=kernel, stride=stride, padding=padding))
        self.downsample = nn.Sequential(*layers)
        # The reference shares one codebook (|C|, q) between the s slots. With `codebook_per_slot` each slot has its
        # own (s, |C|, q): the slots see different parts of the frame and would otherwise split the shared codes.
        self.per_slot = bool(config.codebook_per_slot)
        s = config.code_seq_len
        shape = (s, config.codebook_size, q) if self.per_slot else (config.codebook_size, q)
        self.codebook = nn.Parameter(torch.randn(*shape))
        self.project_out = nn.Linear(q, config.hidden_size)
        # Hits per code (per slot and code with per-slot codebooks) since the last replacement. A plain attribute,
        # not a buffer: it is not part of the weights (as in the reference), and DDP must not broadcast it from
        # rank 0 (each rank counts its own hits; a replacement sums them across ranks). `from_pretrained` builds
        # modules on the meta device, which leaves a plain attribute there: `_hits_on` makes a real one.
        self.code_hits = torch.zeros((s if self.per_slot else 1) * config.codebook_size, dtype=torch.float64)

    def encode_frame(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h*w, D) -> (B*s, q), rows sample-major. In the parameters' precision even under autocast: the latent
        is the difference of two of these, which bf16 would swamp with rounding when the frames are alike."""
        b, n, _ = tokens.shape
        side = self.config.grid_size
        with full_precision(tokens):
            x = self.project_in(tokens.to(self.project_in.weight.dtype)).transpose(1, 2).reshape(b, -1, side, side)
            x = self.downsample(x)
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])

    def _row_slots(self, num_rows: int, device) -> torch.Tensor:
        """Slot of each row of a (B*s, ...) sample-major layout."""
        return torch.arange(num_rows, device=device) % self.config.code_seq_len

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook vectors of codes (N,) in the sample-major (B*s) row layout -> (N, q)."""
        if self.per_slot:
            return self.codebook[self._row_slots(codes.shape[0], codes.device), codes]
        return self.codebook[codes]

    def nearest_codes(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, q) -> (N,) indices of the nearest codebook vectors by squared L2 distance (N = B*s rows), in the
        parameters' precision even under autocast."""
        with full_precision(latents):
            return self._nearest_codes(latents.to(self.codebook.dtype))

    def _nearest_codes(self, latents: torch.Tensor) -> torch.Tensor:
        if self.per_slot:
            x = latents.reshape(-1, self.config.code_seq_len, latents.shape[-1])  # (B, s, q)
            distances = (
                x.pow(2).sum(dim=-1, keepdim=True)
                - 2 * torch.einsum("bsq,scq->bsc", x, self.codebook)
                + self.codebook.pow(2).sum(dim=-1).unsqueeze(0)
            )
            return distances.argmin(dim=-1).reshape(-1)
        codebook = self.codebook
        distances = (
            latents.pow(2).sum(dim=1, keepdim=True)
            - 2 * latents @ codebook.t()
            + codebook.t().pow(2).sum(dim=0, keepdim=True)
        )
        return distances.argmin(dim=1)

    def to_action_tokens(self, vectors: torch.Tensor, batch_size: int) -> torch.Tensor:
        """(B*s, q) -> (B, s, D)."""
        # Reference quirk: a plain reshape (B*s, q) -> (B, q, s), not a transpose, then (B, s, q).
        x = vectors.reshape(batch_size, self.config.quant_dim, self.config.code_seq_len).permute(0, 2, 1)
        return self.project_out(x)

    def noise_substitute(self, latents: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
        """z + (||z - c|| / ||e|| + 1e-12) * e with e ~ N(0, I), norms per vector."""
        noise = torch.randn_like(latents)
        residual_norm = (latents - hard).square().sum(dim=1, keepdim=True).sqrt()
        noise_norm = noise.square().sum(dim=1, keepdim=True).sqrt()
        return latents + (residual_norm / noise_norm + 1e-12) * noise

    def _hits_on(self, device) -> torch.Tensor:
        """The hit counter on `device`: a fresh zero counter if it was left on the meta device by loading (a loaded
        model has counted nothing yet)."""
        if self.code_hits.is_meta:
            self.code_hits = torch.zeros(self.code_hits.shape, dtype=torch.float64, device=device)
        elif self.code_hits.device != torch.device(device):
            self.code_hits = self.code_hits.to(device)
        return self.code_hits

    def count_hits(self, codes: torch.Tensor) -> None:
        """Add a batch's codes (N,) (sample-major rows) to the hit counter."""
        self._hits_on(codes.device)
        index = codes.flatten()
        if self.per_slot:
            index = self._row_slots(index.shape[0], index.device) * self.config.codebook_size + index
        self.code_hits += torch.bincount(index, minlength=self.code_hits.numel()).to(self.code_hits.dtype)

    @torch.no_grad()
    def replace_unused_codes(self, batch_size: int, step: int) -> torch.Tensor:
        """Overwrite codes with hits / batch_size < threshold (or, optionally, a share of the hits below
        `replacement_min_share`) by randomly chosen used codes plus noise.

        In a distributed run the hits and batch sizes are summed over ranks and the random choices come from a
        generator seeded by (replacement_seed, step), so every rank takes the same decision and the codebooks stay
        identical. With per-slot codebooks the rule runs in each slot's codebook. Returns the indices of the
        replaced codes (`slot * codebook_size + code` with per-slot codebooks); resets the hit counter.
        """
        device = self.codebook.device
        totals = torch.cat([
            self._hits_on(device),
            torch.tensor([float(batch_size)], device=device, dtype=torch.float64),
        ])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals, op=torch.distributed.ReduceOp.SUM)
        hits, total_batch = totals[:-1], totals[-1]
        generator = torch.Generator(device="cpu").manual_seed(self.config.replacement_seed * 1_000_003 + step)
        size = self.config.codebook_size
        if self.per_slot:
            replaced = [
                self._replace_in(self.codebook.data[slot], hits[slot * size : (slot + 1) * size], total_batch, generator)
                + slot * size
                for slot in range(self.config.code_seq_len)
            ]
            replaced = torch.cat(replaced)
        else:
            replaced = self._replace_in(self.codebook.data, hits, total_batch, generator)
        self.code_hits.zero_()
        return replaced

    def _replace_in(self, codebook: torch.Tensor, hits: torch.Tensor, total_batch: torch.Tensor, generator) -> torch.Tensor:
        """The reference rule on one (|C|, q) codebook, in place. Returns the replaced indices.

        The reference's noise is 1e-12 in absolute terms; with the default `replacement_noise` = 1e-12 we add exactly
        that. Larger values are taken relative to the RMS entry of each copied code (see the config)."""
        device = codebook.device
        unused_mask = (hits / total_batch) < self.config.replacement_threshold
        min_share = self.config.replacement_min_share
        if min_share is not None and hits.sum() > 0:
            unused_mask |= (hits / hits.sum()) < min_share
        unused = torch.nonzero(unused_mask).flatten()
        used = torch.nonzero(~unused_mask).flatten()
        noise_scale = self.config.replacement_noise
        reference_noise = noise_scale <= 1e-12
        if used.numel() == 0:
            noise = torch.randn(codebook.shape, generator=generator, dtype=torch.float32).to(device, codebook.dtype)
            scale = noise_scale if reference_noise else noise_scale * codebook.pow(2).mean(dim=1, keepdim=True).sqrt()
            codebook.add_(scale * noise)
        elif unused.numel() > 0:
            used_vectors = codebook[used].clone()
            if used.numel() < unused.numel():
                used_vectors = used_vectors.repeat(unused.numel() // used.numel() + 1, 1)
            order = torch.randperm(used_vectors.shape[0], generator=generator).to(device)
            copies = used_vectors[order][: unused.numel()]
            noise = torch.randn((unused.numel(), codebook.shape[1]), generator=generator, dtype=torch.float32)
            noise = noise.to(device, codebook.dtype)
            scale = noise_scale if reference_noise else noise_scale * copies.pow(2).mean(dim=1, keepdim=True).sqrt()
            codebook[unused] = copies + scale * noise
        return unused


class LAPAQuantizerPreTrainedModel(StrictLoadingMixin, PreTrainedModel):
    config_class = LAPAQuantizerConfig
    base_model_prefix = "lapa_quantizer"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["LAPAQuantizerBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """PyTorch's default initialisation, as the reference trains from: Linear/Conv weights kaiming-uniform
        (a = sqrt 5), biases uniform(+-1/sqrt(fan_in)); LayerNorms ones/zeros; codebook and null key/values N(0, 1);
        attention gains ones."""
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d)):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.LayerNorm):
            if module.weight is not None:
                init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, LAPAQuantizerAttention):
            init.ones_(module.q_scale)
            init.ones_(module.k_scale)
            if module.null_kv is not None:
                init.normal_(module.null_kv)
        elif isinstance(module, LAPAQuantizerNSVQ):
            init.normal_(module.codebook)


class LAPAQuantizerModel(LAPAQuantizerPreTrainedModel):
    """The latent action quantizer. `encode` labels frame pairs with latent actions (the inverse dynamics model),
    `decode` predicts the next frame from a frame and a latent action (the world model), `forward` trains both.

    Example:

    ```python
    >>> import torch
    >>> from modeling_lapa import LAPAQuantizerConfig, LAPAQuantizerModel
    >>> model = LAPAQuantizerModel(LAPAQuantizerConfig.from_preset("tiny")).eval()
    >>> pairs = torch.rand(2, 2, 3, 64, 64)          # (batch, frame t / frame t+H, RGB, H, W) in [0, 1]
    >>> codes = model.encode(pairs).codes             # (2, 4) latent actions
    >>> next_frame = model.decode(pairs[:, 0], codes) # (2, 3, 64, 64)
    ```
    """

    def __init__(self, config: LAPAQuantizerConfig):
        super().__init__(config)
        self.patch_embedding = LAPAQuantizerPatchEmbedding(config)
        self.spatial_position_bias = LAPAQuantizerPositionBias(config)
        self.encoder_spatial = LAPAQuantizerTransformer(config, config.spatial_depth)
        self.encoder_temporal = LAPAQuantizerTransformer(config, config.temporal_depth)
        self.quantizer = LAPAQuantizerNSVQ(config)
        self.decoder_spatial = LAPAQuantizerTransformer(config, config.spatial_depth, has_cross_attention=True)
        self.to_pixels = nn.Linear(config.hidden_size, config.num_channels * config.patch_size**2)
        self.post_init()

    # ----------------------------------------------------------------------------------------------- input checks
    def _check_frames(self, frames: torch.Tensor, name: str, expected_rank: int, layout: str) -> None:
        c = self.config
        if not isinstance(frames, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor {layout}, got {type(frames).__name__}.")
        if frames.ndim != expected_rank:
            raise ValueError(f"`{name}` must have {expected_rank} dimensions {layout}, got shape {tuple(frames.shape)}.")
        if not frames.is_floating_point():
            raise TypeError(
                f"`{name}` has integer dtype {frames.dtype}; the quantizer takes float pixels in [0, 1] "
                f"(divide uint8 frames by 255)."
            )
        if expected_rank == 5 and frames.shape[1] != 2:
            raise ValueError(
                f"`{name}` must hold 2 frames (frame t, frame t+H) on axis 1 {layout}, got {frames.shape[1]} "
                f"(shape {tuple(frames.shape)})."
            )
        channels, height, width = frames.shape[-3:]
        if channels != c.num_channels:
            raise ValueError(f"`{name}` must have {c.num_channels} channels {layout}, got shape {tuple(frames.shape)}.")
        if (height, width) != (c.image_size, c.image_size):
            raise ValueError(
                f"`{name}` frames are {height}x{width} but this quantizer takes {c.image_size}x{c.image_size} "
                f"(config.image_size); resize the frames first."
            )
        if frames.numel() > 0:
            low, high = torch.aminmax(frames.detach())
            if low < 0 or high > 1 or torch.isnan(low) or torch.isnan(high):
                raise ValueError(
                    f"`{name}` values must lie in [0, 1], got min {low.item():.4g} and max {high.item():.4g} "
                    f"(no mean/std normalisation: the quantizer takes raw pixels / 255)."
                )

    def _check_codes(self, codes: torch.Tensor, batch_size: int) -> None:
        c = self.config
        if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.dtype == torch.bool:
            raise TypeError(f"`codes` must be an integer tensor of shape (batch, {c.code_seq_len}).")
        if codes.shape != (batch_size, c.code_seq_len):
            raise ValueError(
                f"`codes` must have shape ({batch_size}, {c.code_seq_len}) (batch, code_seq_len), got {tuple(codes.shape)}."
            )
        if codes.numel() > 0 and (codes.min() < 0 or codes.max() >= c.codebook_size):
            raise ValueError(
                f"`codes` must lie in [0, {c.codebook_size - 1}] (codebook_size={c.codebook_size}), got values in "
                f"[{codes.min().item()}, {codes.max().item()}]."
            )

    # ------------------------------------------------------------------------------------------------ the network
    def _encode_tokens(self, tokens: torch.Tensor, position_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens (B, 2, h, w, D) -> encoder outputs of frame t and frame t+H, each (B, h*w, D)."""
        b, t, h, w, d = tokens.shape
        video_shape = (b, t, h, w)
        x = self.encoder_spatial(tokens.reshape(b * t, h * w, d), video_shape=video_shape, position_bias=position_bias)
        x = x.reshape(b, t, h, w, d).permute(0, 2, 3, 1, 4).reshape(b * h * w, t, d)
        x = self.encoder_temporal(x, video_shape=video_shape)
        x = x.reshape(b, h, w, t, d).permute(0, 3, 1, 2, 4)
        return x[:, 0].reshape(b, h * w, d), x[:, 1].reshape(b, h * w, d)

    def _decode_tokens(self, first_tokens: torch.Tensor, action_tokens: torch.Tensor, position_bias: torch.Tensor):
        """Frame-t tokens (B, h, w, D) and action tokens (B, s, D) -> predicted frame t+H (B, C, H, W)."""
        b, h, w, d = first_tokens.shape
        x = self.decoder_spatial(
            first_tokens.reshape(b, h * w, d), video_shape=(b, 1, h, w), position_bias=position_bias, context=action_tokens
        )
        p, c = self.config.patch_size, self.config.num_channels
        with full_precision(x):  # the predicted pixels (and so the loss) in the parameters' precision
            pixels = self.to_pixels(x.to(self.to_pixels.weight.dtype)).reshape(b, h, w, c, p, p)
        return pixels.permute(0, 3, 1, 4, 2, 5).reshape(b, c, h * p, w * p)

    def _latents(self, pixel_values: torch.Tensor):
        """Shared by encode and forward: frame-t tokens, latents (B*s, q), position bias."""
        b = pixel_values.shape[0]
        tokens = self.patch_embedding(pixel_values.flatten(0, 1))
        tokens = tokens.reshape(b, 2, *tokens.shape[1:])
        first_tokens, latents, position_bias = self._latents_of_tokens(tokens)
        return first_tokens, latents, position_bias

    def _latents_of_tokens(self, tokens: torch.Tensor):
        """Patch tokens (B, 2, h, w, D) -> frame-t tokens, latents (B*s, q), position bias."""
        # The residual streams in the parameters' precision (a no-op in fp32; under bf16 autocast only the GEMMs and
        # convolutions run in bf16, their outputs are added to fp32 streams).
        tokens = tokens.to(self.to_pixels.weight.dtype)
        grid = self.config.grid_size
        position_bias = self.spatial_position_bias(grid, grid)
        first, last = self._encode_tokens(tokens, position_bias)
        latents = self.quantizer.encode_frame(last) - self.quantizer.encode_frame(first)
        return tokens[:, 0], latents, position_bias

    def _encoder_output(self, latents: torch.Tensor, b: int) -> LAPAQuantizerEncoderOutput:
        s, q = self.config.code_seq_len, self.config.quant_dim
        codes = self.quantizer.nearest_codes(latents)
        quantized = self.quantizer.lookup(codes)
        return LAPAQuantizerEncoderOutput(
            codes=codes.reshape(b, s), latents=latents.reshape(b, s, q), quantized=quantized.reshape(b, s, q)
        )

    def encode(self, pixel_values: torch.Tensor) -> LAPAQuantizerEncoderOutput:
        """Label frame pairs with latent actions.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 2, 3, H, W)`): frame t and frame t+H, in [0, 1].
        Returns:
            [`LAPAQuantizerEncoderOutput`] with `codes` (B, s), `latents` (B, s, q) and `quantized` (B, s, q).
        """
        self._check_frames(pixel_values, "pixel_values", 5, "(batch, 2, 3, H, W)")
        _, latents, _ = self._latents(pixel_values)
        return self._encoder_output(latents, pixel_values.shape[0])

    def encode_frame_pairs(
        self, frames: torch.Tensor, first_index: torch.Tensor, second_index: torch.Tensor
    ) -> LAPAQuantizerEncoderOutput:
        """Label the pairs (frames[first_index[i]], frames[second_index[i]]) drawn from one set of frames (e.g. the
        frames of a video, each the first frame of one pair and the second of others): the same codes as `encode` on
        the stacked pairs, with each frame's patch embedding computed once however many pairs it is in.

        Only the patch embedding is shared. The encoder's spatial stack sees each pair as a 2-frame video whose
        position generators are causal in time, so the second frame's encoding depends on the first frame
        (`tests/test_label_speed.py` checks it), and each frame is the first frame of one pair only.

        Args:
            frames (`torch.FloatTensor` of shape `(num_frames, 3, H, W)`): in [0, 1].
            first_index, second_index (`torch.LongTensor` of shape `(batch_size,)`): rows of `frames`.
        Returns:
            [`LAPAQuantizerEncoderOutput`] as `encode`.
        """
        self._check_frames(frames, "frames", 4, "(num_frames, 3, H, W)")
        if first_index.shape != second_index.shape or first_index.ndim != 1:
            raise ValueError(
                f"`first_index` and `second_index` must be 1-D of one length, got {tuple(first_index.shape)} and "
                f"{tuple(second_index.shape)}."
            )
        tokens = self.patch_embedding(frames)
        pair_tokens = torch.stack([tokens[first_index], tokens[second_index]], dim=1)  # (B, 2, h, w, D)
        _, latents, _ = self._latents_of_tokens(pair_tokens)
        return self._encoder_output(latents, first_index.shape[0])

    def decode(self, first_frame: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Predict frame t+H from frame t and a latent action: the world-model path.

        Args:
            first_frame (`torch.FloatTensor` of shape `(batch_size, 3, H, W)`): frame t, in [0, 1].
            codes (`torch.LongTensor` of shape `(batch_size, code_seq_len)`): the latent action.
        Returns:
            `torch.FloatTensor` of shape `(batch_size, 3, H, W)`: the predicted frame (not clamped to [0, 1]).
        """
        self._check_frames(first_frame, "first_frame", 4, "(batch, 3, H, W)")
        self._check_codes(codes, first_frame.shape[0])
        b = first_frame.shape[0]
        first_tokens = self.patch_embedding(first_frame).to(self.to_pixels.weight.dtype)
        grid = self.config.grid_size
        position_bias = self.spatial_position_bias(grid, grid)
        vectors = self.quantizer.lookup(codes.reshape(-1).to(self.quantizer.codebook.device))
        action_tokens = self.quantizer.to_action_tokens(vectors, b)
        return self._decode_tokens(first_tokens, action_tokens, position_bias)

    def forward(
        self,
        pixel_values: torch.Tensor,
        step: int | None = None,
        return_dict: bool | None = None,
    ) -> LAPAQuantizerOutput | tuple:
        """Reconstruct frame t+H from frame t and the quantised latent action of the pair.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 2, 3, H, W)`): frame t and frame t+H, in [0, 1].
            step (`int`, *optional*): the training step; in training mode, on the replacement schedule
                (`config.is_replacement_step`), unused codes are replaced after this step's codes are counted.
        In training mode the decoder sees the NSVQ noise substitute of the latent; in eval mode the hard code.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        self._check_frames(pixel_values, "pixel_values", 5, "(batch, 2, 3, H, W)")
        b, s, q = pixel_values.shape[0], self.config.code_seq_len, self.config.quant_dim
        first_tokens, latents, position_bias = self._latents(pixel_values)
        nsvq = self.quantizer
        codes = nsvq.nearest_codes(latents)
        hard = nsvq.lookup(codes)
        quantized = nsvq.noise_substitute(latents, hard) if self.training else hard

        one_hot_mean = torch.bincount(codes, minlength=self.config.codebook_size).to(latents.dtype) / codes.numel()
        perplexity = torch.exp(-(one_hot_mean * torch.log(one_hot_mean + 1e-10)).sum())

        replaced = None
        if self.training:
            nsvq.count_hits(codes.detach())
            if step is not None and self.config.is_replacement_step(step):
                replaced = nsvq.replace_unused_codes(b, step)

        action_tokens = nsvq.to_action_tokens(quantized, b)
        # The decoder's queries are detached: gradients never reach the patch embedding through the decoder.
        reconstruction = self._decode_tokens(first_tokens.detach(), action_tokens, position_bias)
        loss = F.mse_loss(reconstruction, pixel_values[:, 1])
        output = LAPAQuantizerOutput(
            loss=loss,
            reconstruction=reconstruction,
            codes=codes.reshape(b, s),
            perplexity=perplexity,
            latents=latents.reshape(b, s, q),
            replaced_codes=replaced,
        )
        return output if return_dict else output.to_tuple()


__all__ = [
    "LAPAQuantizerEncoderOutput",
    "LAPAQuantizerModel",
    "LAPAQuantizerOutput",
    "LAPAQuantizerPreTrainedModel",
]
