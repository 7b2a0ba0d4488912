"""A quantizer loaded with `from_pretrained` trains: its codebook hit counter (a plain attribute, not a buffer, so
that DDP does not broadcast rank 0's counts) is not left on the meta device that loading builds modules on.

Covers from_pretrained -> train -> save -> resume, and `train_quantizer.py --init-from` a checkpoint converted from
the authors' reference format (the path that continues from the converted `laq_openx`)."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from support import FIXTURES
from modeling_lapa import LAPAQuantizerConfig, LAPAQuantizerModel
from modeling_lapa.convert_laq_checkpoint import convert_checkpoint
from test_train_quantizer import TINY_MODEL, run_config, write_moving_square_dataset
from training.train_quantizer import resolve_config, train


def test_from_pretrained_counts_hits_and_replaces_codes(tmp_path):
    config = LAPAQuantizerConfig.from_preset("tiny", **TINY_MODEL, replacement_steps=[2])
    LAPAQuantizerModel(config).save_pretrained(tmp_path / "saved")
    model = LAPAQuantizerModel.from_pretrained(tmp_path / "saved").train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    pairs = torch.rand(4, 2, 3, 32, 32)
    for step in (1, 2, 3):
        loss = model(pairs, step=step).loss  # step 2 is a replacement step: it reads and resets the counter
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    hits = model.quantizer.code_hits
    assert not hits.is_meta and hits.dtype == torch.float64
    assert hits.sum().item() == 4 * config.code_seq_len  # step 3's codes, counted after step 2's reset
    model.save_pretrained(tmp_path / "trained")
    again = LAPAQuantizerModel.from_pretrained(tmp_path / "trained")
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_a_loaded_quantizer_trains_saves_and_resumes_exactly(tmp_path):
    dataset = write_moving_square_dataset(tmp_path / "squares", episodes=4)
    start = tmp_path / "start"
    LAPAQuantizerModel(LAPAQuantizerConfig.from_preset("tiny", **TINY_MODEL)).save_pretrained(start)
    # codebook replacements at steps 2 and 4: they read the loaded model's hit counter
    common = dict(init_from=str(start), model={"replacement_steps": [2, 4]}, holdout_episodes=1, save_every=3)
    train(resolve_config(_argv(tmp_path, dataset, tmp_path / "straight", max_steps=6, **common)))
    # interrupted: stop after 3 steps, then resume to 6
    train(resolve_config(_argv(tmp_path, dataset, tmp_path / "resumed", max_steps=3, **common)))
    train(resolve_config(_argv(tmp_path, dataset, tmp_path / "resumed", max_steps=6, **common) + ["--resume"]))
    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model" / "model.safetensors"))
    initial = load_file(str(start / "model.safetensors"))
    assert a.keys() == b.keys() == initial.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["quantizer.codebook"], initial["quantizer.codebook"])  # it trained
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "step-0000006" / "trainer_state.json").read_text())
    assert state["step"] == 6


def _argv(tmp_path, dataset, output, **overrides) -> list[str]:
    config = run_config(tmp_path, dataset, **overrides)
    named = tmp_path / f"{output.name}-{overrides.get('max_steps')}.yaml"
    named.write_text(config.read_text())
    return ["--config", str(named), "--output-dir", str(output)]


def test_init_from_a_converted_reference_checkpoint_trains(tmp_path):
    converted = tmp_path / "laq_tiny_a"
    convert_checkpoint(FIXTURES / "laq" / "laq_tiny_a_official_state_dict.safetensors", converted,
                       FIXTURES / "laq" / "laq_tiny_a_config.json")
    size = json.loads((FIXTURES / "laq" / "laq_tiny_a_config.json").read_text())["official_constructor_kwargs"]["image_size"]
    dataset = write_moving_square_dataset(tmp_path / "squares", episodes=4, size=size)
    config = run_config(tmp_path, dataset, init_from=str(converted), model={"replacement_steps": [2]}, max_steps=3,
                        save_every=3, holdout_episodes=1, batch_size=4)
    summary = train(resolve_config(["--config", str(config), "--output-dir", str(tmp_path / "continued")]))
    trained = load_file(str(tmp_path / "continued" / "model" / "model.safetensors"))
    initial = load_file(str(converted / "model.safetensors"))
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)
    assert summary is not None
