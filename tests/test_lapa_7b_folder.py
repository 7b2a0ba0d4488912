"""The authors' JAX VLA (params + VQGAN + tokenizer.model) converted into one LAPAForActionPrediction folder.

The tiny checkpoint and tiny VQGAN are the authors' own (tests/fixtures/lapa_vla, see test_lapa_jax_conversion.py);
the tokenizer is a tiny SentencePiece model trained here like LLaMA's (BPE, byte fallback, identity normaliser), since
the real tokenizer.model is not available. The golden inputs are the authors' ids (their text ids come from LLaMA-2's
vocabulary), so the golden comparisons feed those ids; the processor is checked against the authors' layout rule.
"""

from __future__ import annotations

import io
import json
import os
import textwrap

import numpy as np
import pytest
import torch
from transformers import AutoModel

import modeling_lapa  # noqa: F401  (registers the Auto classes)
import processing_lapa  # noqa: F401
from modeling_lapa.convert_lapa_jax import main
from modeling_lapa.convert_lwm_vqgan import load_vqgan_pickle, vqgan_state_dict_from_params
from modeling_lapa.modeling_lapa import LAPAForActionPrediction, positions_from_mask
from modeling_lapa.modeling_lwm import official_position_ids, official_to_combined_ids
from processing_lapa import LWMImageProcessor, LWMProcessor
from processing_lapa.processing_lwm import LWM_LATENT_SUFFIX, LWM_PROMPT_TEMPLATE

from support import FIXTURES, run_without_the_project

spm = pytest.importorskip("sentencepiece")

HERE = FIXTURES / "lapa_vla"
SPEC = json.loads((HERE / "tiny_config.json").read_text())
INSTRUCTION = "take the broccoli out of the pot"  # the golden prompt's instruction
ATOL = 1e-4


def train_tiny_sentencepiece(path) -> None:
    """A 400-piece SentencePiece BPE model trained like LLaMA's tokenizer.model (byte fallback, no normalisation,
    unk/bos/eos = 0/1/2, no pad), on the prompt texts."""
    texts = [LWM_PROMPT_TEMPLATE.format(instruction=i) for i in
             (INSTRUCTION, "open the drawer", "pick up the red block and put it in the bowl")]
    texts += [LWM_LATENT_SUFFIX, "</vision> <action>"]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts * 40), model_writer=model, vocab_size=400, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False, unk_id=0,
        bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1, seed_sentencepiece_size=1000,
    )
    path.write_bytes(model.getvalue())


def tiny_lwm_config(rope_table_dtype="float32") -> dict:
    official = SPEC["delta"]["llama_config"]
    return dict(
        text_vocab_size=official["vocab_size"], vision_vocab_size=official["vision_vocab_size"],
        latent_vocab_size=official["delta_vocab_size"], hidden_size=official["hidden_size"],
        intermediate_size=official["intermediate_size"], num_hidden_layers=official["num_hidden_layers"],
        num_attention_heads=official["num_attention_heads"], rms_norm_eps=official["rms_norm_eps"],
        rope_theta=official["theta"], max_position_embeddings=official["max_sequence_length"],
        rope_table_dtype=rope_table_dtype,
    )


@pytest.fixture(scope="module")
def golden():
    return np.load(HERE / "tiny_delta_golden.npz")


@pytest.fixture(scope="module")
def vqgan_golden():
    return np.load(HERE / "tiny_vqgan_golden.npz")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The authors' tiny params + tiny VQGAN + a tiny tokenizer.model, converted with the CLI (float32, sharded)."""
    work = tmp_path_factory.mktemp("lapa_tiny")
    train_tiny_sentencepiece(work / "tokenizer.model")
    (work / "lwm.json").write_text(json.dumps(tiny_lwm_config()))
    out = work / "LAPA-tiny"
    assert main(["--params", str(HERE / "tiny_delta_params"), "--vqgan", str(HERE / "tiny_vqgan.pkl"),
                 "--tokenizer", str(work / "tokenizer.model"), "--config", str(work / "lwm.json"),
                 "--dtype", "float32", "--max-shard-size", "1MB", "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def model(folder):
    return AutoModel.from_pretrained(folder, attn_implementation="eager").eval()


def golden_combined(golden, model, prefix="", delta=True):
    masks = (golden[f"{prefix}vision_masks"], golden[f"{prefix}delta_masks"] if delta else None)
    return official_to_combined_ids(golden[f"{prefix}input_ids"], *masks, config=model.config.backbone_config)


# -- the folder ---------------------------------------------------------------------------------------------------
def test_the_folder_is_a_complete_lapa_checkpoint(folder, model):
    files = set(os.listdir(folder))
    assert {"config.json", "model.safetensors.index.json", "processor_config.json", "tokenizer.json",
            "modeling_lapa.py", "configuration_lapa.py", "modeling_lwm.py", "vqgan_lwm.py", "loading.py",
            "processing_lwm.py", "processing_lapa.py", "image_processing_lwm.py"} <= files
    assert len([f for f in files if f.endswith(".safetensors")]) > 1
    config = json.loads((folder / "config.json").read_text())
    assert config["backbone_config"]["model_type"] == "lwm" and config["vqgan_config"]["num_embeddings"] == 1024
    assert config["auto_map"]["AutoModel"] == "modeling_lapa.LAPAForActionPrediction"
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(model.state_dict())

    assert type(model) is LAPAForActionPrediction and isinstance(model.processor, LWMProcessor)
    assert model.config.backbone_family == "lwm" and model.config.num_image_tokens == 256
    lwm = model.config.backbone_config
    assert (model.config.latent_token_offset, model.config.num_latent_codes) == (1024 + 8448, 8)
    assert model.config.image_token_id == model.processor.image_token_id == 1024 + 8194
    assert model.processor.vocab_size == lwm.vocab_size == 1024 + 8448 + 8
    assert not any(p.requires_grad for p in model.vqgan.parameters())  # frozen like a vision tower
    # the VQGAN inside is the authors' pickle, bit for bit
    reference = vqgan_state_dict_from_params(load_vqgan_pickle(HERE / "tiny_vqgan.pkl"))
    state = model.vqgan.state_dict()
    assert set(state) == set(reference)
    assert all(torch.equal(state[k], reference[k]) for k in reference)


# -- golden logits and ids ----------------------------------------------------------------------------------------
def test_every_head_matches_the_authors_fp32_logits_at_every_unpadded_position(model, golden):
    ids = golden_combined(golden, model)
    mask = torch.as_tensor(golden["attention_mask"]).long()
    real = mask[0].bool()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits  # positions from the mask (pads clamped to 0)
        official = model(input_ids=ids, attention_mask=mask, position_ids=official_position_ids(mask)).logits
    heads = model.backbone.head_logits(logits[0, real])
    for name, key in (("text", "text_logits"), ("vision", "vision_logits"), ("latent", "delta_logits")):
        expected = torch.from_numpy(golden[key][0][real.numpy()])
        torch.testing.assert_close(heads[name], expected, rtol=0, atol=ATOL, msg=name)
    # the authors' positions (pads -1, wrapping to the table's last row) change only the meaningless pad rows, and
    # their padding to 128 text tokens is the same as none (our processor pads to the longest prompt)
    torch.testing.assert_close(official[0, real], logits[0, real], rtol=0, atol=1e-5)
    with torch.no_grad():
        unpadded = model(input_ids=ids[:, real], attention_mask=mask[:, real]).logits
    # Not a golden comparison: float32 attention over 128 masked pad keys more sums in another order (transformers
    # 5.24's SDPA mask path differs from 5.23's by up to 1.2e-5 here); the golden bound above is 1e-4.
    torch.testing.assert_close(unpadded[0], logits[0, real], rtol=0, atol=2e-5)
    assert torch.equal(positions_from_mask(mask)[0, real], official_position_ids(mask)[0, real])


def test_latent_prediction_from_the_golden_prompt_gives_the_raw_argmax_ids(model, golden):
    ids = golden_combined(golden, model, prefix="prompt_")
    mask = torch.as_tensor(golden["prompt_attention_mask"]).long()
    codes, logits = model.generate_block(ids, mask, None, num_tokens=4, block="latent", return_logits=True)
    assert codes.tolist() == golden["raw_greedy_latent_fp32"].tolist() == [[3, 2, 2, 0]]
    assert golden["official_greedy_latent_fp32"].tolist() == [[3, 2, 0, 0]]  # their sampler's EOS truncation
    # the first step's logits are the golden ones at the last prompt position; every step's top-1 minus top-2
    # margin is the authors' (their golden teacher-forced latents [3, 1, 0, 7] differ from the greedy ones later)
    torch.testing.assert_close(logits[0, 0], torch.from_numpy(golden["delta_logits"][0, 390]), rtol=0, atol=ATOL)
    top2 = logits[0].topk(2, dim=-1).values
    torch.testing.assert_close(top2[:, 0] - top2[:, 1], torch.from_numpy(golden["raw_greedy_margins_fp32"]),
                               rtol=0, atol=ATOL)


# -- the authors' prompt --------------------------------------------------------------------------------------------
def test_processor_builds_the_authors_layout(model, golden, folder):
    processor = model.processor
    sp = spm.SentencePieceProcessor(model_file=str(folder.parent / "tokenizer.model"))
    for text in (LWM_PROMPT_TEMPLATE.format(instruction=INSTRUCTION), LWM_LATENT_SUFFIX, "a  b\n ü 日本 `x`"):
        assert processor.tokenizer(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
    image = np.zeros((64, 80, 3), np.uint8)
    batch = processor(images=[image, image], text=[INSTRUCTION, "open the drawer"], return_tensors="pt")
    lwm = model.config.backbone_config
    for row, instruction in enumerate((INSTRUCTION, "open the drawer")):
        expected = ([1, 1] + sp.encode(LWM_PROMPT_TEMPLATE.format(instruction=instruction))
                    + [processor.image_token_id] * 256 + [lwm.end_of_vision_token_id] + sp.encode(LWM_LATENT_SUFFIX))
        real = batch["attention_mask"][row].bool()
        assert batch["input_ids"][row][real].tolist() == expected
        assert batch["input_ids"][row][~real].eq(0).all()  # left padded with id 0, like the authors
        assert real[-len(expected):].all()
    # the same structure as the golden prompt: [1, 1] + text + 256 vision + eov + the 6 suffix ids, left padded
    real = golden["prompt_attention_mask"][0] > 0
    golden_ids, golden_vision = golden["prompt_input_ids"][0][real], golden["prompt_vision_masks"][0][real]
    assert golden_ids[:2].tolist() == [1, 1] and golden_vision.sum() == 257 and golden_ids[-7] == 8193
    assert golden_vision[-7:].tolist() == [True] + [False] * 6 and len(sp.encode(LWM_LATENT_SUFFIX)) >= 1
    with pytest.raises(ValueError, match="no action tokens"):
        processor(images=image, text=INSTRUCTION, task="action")


def test_the_image_processor_is_the_official_preprocessing(model, vqgan_golden):
    image_processor = model.processor.image_processor
    pixels = image_processor(vqgan_golden["image_square_uint8"])["pixel_values"]
    assert np.array_equal(pixels[0].permute(1, 2, 0).numpy(), vqgan_golden["pixels_square"][0])  # bit-identical
    resized = image_processor.resize(vqgan_golden["image_nonsquare_uint8"])
    assert np.array_equal(resized, vqgan_golden["image_nonsquare_resized_uint8"])


# -- from pixels ----------------------------------------------------------------------------------------------------
def test_predict_latent_actions_from_pixels_end_to_end(model, vqgan_golden):
    images = [vqgan_golden["image_square_uint8"], vqgan_golden["image_nonsquare_uint8"]]
    instructions = [INSTRUCTION, "open the drawer"]
    codes, logits = model.predict_latent_actions(images, instructions, return_logits=True)
    assert codes.shape == (2, 4) and codes.min() >= 0 and codes.max() < 8 and logits.shape == (2, 4, 8)
    # the image tokens are exactly the golden VQGAN codes, offset into the vision block
    batch = model.processor(images=images, text=instructions)
    vision_ids = model.image_token_ids(batch["pixel_values"])
    offset = model.config.backbone_config.vision_token_offset
    assert vision_ids[0].tolist() == (vqgan_golden["codes_square"] + offset).tolist()
    assert vision_ids[1].tolist() == (vqgan_golden["codes_nonsquare"] + offset).tolist()
    # ... placed over the placeholders: the pixel path equals feeding those ids
    ids = batch["input_ids"].clone()
    ids[ids == model.config.image_token_id] = vision_ids.reshape(-1)
    by_ids = model.generate_block(ids, batch["attention_mask"], None, num_tokens=4, block="latent",
                                  return_logits=True)
    assert torch.equal(by_ids[0], codes)
    torch.testing.assert_close(by_ids[1], logits, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="placeholders"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with pytest.raises(ValueError, match="no action tokens"):
        model.predict_action(images, instructions)


# -- remote code ----------------------------------------------------------------------------------------------------
def test_remote_code_load_where_the_project_is_not_importable(folder, model, golden, vqgan_golden, tmp_path):
    ids = golden_combined(golden, model)
    mask = torch.as_tensor(golden["attention_mask"]).long()
    np.save(tmp_path / "ids.npy", ids.numpy())
    np.save(tmp_path / "mask.npy", mask.numpy())
    np.save(tmp_path / "image.npy", vqgan_golden["image_nonsquare_uint8"])
    with torch.no_grad():
        expected = model.backbone.head_logits(model(input_ids=ids, attention_mask=mask).logits)["latent"][0]
    expected_codes = model.predict_latent_actions([vqgan_golden["image_nonsquare_uint8"]], INSTRUCTION)
    script = textwrap.dedent(
        f"""
        import json, sys  # BLOCKED and the import blocker come from run_without_the_project
        import numpy as np, torch
        from transformers import AutoModel

        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True, attn_implementation="eager").eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert type(model.processor).__name__ == "LWMProcessor", type(model.processor)
        ids, mask = torch.from_numpy(np.load("ids.npy")), torch.from_numpy(np.load("mask.npy"))
        with torch.no_grad():
            logits = model.backbone.head_logits(model(input_ids=ids, attention_mask=mask).logits)["latent"][0]
        codes = model.predict_latent_actions([np.load("image.npy")], {INSTRUCTION!r})
        print(json.dumps({{"logits": logits.tolist(), "codes": codes.tolist()}}))
        """
    )
    result = run_without_the_project(script, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    torch.testing.assert_close(torch.tensor(got["logits"]), expected, rtol=0, atol=1e-6)
    real = mask[0].bool().numpy()
    torch.testing.assert_close(torch.tensor(got["logits"])[real], torch.from_numpy(golden["delta_logits"][0][real]),
                               rtol=0, atol=ATOL)
    assert got["codes"] == expected_codes.tolist()


def test_default_bf16_conversion_keeps_the_vqgan_in_float32(folder, vqgan_golden, tmp_path):
    """The released model runs in bf16: the backbone is written and loaded in bf16, the VQGAN stays float32 (its codes
    are an argmin: half precision would change some), and the pixel path still gives the golden codes."""
    from safetensors import safe_open

    out = tmp_path / "bf16"
    assert main(["--params", str(HERE / "tiny_delta_params"), "--vqgan", str(HERE / "tiny_vqgan.pkl"),
                 "--config", str(folder.parent / "lwm.json"), "--output", str(out)]) == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {name.split(".")[0]: f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes == {"backbone": "BF16", "vqgan": "F32"}
    assert not (out / "processor_config.json").exists()  # no --tokenizer: the model alone
    model = AutoModel.from_pretrained(out, dtype=torch.bfloat16)
    assert model.backbone.dtype == torch.bfloat16 and model.vqgan.dtype == torch.float32 and model.processor is None
    pixels = LWMImageProcessor()([vqgan_golden["image_square_uint8"]])["pixel_values"]
    offset = model.config.backbone_config.vision_token_offset
    assert (model.image_token_ids(pixels)[0] - offset).tolist() == vqgan_golden["codes_square"].tolist()


def test_a_vqgan_that_does_not_match_fails_before_writing(tmp_path):
    import pickle

    from modeling_lapa.convert_lapa_jax import ConversionError
    from modeling_lapa.convert_lwm_vqgan import flatten_params

    tree = flatten_params(load_vqgan_pickle(HERE / "tiny_vqgan.pkl"))
    tree.pop("decoder/Conv_1/bias")
    (tmp_path / "bad.pkl").write_bytes(pickle.dumps(tree))
    with pytest.raises((KeyError, ConversionError), match="decoder"):
        main(["--params", str(HERE / "tiny_delta_params"), "--vqgan", str(tmp_path / "bad.pkl"),
              "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_the_released_7b_trees_plan_exactly_onto_the_7b_lapa_model():
    """The expected LAPA-7B params tree and the released VQGAN tree (tiny_config.json) fill the state dict of the
    7B LAPAForActionPrediction (built on the meta device) with no missing, unexpected or mis-shaped tensor."""
    from modeling_lapa.convert_lapa_jax import (LAPA_7B_CONFIG, check_lapa_plan, conversion_plan, lapa_config_for,
                                                vqgan_targets)
    from modeling_lapa.modeling_lwm import LWMConfig

    params = {tuple(e["key"]): tuple(e["shape"]) for e in SPEC["delta"]["real_LAPA_7B_expected_param_tree"]["tree"]}
    lwm = LWMConfig(**LAPA_7B_CONFIG)
    vqgan_config, _, vqgan_part = vqgan_targets(SPEC["vqgan"]["real_param_tree"])
    config = lapa_config_for(lwm, vqgan_config)
    skeleton = check_lapa_plan(vqgan_part + conversion_plan(params, lwm, prefix="backbone."), config)
    assert config.num_image_tokens == 256 and config.image_token_id == 32000 + 8194
    assert (config.latent_token_offset, config.num_action_bins) == (32000 + 8448, 0)
    n_backbone = sum(p.numel() for p in skeleton.backbone.parameters())
    n_vqgan = sum(p.numel() for p in skeleton.vqgan.parameters())
    assert (n_backbone, n_vqgan) == (SPEC["delta"]["real_LAPA_7B_expected_param_tree"]["n_params"], 146244675)


def test_lwm_processor_targets_round_trip_and_inputs(model, vqgan_golden, tmp_path):
    from transformers import AutoProcessor

    processor = model.processor
    image = vqgan_golden["image_nonsquare_uint8"]
    batch = processor(images=[image, image], text=[INSTRUCTION, "open the drawer"],
                      latent_codes=np.array([[3, 1, 0, 7], [0, 0, 5, 2]]))
    offset = model.config.latent_token_offset
    assert batch["input_ids"][:, -4:].tolist() == [[offset + 3, offset + 1, offset + 0, offset + 7],
                                                   [offset, offset, offset + 5, offset + 2]]
    assert torch.equal(batch["labels"][:, -4:], batch["input_ids"][:, -4:]) and batch["labels"][:, :-4].eq(-100).all()
    assert processor.decode_latent_actions(batch["input_ids"][:, -4:]).tolist() == [[3, 1, 0, 7], [0, 0, 5, 2]]
    loss = model(**batch).loss  # the block loss over the 8 latent rows
    assert torch.isfinite(loss) and loss > 0
    with pytest.raises(ValueError, match="agree with the targets"):
        processor(images=image, text=INSTRUCTION, latent_codes=np.array([[1, 2, 3, 4]]), task="action")
    # float [0, 1] and torch channels-first inputs give the uint8 image's pixels
    pixels = processor.image_processor(image)["pixel_values"]
    assert torch.equal(processor.image_processor(image.astype(np.float32) / 255.0)["pixel_values"], pixels)
    assert torch.equal(processor.image_processor(torch.from_numpy(image).permute(2, 0, 1))["pixel_values"], pixels)
    processor.save_pretrained(tmp_path / "processor")
    reloaded = AutoProcessor.from_pretrained(tmp_path / "processor")
    settings = ("num_latent_codes", "latent_sequence_length", "num_action_bins", "num_image_tokens", "text_vocab_size",
                "vision_vocab_size", "end_of_vision_code", "prompt_template", "num_bos", "latent_prompt_suffix")
    assert type(reloaded) is LWMProcessor
    assert all(getattr(reloaded, name) == getattr(processor, name) for name in settings)
    again = reloaded(images=[image, image], text=[INSTRUCTION, "open the drawer"],
                     latent_codes=np.array([[3, 1, 0, 7], [0, 0, 5, 2]]))
    assert all(torch.equal(again[k], batch[k]) for k in batch)
