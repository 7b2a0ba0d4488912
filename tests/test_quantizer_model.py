"""LAPAQuantizerModel behaviour: save/load, remote code, strict loading, input errors, training-mode mechanics."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel

import modeling_lapa  # noqa: F401
from modeling_lapa import LAPAQuantizerConfig, LAPAQuantizerModel
from modeling_lapa.configuration_lapa_quantizer import REFERENCE_REPLACEMENT_STEPS
from modeling_lapa.loading import StrictLoadingError
from modeling_lapa.transformers_compat import enable_activation_checkpointing


def small_config(**overrides):
    """32 px frames, 4 px patches: the 8 x 8 grid of the reference layout at a CPU-test size."""
    args = dict(
        hidden_size=32, quant_dim=8, codebook_size=8, code_seq_len=4, image_size=32, patch_size=4,
        spatial_depth=1, temporal_depth=1, num_heads=2, head_dim=16,
    )
    args.update(overrides)
    return LAPAQuantizerConfig(**args)


@pytest.fixture
def model():
    return LAPAQuantizerModel(small_config()).eval()


def pairs(batch=3, size=32):
    return torch.rand(batch, 2, 3, size, size)


def test_presets_and_tiny_forward():
    tiny = LAPAQuantizerConfig.from_preset("tiny")
    assert (tiny.image_size, tiny.grid_size, tiny.code_seq_len, tiny.codebook_size) == (64, 8, 4, 8)
    m = LAPAQuantizerModel(tiny)
    out = m(torch.rand(2, 2, 3, 64, 64))
    assert out.reconstruction.shape == (2, 3, 64, 64)
    assert out.codes.shape == (2, 4) and out.codes.dtype == torch.long
    assert out.latents.shape == (2, 4, 32)
    assert 1.0 <= out.perplexity.item() <= 8.0
    with pytest.raises(ValueError, match="Unknown quantizer preset"):
        LAPAQuantizerConfig.from_preset("huge")


def test_config_rejects_unsupported_layouts():
    with pytest.raises(ValueError, match="code_seq_len=3"):
        small_config(code_seq_len=3)
    with pytest.raises(ValueError, match="needs a 16x16 token grid"):
        small_config(code_seq_len=16)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        small_config(image_size=30)


def test_save_load_round_trip_is_exact_and_safetensors_only(model, tmp_path):
    model.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt")) for f in files)
    assert "modeling_lapa_quantizer.py" in files and "configuration_lapa_quantizer.py" in files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_lapa_quantizer.LAPAQuantizerModel"
    assert isinstance(AutoConfig.from_pretrained(tmp_path), LAPAQuantizerConfig)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is LAPAQuantizerModel
    x = pairs()
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.reconstruction, b.reconstruction)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_remote_code_loads_where_the_project_is_not_importable(model, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    x = pairs(2)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = model.encode(x).codes
    script = f"""
import sys
sys.modules["modeling_lapa"] = None  # the project cannot be imported, even if installed
import torch
from transformers import AutoModel
model = AutoModel.from_pretrained({str(tmp_path / 'ckpt')!r}, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
with torch.no_grad():
    print(model.encode(x).codes.tolist())
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected.tolist()


def test_strict_loading_names_missing_and_unexpected_keys(model, tmp_path):
    model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["to_pixels.bias"]
    state["stray.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(StrictLoadingError) as error:
        AutoModel.from_pretrained(tmp_path)
    assert "to_pixels.bias" in str(error.value) and "stray.weight" in str(error.value)
    loose = AutoModel.from_pretrained(tmp_path, strict=False)  # opt-out restores transformers' behaviour
    assert isinstance(loose, LAPAQuantizerModel)


def test_strict_loading_rejects_a_checkpoint_of_another_size(model, tmp_path):
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quant_dim"] = 16
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(StrictLoadingError, match=r"mismatched keys: .*quantizer\.codebook \(checkpoint \(8, 8\) vs model \(8, 16\)\)"):
        AutoModel.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (torch.rand(3, 3, 32, 32), ValueError, "5 dimensions"),
        (torch.rand(3, 3, 3, 32, 32), ValueError, "2 frames"),
        (torch.rand(3, 1, 3, 32, 32), ValueError, "2 frames"),
        (torch.rand(3, 2, 1, 32, 32), ValueError, "3 channels"),
        (torch.rand(3, 2, 3, 64, 64), ValueError, "64x64 but this quantizer takes 32x32"),
        ((torch.rand(3, 2, 3, 32, 32) * 255).to(torch.uint8), TypeError, "integer dtype"),
        (torch.rand(3, 2, 3, 32, 32) * 255, ValueError, r"\[0, 1\]"),
        (torch.rand(3, 2, 3, 32, 32) - 0.5, ValueError, r"\[0, 1\]"),
        (torch.full((3, 2, 3, 32, 32), float("nan")), ValueError, r"\[0, 1\]"),
        ([[0.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_pixel_values_get_clear_errors(model, bad, error, message):
    with pytest.raises(error, match=message):
        model.encode(bad)
    with pytest.raises(error, match=message):
        model(bad)


def test_bad_decode_inputs_get_clear_errors(model):
    frame = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"must lie in \[0, 7\]"):
        model.decode(frame, torch.tensor([[0, 1, 2, 8], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match=r"must lie in \[0, 7\]"):
        model.decode(frame, torch.tensor([[0, -1, 2, 3], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match=r"shape \(2, 4\)"):
        model.decode(frame, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor"):
        model.decode(frame, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="4 dimensions"):
        model.decode(torch.rand(2, 2, 3, 32, 32), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer dtype"):
        model.decode(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.long))


def test_encode_decode_agree_with_forward_in_eval_mode(model):
    x = pairs()
    with torch.no_grad():
        enc = model.encode(x)
        out = model(x)
        rec = model.decode(x[:, 0], enc.codes)
    assert torch.equal(enc.codes, out.codes)
    assert torch.allclose(rec, out.reconstruction, atol=1e-6)
    # the codes are the nearest codebook vectors of the latents
    distances = torch.cdist(enc.latents.reshape(-1, 8), model.quantizer.codebook)
    assert torch.equal(distances.argmin(-1).reshape(enc.codes.shape), enc.codes)
    assert torch.equal(enc.quantized, model.quantizer.codebook[enc.codes])


def test_training_mode_uses_noise_substitution_and_eval_is_deterministic(model):
    x = pairs()
    with torch.no_grad():
        e1, e2 = model(x).reconstruction, model(x).reconstruction
        model.train()
        torch.manual_seed(1)
        t1 = model(x).reconstruction
        torch.manual_seed(2)
        t2 = model(x).reconstruction
    assert torch.equal(e1, e2)
    assert not torch.allclose(t1, t2)
    assert not torch.allclose(t1, e1)


def test_gradients_flow_and_decoder_queries_are_detached(model):
    model.train()
    out = model(pairs())
    out.loss.backward()
    assert model.quantizer.codebook.grad is not None and model.quantizer.codebook.grad.abs().sum() > 0
    assert model.encoder_spatial.layers[0].self_attention.to_q.weight.grad.abs().sum() > 0
    # detaching frame-t tokens in the decoder: the patch embedding only learns through the encoder.
    model.zero_grad()
    first_tokens = model.patch_embedding(pairs()[:, 0])
    assert first_tokens.requires_grad
    bias = model.spatial_position_bias(8, 8)
    action = model.quantizer.to_action_tokens(torch.randn(12, 8), 3)
    model._decode_tokens(first_tokens.detach(), action, bias).sum().backward()
    assert model.patch_embedding.projection.weight.grad is None


def test_gradient_checkpointing_gives_the_same_gradients():
    config = small_config()
    torch.manual_seed(0)
    plain = LAPAQuantizerModel(config).train()
    checkpointed = LAPAQuantizerModel(config).train()
    checkpointed.load_state_dict(plain.state_dict())
    enable_activation_checkpointing(checkpointed)
    assert checkpointed.is_gradient_checkpointing
    x = pairs()
    for m in (plain, checkpointed):
        torch.manual_seed(5)
        m(x).loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_reference_replacement_schedule():
    config = small_config()
    steps = [s for s in range(0, 6000) if config.is_replacement_step(s)]
    expected = [s for s in range(1, 6000) if (s % 10 == 0 and s < 100) or (s % 100 == 0 and s < 1000) or (s % 500 == 0 and s < 5000)]
    assert steps == expected == list(REFERENCE_REPLACEMENT_STEPS)
    assert steps[:3] == [10, 20, 30] and steps[-1] == 4500 and 0 not in steps
    custom = small_config(replacement_steps=[3, 7])
    assert [s for s in range(20) if custom.is_replacement_step(s)] == [3, 7]
    off = small_config(codebook_replacement=False)
    assert not any(off.is_replacement_step(s) for s in range(6000))


def test_replacement_overwrites_unused_codes_with_used_ones(model):
    nsvq = model.quantizer
    before = nsvq.codebook.detach().clone()
    # batch of 10: codes 0 and 1 hit often, code 2 hit once (0.1 < threshold? 1/10 = 0.1 -> used), others never
    nsvq.code_hits.zero_()
    nsvq.count_hits(torch.tensor([0] * 20 + [1] * 19 + [2]))
    replaced = nsvq.replace_unused_codes(batch_size=10, step=10)
    assert replaced.tolist() == [3, 4, 5, 6, 7]
    after = nsvq.codebook.detach()
    assert torch.equal(after[:3], before[:3])
    for i in replaced.tolist():
        assert min((after[i] - before[j]).abs().max().item() for j in range(3)) < 1e-6
    assert nsvq.code_hits.sum().item() == 0  # the counter resets
    # same inputs, same step -> same choices (this is what keeps ranks in sync)
    nsvq.codebook.data.copy_(before)
    nsvq.count_hits(torch.tensor([0] * 20 + [1] * 19 + [2]))
    nsvq.replace_unused_codes(batch_size=10, step=10)
    assert torch.equal(nsvq.codebook.detach(), after)


def test_share_rule_also_replaces_rarely_chosen_codes():
    # 1000 vectors over 500 steps of batch 2: code 2 has 30 hits (30/2 >= 0.1, the reference rule keeps it) but a
    # share of 3%; with replacement_min_share=0.05 it is replaced too, with None it is not.
    hits = torch.tensor([0] * 500 + [1] * 470 + [2] * 30)
    for min_share, expected in ((None, [3, 4, 5, 6, 7]), (0.05, [2, 3, 4, 5, 6, 7])):
        model = LAPAQuantizerModel(small_config(replacement_min_share=min_share))
        model.quantizer.count_hits(hits)
        assert model.quantizer.replace_unused_codes(batch_size=2, step=500).tolist() == expected
    # per slot: the share is taken within each slot's own counts
    model = LAPAQuantizerModel(small_config(codebook_per_slot=True, replacement_min_share=0.05))
    slot_codes = torch.tensor([[0, 0, 0, 1]] * 38 + [[0, 1, 0, 1]] * 2)  # slot 1: code 1 has a 5% share; slot 3: all code 1
    model.quantizer.count_hits(slot_codes)
    replaced = model.quantizer.replace_unused_codes(batch_size=20, step=500).tolist()  # 2 hits / 20 = 0.1: kept by both rules
    assert 1 * 8 + 1 not in replaced and 1 * 8 + 0 not in replaced and 3 * 8 + 1 not in replaced
    assert 3 * 8 + 0 in replaced and len(replaced) == 4 * 8 - 5
    with pytest.raises(ValueError, match="replacement_min_share"):
        small_config(replacement_min_share=0.2)  # >= 1/|C| = 0.125


def test_replacement_with_no_used_code_only_adds_tiny_noise(model):
    nsvq = model.quantizer
    before = nsvq.codebook.detach().clone()
    nsvq.code_hits.zero_()
    replaced = nsvq.replace_unused_codes(batch_size=64, step=20)
    assert replaced.numel() == 8
    assert (nsvq.codebook.detach() - before).abs().max().item() < 1e-9


def test_forward_replaces_on_schedule_only_in_training(model):
    x = pairs(2)
    with torch.no_grad():
        assert model(x, step=10).replaced_codes is None  # eval mode never replaces or counts
        assert model.quantizer.code_hits.sum().item() == 0
        model.train()
        assert model(x, step=9).replaced_codes is None
        assert model.quantizer.code_hits.sum().item() == 2 * 4
        out = model(x, step=10)
    assert out.replaced_codes is not None
    assert model.quantizer.code_hits.sum().item() == 0


def test_per_slot_codebooks_pick_each_slots_nearest_code_and_round_trip(tmp_path):
    model = LAPAQuantizerModel(small_config(codebook_per_slot=True)).eval()
    assert model.quantizer.codebook.shape == (4, 8, 8)
    x = pairs()
    with torch.no_grad():
        enc = model.encode(x)
        for slot in range(4):
            brute = torch.cdist(enc.latents[:, slot], model.quantizer.codebook[slot]).argmin(-1)
            assert torch.equal(enc.codes[:, slot], brute)
            assert torch.equal(enc.quantized[:, slot], model.quantizer.codebook[slot][enc.codes[:, slot]])
        assert torch.allclose(model.decode(x[:, 0], enc.codes), model(x).reconstruction, atol=1e-6)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert loaded.config.codebook_per_slot and torch.equal(loaded.quantizer.codebook, model.quantizer.codebook)


def test_per_slot_replacement_runs_in_each_slot():
    model = LAPAQuantizerModel(small_config(codebook_per_slot=True))
    nsvq = model.quantizer
    before = nsvq.codebook.detach().clone()
    # batch of 10 pairs, 4 slots: slot s only ever uses code s (10 hits each); everything else unused
    codes = torch.arange(4).repeat(10)  # sample-major rows: slot = row % 4
    nsvq.count_hits(codes)
    replaced = nsvq.replace_unused_codes(batch_size=10, step=10)
    expected = [slot * 8 + code for slot in range(4) for code in range(8) if code != slot]
    assert replaced.tolist() == expected
    after = nsvq.codebook.detach()
    for slot in range(4):
        assert torch.equal(after[slot, slot], before[slot, slot])  # the used code stays
        for code in range(8):  # every other code of the slot became a copy of that slot's used code
            assert (after[slot, code] - before[slot, slot]).abs().max().item() < 1e-6


def test_replacement_noise_makes_copies_distinct_only_above_the_reference_value():
    for noise, distinct in ((1e-12, False), (0.1, True)):
        model = LAPAQuantizerModel(small_config(replacement_noise=noise))
        nsvq = model.quantizer
        nsvq.count_hits(torch.zeros(40, dtype=torch.long))  # only code 0 is used
        replaced = nsvq.replace_unused_codes(batch_size=10, step=10)
        assert replaced.tolist() == list(range(1, 8))
        copies = nsvq.codebook.detach()[1:]
        original = nsvq.codebook.detach()[0]
        differs = (copies - original).abs().amax(dim=1) > 0
        assert bool(differs.all()) is distinct
        if distinct:  # near the original: about 10% of its RMS entry
            rms = original.pow(2).mean().sqrt()
            assert (copies - original).pow(2).mean().sqrt() < 0.3 * rms
