"""The quantizer's network and labelling loop as they were before the speed work of issue 15 (commit ac8134b), run
on the weights of a current `LAPAQuantizerModel`: the old path, kept so that `benchmarks/quantizer_speed.py`,
`benchmarks/label_speed.py` and the tests can measure and check the new path against it in the same process.

    out = reference_forward(model, pixel_values, step=7)      # as model(pixel_values, step=7) computed it
    codes = reference_encode(model, pixel_values)              # as model.encode(pixel_values).codes
    codes = reference_encode_episode(model, frames, gap, 64)   # as training.labelling.encode_episode
    latents = reference_latents(model, pixel_values)           # (B*s, q), as model.encode(...).latents

Only the network's math is frozen here (position generator as a Conv3d over the causally padded video, keys and
values through one `to_kv` GEMM split by `chunk`, GEGLU through one `fc_in` GEMM split by `chunk`, the position bias
recomputed from a fresh grid every call); the NSVQ steps (nearest codes, noise, hit counts, codebook replacement)
are the model's own, which the speed work did not change in fp32.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from modeling_lapa.modeling_lapa_quantizer import ATTENTION_FUNCTIONS, LAPAQuantizerOutput


def _position_bias(module, grid_h: int, grid_w: int) -> torch.Tensor:
    weight = module.mlp[0].weight
    ys, xs = torch.meshgrid(torch.arange(grid_h, device=weight.device), torch.arange(grid_w, device=weight.device),
                            indexing="ij")
    positions = torch.stack([ys, xs], dim=-1).reshape(-1, 2)
    offsets = (positions[:, None, :] - positions[None, :, :]).to(weight.dtype)
    offsets = torch.sign(offsets) * torch.log(offsets.abs() + 1)
    hidden = F.leaky_relu(module.mlp[0](offsets), 0.1)
    hidden = F.leaky_relu(module.mlp[1](hidden), 0.1)
    return module.mlp[2](hidden).permute(2, 0, 1)


def _position_generator(module, hidden_states, video_shape):
    x = hidden_states.reshape(*video_shape, -1).permute(0, 4, 1, 2, 3)
    x = F.pad(x, (1, 1, 1, 1, 2, 0))
    x = module.conv(x)
    return x.permute(0, 2, 3, 4, 1).reshape(hidden_states.shape)


def _split_heads(module, x):
    b, n, _ = x.shape
    return x.reshape(b, n, module.num_heads, module.head_dim).transpose(1, 2)


def _attention(module, hidden_states, context=None, position_bias=None):
    kv_input = module.context_norm(context) if module.is_cross_attention else hidden_states
    q = _split_heads(module, module.to_q(module.norm(hidden_states)))
    k, v = (_split_heads(module, t) for t in module.to_kv(kv_input).chunk(2, dim=-1))
    if module.null_kv is not None:
        batch = q.shape[0]
        null_k = module.null_kv[:, 0::2].unsqueeze(0).expand(batch, -1, -1, -1)
        null_v = module.null_kv[:, 1::2].unsqueeze(0).expand(batch, -1, -1, -1)
        k = torch.cat([null_k, k], dim=2)
        v = torch.cat([null_v, v], dim=2)
        if position_bias is not None:
            position_bias = F.pad(position_bias, (null_k.shape[2], 0), value=0.0)
    q = F.normalize(q, dim=-1) * module.q_scale
    k = F.normalize(k, dim=-1) * module.k_scale
    attention = ATTENTION_FUNCTIONS[module.config._attn_implementation or "sdpa"]
    out = attention(q, k, v, position_bias, module.scale)
    b, _, n, _ = out.shape
    return module.to_out(out.transpose(1, 2).reshape(b, n, module.num_heads * module.head_dim))


def _feed_forward(module, hidden_states):
    value, gate = module.fc_in(module.norm(hidden_states)).chunk(2, dim=-1)
    return module.fc_out(F.gelu(gate) * value)


def _transformer(stack, hidden_states, *, video_shape, position_bias=None, context=None):
    for block in stack.layers:
        hidden_states = hidden_states + _position_generator(block.position_generator, hidden_states, video_shape)
        hidden_states = hidden_states + _attention(block.self_attention, hidden_states, position_bias=position_bias)
        if block.cross_attention is not None:
            hidden_states = hidden_states + _attention(block.cross_attention, hidden_states, context=context)
        hidden_states = hidden_states + _feed_forward(block.feed_forward, hidden_states)
    return stack.norm_out(hidden_states)


def _encode_tokens(model, tokens, position_bias):
    b, t, h, w, d = tokens.shape
    video_shape = (b, t, h, w)
    x = _transformer(model.encoder_spatial, tokens.reshape(b * t, h * w, d), video_shape=video_shape,
                     position_bias=position_bias)
    x = x.reshape(b, t, h, w, d).permute(0, 2, 3, 1, 4).reshape(b * h * w, t, d)
    x = _transformer(model.encoder_temporal, x, video_shape=video_shape)
    x = x.reshape(b, h, w, t, d).permute(0, 3, 1, 2, 4)
    return x[:, 0].reshape(b, h * w, d), x[:, 1].reshape(b, h * w, d)


def _decode_tokens(model, first_tokens, action_tokens, position_bias):
    b, h, w, d = first_tokens.shape
    x = _transformer(model.decoder_spatial, first_tokens.reshape(b, h * w, d), video_shape=(b, 1, h, w),
                     position_bias=position_bias, context=action_tokens)
    p, c = model.config.patch_size, model.config.num_channels
    pixels = model.to_pixels(x).reshape(b, h, w, c, p, p)
    return pixels.permute(0, 3, 1, 4, 2, 5).reshape(b, c, h * p, w * p)


def _latents(model, pixel_values):
    b = pixel_values.shape[0]
    tokens = model.patch_embedding(pixel_values.flatten(0, 1))
    tokens = tokens.reshape(b, 2, *tokens.shape[1:])
    grid = model.config.grid_size
    position_bias = _position_bias(model.spatial_position_bias, grid, grid)
    first, last = _encode_tokens(model, tokens, position_bias)
    latents = model.quantizer.encode_frame(last) - model.quantizer.encode_frame(first)
    return tokens[:, 0], latents, position_bias


def reference_latents(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Latents (B*s, q) of frame pairs (B, 2, 3, H, W), computed the old way."""
    return _latents(model, pixel_values)[1]


def reference_encode(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Codes (B, s) of frame pairs (B, 2, 3, H, W), computed the old way."""
    model._check_frames(pixel_values, "pixel_values", 5, "(batch, 2, 3, H, W)")
    _, latents, _ = _latents(model, pixel_values)
    return model.quantizer.nearest_codes(latents).reshape(pixel_values.shape[0], model.config.code_seq_len)


def reference_forward(model, pixel_values: torch.Tensor, step: int | None = None) -> LAPAQuantizerOutput:
    """`model(pixel_values, step=step)` computed the old way (training or eval mode, as the model is)."""
    model._check_frames(pixel_values, "pixel_values", 5, "(batch, 2, 3, H, W)")
    b, s, q = pixel_values.shape[0], model.config.code_seq_len, model.config.quant_dim
    first_tokens, latents, position_bias = _latents(model, pixel_values)
    nsvq = model.quantizer
    codes = nsvq.nearest_codes(latents)
    hard = nsvq.lookup(codes)
    quantized = nsvq.noise_substitute(latents, hard) if model.training else hard
    one_hot_mean = torch.bincount(codes, minlength=model.config.codebook_size).to(latents.dtype) / codes.numel()
    perplexity = torch.exp(-(one_hot_mean * torch.log(one_hot_mean + 1e-10)).sum())
    replaced = None
    if model.training:
        nsvq.count_hits(codes.detach())
        if step is not None and model.config.is_replacement_step(step):
            replaced = nsvq.replace_unused_codes(b, step)
    action_tokens = nsvq.to_action_tokens(quantized, b)
    reconstruction = _decode_tokens(model, first_tokens.detach(), action_tokens, position_bias)
    loss = F.mse_loss(reconstruction, pixel_values[:, 1])
    return LAPAQuantizerOutput(loss=loss, reconstruction=reconstruction, codes=codes.reshape(b, s),
                               perplexity=perplexity, latents=latents.reshape(b, s, q), replaced_codes=replaced)


@torch.inference_mode()
def reference_encode_episode(model, frames, gap_frames: int, batch_size: int, device="cpu") -> np.ndarray:
    """`training.labelling.encode_episode` as it was: every pair's two frames through the whole encoder, in chunks
    of `batch_size` pairs from frame 0. (T, s) int64."""
    frames = torch.as_tensor(frames)
    length = int(frames.shape[0])
    targets = torch.from_numpy(np.minimum(np.arange(length, dtype=np.int64) + gap_frames, length - 1))
    codes = []
    for start in range(0, length, batch_size):
        stop = min(start + batch_size, length)
        pair = torch.stack([frames[start:stop], frames[targets[start:stop]]], dim=1)
        pixel_values = pair.permute(0, 1, 4, 2, 3).contiguous().to(device).float().div_(255.0)
        codes.append(reference_encode(model, pixel_values).cpu())
    if not codes:
        return np.zeros((0, model.config.code_seq_len), dtype=np.int64)
    return torch.cat(codes).numpy().astype(np.int64)
