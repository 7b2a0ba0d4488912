"""The quantizer's faster paths (issue 15) against the old path (`benchmarks/quantizer_baseline.py`): a training
step gives the same loss and gradients within fp32 noise, encoding is bit for bit the old one, the position bias is
cached only while no weight changes, and bf16 autocast keeps the quantisation and the pixels in fp32."""

import copy

import pytest
import torch

from benchmarks.quantizer_baseline import reference_encode, reference_forward, reference_latents
from modeling_lapa import LAPAQuantizerConfig, LAPAQuantizerModel


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_config(**overrides):
    """32 px frames, 4 px patches: the 8 x 8 grid of the reference layout, two layers per stack."""
    args = dict(hidden_size=32, quant_dim=8, codebook_size=8, code_seq_len=4, image_size=32, patch_size=4,
                spatial_depth=2, temporal_depth=2, num_heads=2, head_dim=16)
    args.update(overrides)
    return LAPAQuantizerConfig(**args)


def make(seed=0, **overrides):
    torch.manual_seed(seed)
    model = LAPAQuantizerModel(small_config(**overrides))
    pairs = torch.rand(6, 2, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1))
    return model, pairs


def _step(model, pairs, old: bool, step: int):
    torch.manual_seed(100 + step)  # the same NSVQ noise on both paths
    out = reference_forward(model, pairs, step=step) if old else model(pairs, step=step)
    out.loss.backward()
    return out


@pytest.mark.parametrize("per_slot", [False, True])
def test_training_steps_match_the_old_path_within_fp32_noise(per_slot):
    model, pairs = make(codebook_per_slot=per_slot, replacement_steps=[2])
    old_model = copy.deepcopy(model).train()
    model.train()
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in (model, old_model)]
    for step in (1, 2, 3):  # step 2 replaces codes
        new, old = _step(model, pairs, False, step), _step(old_model, pairs, True, step)
        assert torch.equal(new.codes, old.codes)
        assert abs(new.loss.item() - old.loss.item()) <= 1e-6 * old.loss.item()
        new_grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        old_grads = torch.cat([p.grad.flatten() for p in old_model.parameters()])
        assert (new_grads - old_grads).norm() <= 1e-5 * old_grads.norm()
        # per parameter, against the largest gradient entry (the position bias's last bias has a zero gradient in
        # exact arithmetic: softmax ignores a shift of a row)
        scale = old_grads.abs().max()
        for (name, p), q in zip(model.named_parameters(), old_model.parameters()):
            assert (p.grad - q.grad).abs().max() <= 1e-5 * scale, name
        if step == 2:
            assert torch.equal(new.replaced_codes, old.replaced_codes)
        for optimizer in optimizers:  # Adam turns the zero gradient's noise into full steps: the models are
            optimizer.step()             # compared through their losses and gradients, not their weights
            optimizer.zero_grad()


def test_encoding_and_eval_forward_are_the_old_path_bit_for_bit():
    model, pairs = make(seed=3)
    model.eval()
    with torch.no_grad():
        new, old = model(pairs), reference_forward(model, pairs)
        assert torch.equal(new.reconstruction, old.reconstruction)
        assert torch.equal(new.latents, old.latents)
    with torch.inference_mode():
        encoded = model.encode(pairs)
        assert torch.equal(encoded.latents.flatten(0, 1), reference_latents(model, pairs))
        assert torch.equal(encoded.codes, reference_encode(model, pairs))


@pytest.mark.parametrize("frames", [1, 2, 3])
def test_position_generator_frame_taps_are_the_padded_conv3d(frames):
    model, _ = make()
    peg = model.encoder_spatial.layers[0].position_generator
    torch.nn.init.normal_(peg.conv.bias)
    video_shape = (3, frames, 8, 8)
    x = torch.randn(3 * frames, 64, 32, requires_grad=True)
    with torch.no_grad():
        conv3d = peg(x, video_shape)  # without gradients: the reference's padded Conv3d
    taps = peg(x, video_shape)  # with gradients: the frame taps
    assert torch.allclose(taps, conv3d, atol=1e-6)
    (taps * torch.randn_like(taps)).sum().backward()
    assert x.grad is not None and peg.conv.weight.grad is not None
    # causal in time: output frame 0 does not see the later frames
    later = x.detach().clone().reshape(3, frames, 64, 32)
    later[:, 1:] += 1.0
    with torch.no_grad():
        moved = peg(later.reshape(x.shape), video_shape).reshape(3, frames, 64, 32)
    assert torch.equal(moved[:, 0], conv3d.reshape(3, frames, 64, 32)[:, 0])


def test_position_bias_is_cached_without_gradients_until_a_weight_changes():
    model, pairs = make()
    bias_module = model.spatial_position_bias
    with torch.no_grad():
        first = bias_module(8, 8)
        assert bias_module(8, 8) is first
    with torch.inference_mode():
        in_inference = bias_module(8, 8)
        assert bias_module(8, 8) is in_inference and torch.equal(in_inference, first)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    out = model(pairs, step=1)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in bias_module.mlp[:2].parameters())
    optimizer.step()
    with torch.no_grad():
        after = bias_module(8, 8)
        assert after is not first and not torch.equal(after, first)
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})  # in-place copies
        reloaded = bias_module(8, 8)
        assert reloaded is not after and torch.equal(reloaded, after)


def test_bf16_autocast_keeps_quantisation_and_pixels_in_fp32():
    model, pairs = make(seed=5)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(pairs, step=1)
    assert out.latents.dtype == out.reconstruction.dtype == out.loss.dtype == torch.float32
    # the codes are the fp32 nearest codes of the fp32 latents
    assert torch.equal(out.codes.flatten(), model.quantizer.nearest_codes(out.latents.flatten(0, 1)))
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model.eval()
    with torch.no_grad():
        fp32 = model(pairs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(pairs)
    assert (bf16.reconstruction - fp32.reconstruction).abs().max() < 0.1  # bf16's rounding, not a different model


def test_a_forward_under_autocast_leaves_no_bf16_position_bias_for_fp32_calls():
    """Training with --mixed-precision bf16 evaluates through the autocast-wrapped forward and the plain encode."""
    model, pairs = make(seed=6)
    model.eval()
    with torch.no_grad():
        expected = model.encode(pairs).latents
        model.spatial_position_bias._bias = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(pairs)
        assert model.spatial_position_bias(8, 8).dtype == torch.float32
        assert torch.equal(model.encode(pairs).latents, expected)
