"""The quantizer reproduces the authors' network: their state_dicts convert strictly through the CLI and the
converted models give the golden outputs of the authors' code (tests/fixtures/laq, copied from shared/golden)."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

import modeling_lapa  # noqa: F401  (registers the Auto classes)
from support import FIXTURES, REPO_ROOT
from modeling_lapa import LAPAQuantizerConfig, LAPAQuantizerModel
from modeling_lapa.convert_laq_checkpoint import (
    REFERENCE_CONSTRUCTOR_KWARGS,
    CheckpointConversionError,
    convert_checkpoint,
    convert_state_dict,
    load_reference_config,
)

LAQ = FIXTURES / "laq"
CONFIGS = ["a", "c"]


def official(name):
    return LAQ / f"laq_tiny_{name}_official_state_dict.safetensors"


def golden(name):
    g = load_file(str(LAQ / f"laq_tiny_{name}_golden.safetensors"))
    g["pairs"] = g["video"].permute(0, 2, 1, 3, 4).contiguous()  # golden (B, 3, 2, H, W) -> ours (B, 2, 3, H, W)
    return g


@pytest.fixture(scope="module", params=CONFIGS)
def converted(request, tmp_path_factory):
    """Convert with the command-line tool, as a user would."""
    name = request.param
    out = tmp_path_factory.mktemp(f"laq_{name}")
    cmd = [
        sys.executable, "-m", "modeling_lapa.convert_laq_checkpoint",
        "--checkpoint", str(official(name)), "--config", str(LAQ / f"laq_tiny_{name}_config.json"), "--output", str(out),
    ]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Converted" in result.stdout
    return name, out


def test_golden_outputs_through_automodel(converted):
    name, folder = converted
    model = AutoModel.from_pretrained(str(folder)).eval()
    assert isinstance(model, LAPAQuantizerModel)
    g = golden(name)
    with torch.no_grad():
        encoded = model.encode(g["pairs"])
        assert torch.equal(encoded.codes, g["codebook_ids"])
        s = model.config.code_seq_len
        assert encoded.latents.shape == (g["pairs"].shape[0], s, model.config.quant_dim)
        recon = model.decode(g["pairs"][:, 0], encoded.codes)
        assert (recon - g["recon"]).abs().max().item() <= 1e-4
        forced = model.decode(g["pairs"][:, 0], g["forced_ids"])
        assert (forced - g["recon_forced"]).abs().max().item() <= 1e-4
        # forward in eval mode uses the hard codes: the same reconstruction, and its loss against frame t+H
        out = model(g["pairs"])
        assert torch.equal(out.codes, g["codebook_ids"])
        assert (out.reconstruction - g["recon"]).abs().max().item() <= 1e-4
        expected_loss = torch.nn.functional.mse_loss(g["recon"], g["pairs"][:, 1])
        assert abs(out.loss.item() - expected_loss.item()) < 1e-5


def test_encoder_tokens_match_golden(converted):
    name, folder = converted
    model = AutoModel.from_pretrained(str(folder)).eval()
    g = golden(name)
    pairs = g["pairs"]
    b = pairs.shape[0]
    with torch.no_grad():
        tokens = model.patch_embedding(pairs.flatten(0, 1)).reshape(b, 2, *g["encoder_first_tokens"].shape[2:])
        bias = model.spatial_position_bias(model.config.grid_size, model.config.grid_size)
        first, last = model._encode_tokens(tokens, bias)
    assert (first - g["encoder_first_tokens"].reshape(first.shape)).abs().max().item() <= 1e-5
    assert (last - g["encoder_last_tokens"].reshape(last.shape)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", CONFIGS)
def test_eager_attention_gives_the_same_numbers(name, tmp_path):
    convert_checkpoint(official(name), tmp_path, LAQ / f"laq_tiny_{name}_config.json")
    g = golden(name)
    sdpa = AutoModel.from_pretrained(str(tmp_path), attn_implementation="sdpa").eval()
    eager = AutoModel.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    with torch.no_grad():
        a, b = sdpa(g["pairs"]), eager(g["pairs"])
    assert torch.equal(a.codes, b.codes)
    assert (a.reconstruction - b.reconstruction).abs().max().item() <= 1e-5
    assert (b.reconstruction - g["recon"]).abs().max().item() <= 1e-4


def test_pt_checkpoint_with_module_prefix_and_plain_config(tmp_path):
    """A DDP-saved `.pt` (keys prefixed `module.`) and a plain-dict config JSON convert too."""
    state = {f"module.{k}": v for k, v in load_file(str(official("c"))).items()}
    torch.save(state, tmp_path / "laq.pt")
    kwargs = json.loads((LAQ / "laq_tiny_c_config.json").read_text())["official_constructor_kwargs"]
    (tmp_path / "plain.json").write_text(json.dumps(kwargs))
    convert_checkpoint(tmp_path / "laq.pt", tmp_path / "out", tmp_path / "plain.json")
    model = AutoModel.from_pretrained(str(tmp_path / "out")).eval()
    g = golden("c")
    with torch.no_grad():
        assert torch.equal(model.encode(g["pairs"]).codes, g["codebook_ids"])


def test_default_config_is_the_released_quantizer():
    """With no --config the converter builds the released laq_openx.pt sizes (about 0.34B parameters)."""
    config = load_reference_config(None)
    assert config.to_diff_dict() == LAPAQuantizerConfig.from_preset("reference").to_diff_dict()
    assert (config.hidden_size, config.quant_dim, config.codebook_size, config.code_seq_len) == (1024, 32, 8, 4)
    assert (config.image_size, config.patch_size, config.num_heads, config.head_dim) == (256, 32, 16, 64)
    with torch.device("meta"):
        model = LAPAQuantizerModel(config)
    n = sum(p.numel() for p in model.parameters())
    assert 0.30e9 < n < 0.38e9, n
    assert REFERENCE_CONSTRUCTOR_KWARGS["dim"] == 1024


def _reference_state(name="c"):
    return dict(load_file(str(official(name))))


def _config(name="c"):
    return load_reference_config(LAQ / f"laq_tiny_{name}_config.json")


def test_conversion_reports_missing_keys_by_name():
    state = _reference_state()
    del state["vq.codebooks"], state["dec_spatial_transformer.layers.0.2.null_kv"]
    with pytest.raises(CheckpointConversionError) as error:
        convert_state_dict(state, _config())
    assert "quantizer.codebook" in str(error.value)
    assert "decoder_spatial.layers.0.cross_attention.null_kv" in str(error.value)


def test_conversion_reports_unexpected_keys_by_name():
    state = _reference_state()
    state["vq.codebooks_used"] = torch.zeros(8)
    state["some_new_head.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointConversionError) as error:
        convert_state_dict(state, _config())
    assert "vq.codebooks_used" in str(error.value) and "some_new_head.weight" in str(error.value)


def test_conversion_rejects_wrong_config_shapes():
    with pytest.raises(CheckpointConversionError, match="shape mismatches"):
        convert_state_dict(_reference_state("c"), _config("a"))


def test_conversion_rejects_nonzero_fixed_bias():
    state = _reference_state()
    state["enc_spatial_transformer.layers.0.1.norm.beta"] = torch.ones(48)
    with pytest.raises(CheckpointConversionError, match="norm.beta"):
        convert_state_dict(state, _config())


def test_cli_fails_cleanly_on_a_bad_checkpoint(tmp_path):
    state = _reference_state()
    del state["to_pixels_first_frame.0.bias"]
    save_file(state, str(tmp_path / "broken.safetensors"))
    cmd = [
        sys.executable, "-m", "modeling_lapa.convert_laq_checkpoint", "--checkpoint", str(tmp_path / "broken.safetensors"),
        "--config", str(LAQ / "laq_tiny_c_config.json"), "--output", str(tmp_path / "out"),
    ]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 1
    assert "to_pixels.bias" in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_refuses_pickles_that_execute_code(tmp_path):
    """`.pt` files are read with weights_only=True: a pickle carrying an arbitrary object is refused."""
    import os
    import pickle

    # A reference to an arbitrary callable: unpickling it in full mode would import and hand back os.getcwd.
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"x": os.getcwd}))
    with pytest.raises(CheckpointConversionError, match="weights-only"):
        convert_checkpoint(tmp_path / "evil.pt", tmp_path / "out", LAQ / "laq_tiny_c_config.json")
