"""LAPAForActionPrediction: token-block heads, cached decoding, prediction APIs, saving/loading, LoRA, bad input.

Tiny random-init backbones of two families (LLaVA-style and Idefics3) built in code; nothing is downloaded."""

import json
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoProcessor

import modeling_lapa  # noqa: F401
import processing_lapa  # noqa: F401
from support import run_without_the_project
from modeling_lapa import LAPAConfig, LAPAForActionPrediction, count_image_tokens, tiny_backbone_config
from modeling_lapa.loading import StrictLoadingError
from processing_lapa import LAPAImageProcessor, LAPAProcessor, build_tiny_tokenizer

FAMILIES = ["llava", "idefics3"]
ACTION_DIM = 4


def build(family: str = "llava", seed: int = 0, freeze: bool = True):
    torch.manual_seed(seed)
    backbone_config = tiny_backbone_config(family, image_size=32, patch_size=8, hidden_size=64, num_layers=2)
    processor = LAPAProcessor.from_components(
        build_tiny_tokenizer(), LAPAImageProcessor(size=32), num_latent_codes=8, latent_sequence_length=4,
        num_action_bins=16, num_image_tokens=count_image_tokens(backbone_config),
    )
    rng = np.random.default_rng(seed)
    actions = np.concatenate([rng.normal(size=(400, ACTION_DIM - 1)), rng.choice([-1.0, 1.0], size=(400, 1))], axis=1)
    processor.fit_action_tokenizer(actions.astype(np.float32), dataset="toy", gripper_dims=[ACTION_DIM - 1])
    config = LAPAConfig.from_processor(backbone_config, processor, freeze_vision_encoder=freeze)
    model = LAPAForActionPrediction(config).eval()
    model.processor = processor
    return model, processor


def images(batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(batch, 40, 48, 3), dtype=np.uint8)


INSTRUCTIONS = ["open the drawer", "push the red button all the way down"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return build(request.param)


def test_latent_and_action_blocks_are_separate_softmax_heads(family_model):
    model, processor = family_model
    codes = np.array([[1, 2, 3, 4], [7, 0, 0, 5]])
    batch = processor(images=images(), text=INSTRUCTIONS, latent_codes=codes)
    out = model(**batch)
    # The same loss written out: a softmax over the 8 latent rows only, at the 4 positions before each target.
    full = model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          pixel_values=model._images_for_backbone(batch["pixel_values"]),
                          position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)).logits
    lo = model.config.latent_token_offset
    expected = F.cross_entropy(full[:, -5:-1, lo:lo + 8].reshape(-1, 8), torch.as_tensor(codes).reshape(-1))
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-5)
    assert out.num_target_tokens.item() == 8
    # Only the positions from the one before the first target on are projected to the vocabulary.
    assert out.logits.shape[1] == 5
    # Logits outside the block do not change the loss.
    with torch.no_grad():
        model.get_output_embeddings().weight[: lo].mul_(3.0)
    try:
        torch.testing.assert_close(model(**batch).loss, expected, rtol=1e-5, atol=1e-5)
    finally:
        with torch.no_grad():
            model.get_output_embeddings().weight[: lo].div_(3.0)
    # Action targets: a softmax over the N action rows.
    actions = np.array([[0.1, -0.3, 0.2, 1.0], [0.0, 0.5, -1.0, -1.0]], dtype=np.float32)
    batch = processor(images=images(), text=INSTRUCTIONS, actions=actions)
    out = model(**batch)
    bins = torch.as_tensor(processor.action_tokenizer.encode(actions))
    ao = model.config.action_token_offset
    full = model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          pixel_values=model._images_for_backbone(batch["pixel_values"]),
                          position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)).logits
    expected = F.cross_entropy(full[:, -ACTION_DIM - 1:-1, ao:ao + 16].reshape(-1, 16), bins.reshape(-1))
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-5)


def test_cached_decoding_equals_the_full_forward_and_emits_exactly_s_or_d_tokens(family_model):
    model, processor = family_model
    codes, step_logits = model.predict_latent_actions(images(), INSTRUCTIONS, return_logits=True)
    assert codes.shape == (2, 4) and codes.dtype == torch.long and ((codes >= 0) & (codes < 8)).all()
    # Teacher-force the decoded codes through one uncached forward pass: same logits at every step.
    batch = processor(images=images(), text=INSTRUCTIONS, latent_codes=codes.numpy())
    out = model(**batch)
    lo = model.config.latent_token_offset
    torch.testing.assert_close(out.logits[:, :-1, lo:lo + 8], step_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(out.logits[:, :-1, lo:lo + 8].argmax(-1), codes)
    actions, action_logits = model.predict_action(images(), INSTRUCTIONS, return_logits=True)
    assert actions.shape == (2, ACTION_DIM) and actions.dtype == np.float32
    assert action_logits.shape == (2, ACTION_DIM, 16)


def test_black_and_white_images_give_different_logits_on_the_cached_path(family_model):
    model, _ = family_model
    black = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    white = np.full((1, 32, 32, 3), 255, dtype=np.uint8)
    instruction = ["close the drawer"]
    _, latent_black = model.predict_latent_actions(black, instruction, return_logits=True)
    _, latent_white = model.predict_latent_actions(white, instruction, return_logits=True)
    _, action_black = model.predict_action(black, instruction, return_logits=True)
    _, action_white = model.predict_action(white, instruction, return_logits=True)
    # Every decoding step (the cached ones included) sees the image.
    assert (latent_black - latent_white).abs().amax(dim=-1).min() > 1e-4
    assert (action_black - action_white).abs().amax(dim=-1).min() > 1e-4


def test_batched_prediction_equals_one_at_a_time(family_model):
    model, _ = family_model
    pictures = images()
    _, batched = model.predict_latent_actions(pictures, INSTRUCTIONS, return_logits=True)
    for i in range(2):
        _, single = model.predict_latent_actions(pictures[i:i + 1], INSTRUCTIONS[i:i + 1], return_logits=True)
        torch.testing.assert_close(batched[i:i + 1], single, rtol=1e-4, atol=1e-4)


def test_static_cache_decoding_emits_the_dynamic_paths_tokens_and_logits():
    """cache_implementation="static": a preallocated StaticCache and a torch.compile'd decoding step, per (batch,
    bucketed length). Same tokens and (to float rounding) logits as the dynamic path, over two shapes called in
    turn (batch 2 and 1), and the generation config's "static" selects it. One family: each shape compiles (tens of
    seconds on a fresh machine); benchmarks/vla_speed.py --family idefics3 checks the other."""
    model, _ = build("llava")
    pictures = images()
    for batch in (slice(0, 2), slice(1, 2), slice(0, 2)):
        for predict in (model.predict_latent_actions, model.predict_action):
            fast, fast_logits = predict(pictures[batch], INSTRUCTIONS[batch], return_logits=True,
                                        cache_implementation="static")
            plain, plain_logits = predict(pictures[batch], INSTRUCTIONS[batch], return_logits=True,
                                          cache_implementation="dynamic")
            assert (torch.equal(fast, plain) if isinstance(fast, torch.Tensor) else np.array_equal(fast, plain))
            torch.testing.assert_close(fast_logits, plain_logits, rtol=1e-5, atol=1e-5)
    decoders = model.__dict__["_static_decoders"]
    # One cache per shape (its length a multiple of 64), reused by the third call and by both blocks.
    assert sorted(key[0] for key in decoders) == [1, 2] and all(key[1] % 64 == 0 for key in decoders)
    model.generation_config.cache_implementation = "static"
    try:
        codes = model.predict_latent_actions(pictures, INSTRUCTIONS)
        assert len(model.__dict__["_static_decoders"]) == 2
    finally:
        model.generation_config.cache_implementation = None
    assert torch.equal(codes, model.predict_latent_actions(pictures, INSTRUCTIONS))
    with pytest.raises(ValueError, match="'dynamic' or 'static'"):
        model.predict_latent_actions(pictures, INSTRUCTIONS, cache_implementation="offloaded")


def test_no_end_of_sequence_rule_cuts_the_codes():
    # The reference demo decoded latent codes with a plain greedy `generate`, which stopped when a code's id was the
    # end-of-sequence id and padded the rest. Make the first generated token the EOS id: `generate` stops there;
    # predict_latent_actions still emits all s codes, each a latent code.
    model, processor = build("llava")
    batch = processor(images=images(), text=INSTRUCTIONS)
    length = batch["input_ids"].shape[1]
    first = model.generate(**batch, max_new_tokens=1, do_sample=False)[0, length].item()
    pad = processor.tokenizer.pad_token_id
    cut = model.generate(**batch, max_new_tokens=4, do_sample=False, eos_token_id=first, pad_token_id=pad)
    assert cut[0, length].item() == first and (cut[0, length + 1:] == pad).all()
    codes = model.predict_latent_actions(images(), INSTRUCTIONS)
    assert codes.shape == (2, 4) and ((codes >= 0) & (codes < 8)).all()


def test_sampling_options():
    model, _ = build("llava")
    greedy = model.predict_latent_actions(images(), INSTRUCTIONS)
    top1 = model.predict_latent_actions(images(), INSTRUCTIONS, do_sample=True, top_k=1,
                                        generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, top1)
    draws = [model.predict_latent_actions(images(), INSTRUCTIONS, do_sample=True, temperature=5.0,
                                          generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2, 3, 4)]
    assert torch.equal(draws[0], draws[1])  # seeded
    assert any(not torch.equal(draws[0], d) for d in draws[2:])  # and random
    with pytest.raises(ValueError, match="temperature"):
        model.predict_latent_actions(images(), INSTRUCTIONS, do_sample=True, temperature=0.0)


def test_vision_encoder_frozen_by_default_and_optionally_trained(tmp_path):
    model, processor = build("llava")
    assert not any(p.requires_grad for p in model.vision_encoder.parameters())
    assert all(p.requires_grad for p in model.backbone.model.language_model.parameters())
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert not any(p.requires_grad for p in loaded.vision_encoder.parameters())
    unfrozen, _ = build("idefics3", freeze=False)
    assert all(p.requires_grad for p in unfrozen.vision_encoder.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_every_trainable_parameter_gets_a_gradient(family):
    """DistributedDataParallel refuses trainable parameters outside the forward pass: with the vision encoder trained,
    one backward must reach every parameter that requires a gradient (LLaVA never applies CLIP's post_layernorm)."""
    model, processor = build(family, freeze=False)
    model.train()
    batch = processor(images=images(), text=INSTRUCTIONS, actions=np.zeros((2, ACTION_DIM), np.float32), dataset="toy")
    model(**batch).loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert frozen == (["backbone.model.vision_tower.post_layernorm.weight", "backbone.model.vision_tower.post_layernorm.bias"]
                      if family == "llava" else [])


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip_with_automodel_and_autoprocessor(family, tmp_path):
    model, processor = build(family)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, LAPAForActionPrediction) and isinstance(loaded.processor, LAPAProcessor)
    assert isinstance(AutoProcessor.from_pretrained(tmp_path), LAPAProcessor)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    _, before = model.predict_action(images(), INSTRUCTIONS, return_logits=True)
    actions, after = loaded.predict_action(images(), INSTRUCTIONS, return_logits=True)  # its own processor
    torch.testing.assert_close(before, after)
    assert actions.shape == (2, ACTION_DIM)


def test_wrong_checkpoint_fails_to_load_naming_the_keys(tmp_path):
    model, processor = build("llava")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["backbone_config"]["text_config"]["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(StrictLoadingError, match="missing keys.*layers.2"):
        LAPAForActionPrediction.from_pretrained(tmp_path)


def test_remote_code_load_where_the_project_is_not_importable(tmp_path):
    model, processor = build("idefics3")
    folder = tmp_path / "vla"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    np.save(tmp_path / "images.npy", images())
    expected = model.predict_latent_actions(images(), INSTRUCTIONS, return_logits=True)[1]
    script = textwrap.dedent(
        f"""
        import json, sys  # BLOCKED and the import blocker come from run_without_the_project
        import numpy as np
        from transformers import AutoModel

        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert type(model.processor).__module__.startswith("transformers_modules"), type(model.processor).__module__
        codes, logits = model.predict_latent_actions(np.load("images.npy"), {INSTRUCTIONS!r}, return_logits=True)
        print(json.dumps(logits.tolist()))
        """
    )
    result = run_without_the_project(script, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    got = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_lora_train_save_reload_and_merge_keep_predictions(tmp_path):
    from training.merge_lora import load_lora_model, merge_lora
    from training.vla_training import VLATrainingConfig, apply_lora

    model, processor = build("llava")
    base = tmp_path / "base"
    model.save_pretrained(base)
    processor.save_pretrained(base)
    peft_model = apply_lora(model, VLATrainingConfig(dataset=["x"], lora_rank=4, lora_alpha=8))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("trainable_tokens" in n and "lm_head" in n for n in trainable)
    assert any("trainable_tokens" in n and "embed_tokens" in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    batch = processor(images=images(), text=INSTRUCTIONS, latent_codes=np.array([[1, 2, 3, 4], [5, 6, 7, 0]]))
    peft_model.train()
    first = None
    for _ in range(10):
        loss = peft_model(**batch).loss
        first = first if first is not None else loss.item()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < first
    peft_model.eval()
    lapa = peft_model.get_base_model()
    codes, before = lapa.predict_latent_actions(images(), INSTRUCTIONS, return_logits=True)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    processor.save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    reloaded, _ = load_lora_model(adapter)
    reloaded.eval()
    _, after = reloaded.get_base_model().predict_latent_actions(images(), INSTRUCTIONS, return_logits=True)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    merged_dir = tmp_path / "merged"
    merge_lora(adapter, merged_dir)
    merged = AutoModel.from_pretrained(merged_dir)  # a plain checkpoint: no peft keys
    assert not any("lora" in k or "trainable_tokens" in k for k in merged.state_dict())
    merged_codes, merged_logits = merged.predict_latent_actions(images(), INSTRUCTIONS, return_logits=True)
    torch.testing.assert_close(merged_logits, before, rtol=1e-4, atol=1e-4)
    assert torch.equal(merged_codes, codes)


def test_bad_inputs_give_clear_errors():
    model, processor = build("llava")
    with pytest.raises(KeyError, match="unknown dataset 'kitchen'"):
        model.predict_action(images(), INSTRUCTIONS, dataset="kitchen")
    with pytest.raises(ValueError, match="has 4 dimensions, got last axis 3"):
        processor(images=images(), text=INSTRUCTIONS, actions=np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(TypeError, match="string"):
        model.predict_latent_actions("frame.png", "open the drawer")
    with pytest.raises(ValueError, match=r"pixel_values must be \(B, 3, S, S\)"):
        model(input_ids=torch.ones(1, 20, dtype=torch.long), pixel_values=torch.zeros(1, 32, 32))
    with pytest.raises(ValueError, match="batch size mismatch"):
        model.predict_latent_actions(images(3), INSTRUCTIONS)
    bare = LAPAForActionPrediction(model.config)
    with pytest.raises(ValueError, match="no processor"):
        bare.predict_latent_actions(images(), INSTRUCTIONS)
    with pytest.raises(ValueError, match="labels hold no target"):
        batch = processor(images=images(), text=INSTRUCTIONS)
        model(**batch, labels=torch.full_like(batch["input_ids"], -100))


def test_config_checks_the_token_layout():
    _, processor = build("llava")
    backbone_config = tiny_backbone_config("llava", image_size=32, patch_size=8)
    config = LAPAConfig.from_processor(backbone_config, processor)
    assert config.text_vocab_size == processor.vocab_size
    with pytest.raises(ValueError, match="num_image_tokens=9 but the llava backbone turns one image into 16"):
        LAPAConfig(backbone_config=config.backbone_config, latent_token_offset=config.latent_token_offset,
                   action_token_offset=config.action_token_offset, image_token_id=config.image_token_id,
                   num_image_tokens=9, num_action_bins=16)
    small = tiny_backbone_config("llava", image_size=32, patch_size=8, vocab_size=100)
    small.image_token_id = config.image_token_id
    with pytest.raises(ValueError, match="does not hold the new tokens"):
        LAPAConfig(backbone_config=small, latent_token_offset=config.latent_token_offset,
                   action_token_offset=config.action_token_offset, image_token_id=config.image_token_id,
                   num_image_tokens=16, num_action_bins=16)
    with pytest.raises(ValueError, match="unsupported backbone family"):
        LAPAConfig(backbone_config={"model_type": "bert"}, latent_token_offset=1, action_token_offset=9,
                   image_token_id=0, num_image_tokens=1)


# -- action chunking: k future actions per call ----------------------------------------------------------------------
CHUNK = 3


def build_chunked(family: str = "llava", seed: int = 0, chunk: int = CHUNK):
    """The tiny model and processor of `build`, predicting `chunk` actions per call."""
    torch.manual_seed(seed)
    backbone_config = tiny_backbone_config(family, image_size=32, patch_size=8, hidden_size=64, num_layers=2)
    processor = LAPAProcessor.from_components(
        build_tiny_tokenizer(), LAPAImageProcessor(size=32), num_latent_codes=8, latent_sequence_length=4,
        num_action_bins=16, num_image_tokens=count_image_tokens(backbone_config), action_chunk_size=chunk,
    )
    rng = np.random.default_rng(seed)
    actions = np.concatenate([rng.normal(size=(400, ACTION_DIM - 1)), rng.choice([-1.0, 1.0], size=(400, 1))], axis=1)
    processor.fit_action_tokenizer(actions.astype(np.float32), dataset="toy", gripper_dims=[ACTION_DIM - 1])
    config = LAPAConfig.from_processor(backbone_config, processor)
    assert config.action_chunk_size == chunk
    model = LAPAForActionPrediction(config).eval()
    model.processor = processor
    return model, processor


@pytest.fixture(scope="module", params=FAMILIES)
def chunked_model(request):
    return build_chunked(request.param)


def chunk_targets(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    chunk = rng.normal(size=(2, CHUNK, ACTION_DIM)).astype(np.float32)
    chunk[..., -1] = rng.choice([-1.0, 1.0], size=(2, CHUNK))
    return chunk


def test_chunked_loss_is_an_action_block_softmax_at_every_chunk_position(chunked_model):
    model, processor = chunked_model
    chunk = chunk_targets()
    batch = processor(images=images(), text=INSTRUCTIONS, actions=chunk)
    tokens = CHUNK * ACTION_DIM
    assert (batch["labels"] != -100).sum(dim=1).tolist() == [tokens, tokens]
    out = model(**batch)
    assert out.num_target_tokens.item() == 2 * tokens
    bins = torch.as_tensor(processor.action_tokenizer.encode(chunk)).reshape(2, tokens)  # time-major
    ao = model.config.action_token_offset
    full = model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          pixel_values=model._images_for_backbone(batch["pixel_values"]),
                          position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)).logits
    expected = F.cross_entropy(full[:, -tokens - 1:-1, ao:ao + 16].reshape(-1, 16), bins.reshape(-1))
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-5)
    # Logits outside the action block (text, latent rows) change nothing at any of the k x D positions.
    with torch.no_grad():
        model.get_output_embeddings().weight[:ao].mul_(3.0)
    try:
        torch.testing.assert_close(model(**batch).loss, expected, rtol=1e-5, atol=1e-5)
    finally:
        with torch.no_grad():
            model.get_output_embeddings().weight[:ao].div_(3.0)


def test_chunked_cached_decoding_equals_the_full_forward_and_emits_exactly_k_times_d_tokens(chunked_model):
    model, processor = chunked_model
    actions, logits = model.predict_action(images(), INSTRUCTIONS, return_logits=True)
    assert actions.shape == (2, CHUNK, ACTION_DIM) and actions.dtype == np.float32
    assert logits.shape == (2, CHUNK, ACTION_DIM, 16)
    chunk, chunk_logits = model.predict_action_chunk(images(), INSTRUCTIONS, return_logits=True)
    np.testing.assert_array_equal(chunk, actions)
    torch.testing.assert_close(chunk_logits, logits, rtol=0, atol=0)
    # Teacher-force the greedy bins through one uncached forward pass: the same logits at all k x D steps.
    bins = logits.argmax(-1)  # (2, k, D)
    ao = model.config.action_token_offset
    ids = (bins + ao).reshape(2, -1)
    np.testing.assert_array_equal(processor.decode_actions(ids), actions)
    batch = processor(images=images(), text=INSTRUCTIONS)
    out = model(input_ids=torch.cat([batch["input_ids"], ids], 1), pixel_values=batch["pixel_values"],
                attention_mask=torch.cat([batch["attention_mask"], torch.ones_like(ids)], 1))
    uncached = out.logits[:, -CHUNK * ACTION_DIM - 1:-1, ao:ao + 16]
    torch.testing.assert_close(uncached, logits.reshape(2, -1, 16), rtol=1e-4, atol=1e-4)


def test_chunked_batched_prediction_equals_one_at_a_time(chunked_model):
    model, _ = chunked_model
    pictures = images()
    batched, batched_logits = model.predict_action(pictures, INSTRUCTIONS, return_logits=True)
    for i in range(2):
        single, single_logits = model.predict_action(pictures[i:i + 1], INSTRUCTIONS[i:i + 1], return_logits=True)
        torch.testing.assert_close(batched_logits[i:i + 1], single_logits, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(batched[i:i + 1], single)


def test_single_step_model_keeps_its_shapes_and_predict_action_chunk_adds_the_axis():
    model, _ = build("llava")
    assert model.config.action_chunk_size == 1
    actions, logits = model.predict_action(images(), INSTRUCTIONS, return_logits=True)
    chunk, chunk_logits = model.predict_action_chunk(images(), INSTRUCTIONS, return_logits=True)
    assert actions.shape == (2, ACTION_DIM) and chunk.shape == (2, 1, ACTION_DIM)
    np.testing.assert_array_equal(chunk[:, 0], actions)
    assert torch.equal(chunk_logits[:, 0], logits)


def test_chunk_size_is_saved_and_a_config_without_it_loads_as_one(tmp_path):
    model, processor = build_chunked("llava")
    model.save_pretrained(tmp_path / "chunked")
    processor.save_pretrained(tmp_path / "chunked")
    assert json.loads((tmp_path / "chunked" / "config.json").read_text())["action_chunk_size"] == CHUNK
    loaded = AutoModel.from_pretrained(tmp_path / "chunked").eval()
    assert loaded.config.action_chunk_size == CHUNK and loaded.processor.action_chunk_size == CHUNK
    np.testing.assert_array_equal(loaded.predict_action(images(), INSTRUCTIONS),
                                  model.predict_action(images(), INSTRUCTIONS))
    saved = json.loads((tmp_path / "chunked" / "config.json").read_text())
    del saved["action_chunk_size"]
    assert LAPAConfig.from_dict(saved).action_chunk_size == 1


def test_chunk_size_mismatch_and_bad_values_give_clear_errors(tmp_path):
    model, _ = build_chunked("llava")
    _, single_step_processor = build("llava")
    with pytest.raises(ValueError, match=r"processor's action_chunk_size \(1\) differs from the model's"):
        model.predict_action(images(), INSTRUCTIONS, processor=single_step_processor)
    model.save_pretrained(tmp_path)
    single_step_processor.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="action_chunk_size"):
        AutoModel.from_pretrained(tmp_path)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="action_chunk_size must be"):
            LAPAConfig(action_chunk_size=bad)
    with pytest.raises(ValueError, match="action_chunk_size must be an int >= 1"):
        LAPAProcessor.from_components(build_tiny_tokenizer(), LAPAImageProcessor(size=32), num_image_tokens=16,
                                      num_action_bins=16, action_chunk_size=0)


def test_a_chunking_lora_adapter_on_a_single_step_base_merges_with_the_adapters_k(tmp_path):
    # finetune.py --lora --init-from <single-step or latent model> --action-chunk-size 3: the base folder's config
    # says k = 1, the adapter's processor says 3; the merged checkpoint predicts 3 actions.
    from training.merge_lora import merge_lora
    from training.vla_training import VLATrainingConfig, apply_lora

    model, processor = build("llava")
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    model.config.action_chunk_size = processor.action_chunk_size = CHUNK  # what build_processor_and_model does
    peft_model = apply_lora(model, VLATrainingConfig(dataset=["x"], lora_rank=4, lora_alpha=8))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    processor.save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "base")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    merge_lora(adapter, tmp_path / "merged")
    merged = AutoModel.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.action_chunk_size == CHUNK
    assert merged.predict_action(images(), INSTRUCTIONS).shape == (2, CHUNK, ACTION_DIM)


@pytest.mark.parametrize("family", ["llava", "idefics3"])
def test_tiny_vision_encoder_width_and_depth(family):
    default = tiny_backbone_config(family, image_size=32, patch_size=8).vision_config
    assert (default.hidden_size, default.intermediate_size, default.num_hidden_layers,
            default.num_attention_heads) == (32, 64, 2, 2)  # what every tiny model before these settings had
    wide = tiny_backbone_config(family, image_size=32, patch_size=8, vision_hidden_size=128,
                                vision_num_layers=3).vision_config
    assert (wide.hidden_size, wide.intermediate_size, wide.num_hidden_layers, wide.num_attention_heads) == (
        128, 256, 3, 4)
    for width, heads in ((64, 2), (96, 3)):
        assert tiny_backbone_config(family, vision_hidden_size=width).vision_config.num_attention_heads == heads
    with pytest.raises(ValueError, match="vision_hidden_size must be a positive multiple of 32"):
        tiny_backbone_config(family, vision_hidden_size=48)
