"""LAPA processing: action bins, image processing, the tiny tokenizer and the processor's token layout, saving and
remote-code loading. Everything is built in code at tiny sizes."""

import json
import os
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

from support import run_without_the_project
from processing_lapa import (
    ActionTokenizer,
    LAPAImageProcessor,
    LAPAProcessor,
    build_tiny_tokenizer,
)

NUM_IMAGE_TOKENS = 16


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------
def mixed_actions(num_steps=20_000, seed=0):
    """(T, 6) actions: normal, uniform, heavy ties at 0 with an exponential tail, constant, three values, gripper."""
    rng = np.random.default_rng(seed)
    return np.stack(
        [
            rng.normal(0.0, 2.0, num_steps),
            rng.uniform(-1.0, 1.0, num_steps),
            np.where(rng.random(num_steps) < 0.6, 0.0, rng.exponential(1.0, num_steps)),
            np.full(num_steps, 3.0),
            rng.integers(-1, 2, num_steps).astype(np.float64),
            np.where(rng.random(num_steps) < 0.5, -1.0, 1.0),
        ],
        axis=1,
    )


def robot_actions(num_steps=2_000, seed=1):
    """(T, 7) delta end-effector actions with a binary gripper in the last dimension."""
    rng = np.random.default_rng(seed)
    actions = rng.normal(0.0, 0.05, (num_steps, 7))
    actions[:, 6] = np.where(rng.random(num_steps) < 0.5, 0.0, 1.0)
    return actions


@pytest.fixture
def processor():
    processor = LAPAProcessor.from_components(
        build_tiny_tokenizer(), LAPAImageProcessor(size=32), num_image_tokens=NUM_IMAGE_TOKENS
    )
    processor.fit_action_tokenizer(robot_actions(), "bridge", gripper_dims=[6], gripper_threshold=0.5)
    return processor


def frames(batch=2, height=40, width=48, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (batch, height, width, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------------------
# Action tokenizer
# ---------------------------------------------------------------------------------------------------------------------
def test_action_round_trip_is_within_half_a_bin_and_exact_on_ties():
    actions = mixed_actions()
    tokenizer = ActionTokenizer(num_bins=256).fit(actions, "mixed", gripper_dims=[5])
    bins = tokenizer.encode(actions)
    assert bins.dtype == np.int64 and bins.shape == actions.shape
    assert bins.min() >= 0 and bins.max() < 256
    decoded = tokenizer.decode(bins)
    assert decoded.dtype == np.float32 and decoded.shape == actions.shape

    edges = tokenizer.bin_edges()
    assert np.all(np.diff(edges[:5], axis=1) >= 0), "edges must stay monotone, also with repeated values"
    widths = tokenizer.bin_widths()
    for dim in range(5):
        width_of_bin = widths[dim][bins[:, dim]]
        error = np.abs(decoded[:, dim].astype(np.float64) - actions[:, dim])
        # float32 output: allow its rounding on top of the half-bin bound.
        assert np.all(error <= width_of_bin / 2 + 1e-6 * (1 + np.abs(actions[:, dim]))), f"dimension {dim}"
        # The decoded value lies inside the very bin the value was put in.
        lower, upper = edges[dim][bins[:, dim]], edges[dim][bins[:, dim] + 1]
        assert np.all(lower <= actions[:, dim]) and np.all(actions[:, dim] <= upper)

    # Values repeated in much more than 1/N of the data come back exactly: the tie at 0, the constant and three values.
    zeros = actions[:, 2] == 0.0
    assert np.all(decoded[zeros, 2] == 0.0)
    assert np.all(decoded[:, 3] == 3.0)
    np.testing.assert_array_equal(decoded[:, 4], actions[:, 4])
    # Gripper: two end bins, decoded to the dataset's low/high.
    assert set(np.unique(bins[:, 5])) == {0, 255}
    np.testing.assert_array_equal(decoded[:, 5], actions[:, 5])


def test_action_bins_are_equal_frequency_on_continuous_data():
    actions = mixed_actions(num_steps=256 * 40)
    tokenizer = ActionTokenizer(num_bins=256).fit(actions[:, :2], "continuous")
    bins = tokenizer.encode(actions[:, :2])
    for dim in range(2):
        counts = np.bincount(bins[:, dim], minlength=256)
        assert counts.min() >= 39 and counts.max() <= 41, (counts.min(), counts.max())


def test_action_values_outside_the_fitted_range_clip_to_the_end_bins():
    actions = mixed_actions(num_steps=5_000)
    tokenizer = ActionTokenizer(num_bins=16).fit(actions[:, :2], "d")
    edges = tokenizer.bin_edges()
    low, high = edges[:, 0] - 10.0, edges[:, -1] + 10.0
    bins = tokenizer.encode(np.stack([low, high]))
    np.testing.assert_array_equal(bins, [[0, 0], [15, 15]])
    decoded = tokenizer.decode(bins)
    np.testing.assert_allclose(decoded[0], (edges[:, 0] + edges[:, 1]) / 2, rtol=1e-6)
    np.testing.assert_allclose(decoded[1], (edges[:, -2] + edges[:, -1]) / 2, rtol=1e-6)


def test_action_gripper_threshold_and_decoded_values():
    rng = np.random.default_rng(3)
    actions = np.stack([rng.normal(size=1000), rng.choice([-0.8, 0.9], size=1000)], axis=1)
    tokenizer = ActionTokenizer(num_bins=32).fit(actions, "g", gripper_dims=[1], gripper_threshold=0.1)
    bins = tokenizer.encode(np.array([[0.0, 0.1], [0.0, 0.11], [0.0, -5.0], [0.0, 5.0]]))
    np.testing.assert_array_equal(bins[:, 1], [0, 31, 0, 31])
    # Any bin of the lower half decodes to "closed" (the data's min), of the upper half to "open" (its max).
    decoded = tokenizer.decode(np.array([[3, 0], [3, 15], [3, 16], [3, 31]]))
    np.testing.assert_array_equal(decoded[:, 1], np.float32([-0.8, -0.8, 0.9, 0.9]))
    assert np.isnan(tokenizer.bin_widths()[1]).all()


def test_action_dataset_selection_errors():
    tokenizer = ActionTokenizer(num_bins=8)
    with pytest.raises(ValueError, match="fit the action tokenizer first"):
        tokenizer.encode(np.zeros((1, 2)))
    tokenizer.fit(np.random.default_rng(0).normal(size=(100, 2)), "bridge")
    assert tokenizer.action_dim() == 2
    tokenizer.fit(np.random.default_rng(1).normal(size=(100, 3)), "fractal")
    assert tokenizer.datasets == ["bridge", "fractal"]
    assert tokenizer.action_dim("fractal") == 3
    with pytest.raises(ValueError, match="'bridge'.*'fractal'"):
        tokenizer.encode(np.zeros((1, 2)))
    with pytest.raises(KeyError, match="unknown dataset 'kitchen'.*'bridge', 'fractal'"):
        tokenizer.decode(np.zeros((1, 2), dtype=np.int64), dataset="kitchen")
    # Refitting a name overwrites it.
    tokenizer.fit(np.random.default_rng(2).normal(size=(100, 4)), "bridge")
    assert tokenizer.action_dim("bridge") == 4 and tokenizer.datasets == ["bridge", "fractal"]


def test_action_input_errors_name_the_problem():
    tokenizer = ActionTokenizer(num_bins=8).fit(np.random.default_rng(0).normal(size=(100, 7)), "bridge")
    with pytest.raises(ValueError, match=r"'bridge' has 7 dimensions, got last axis 6"):
        tokenizer.encode(np.zeros((4, 6)))
    with pytest.raises(ValueError, match=r"7 dimensions, got last axis 8"):
        tokenizer.decode(np.zeros((4, 8), dtype=np.int64))
    with pytest.raises(ValueError, match=r"\[0, 8\).*from -1 to 8"):
        tokenizer.decode(np.array([[-1, 0, 0, 0, 0, 0, 8]]))
    with pytest.raises(ValueError, match="must be integers"):
        tokenizer.decode(np.zeros((1, 7), dtype=np.float32))
    bad = np.random.default_rng(0).normal(size=(10, 3))
    bad[4, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite.*row 4, dimension 1"):
        ActionTokenizer().fit(bad, "x")
    with pytest.raises(ValueError, match=r"shape \(T, D\)"):
        ActionTokenizer().fit(np.zeros(10), "x")
    with pytest.raises(ValueError, match="gripper dimension 3 is out of range"):
        ActionTokenizer().fit(np.zeros((10, 3)), "x", gripper_dims=[3])
    with pytest.raises(ValueError, match="num_bins"):
        ActionTokenizer(num_bins=1)


def test_action_tokenizer_json_round_trip_is_exact(tmp_path):
    actions = mixed_actions(num_steps=3_000)
    tokenizer = ActionTokenizer(num_bins=64).fit(actions, "mixed", gripper_dims=[5])
    tokenizer.fit(robot_actions(), "bridge", gripper_dims=[6], gripper_threshold=0.5)

    as_json = json.dumps(tokenizer.to_dict())  # JSON-safe
    restored = ActionTokenizer.from_dict(json.loads(as_json))
    assert restored.to_dict() == tokenizer.to_dict()
    np.testing.assert_array_equal(restored.bin_edges("mixed"), tokenizer.bin_edges("mixed"))

    path = tokenizer.save(tmp_path)
    assert os.path.basename(path) == "action_tokenizer.json"
    loaded = ActionTokenizer.load(tmp_path)
    assert loaded == tokenizer
    bins = tokenizer.encode(actions, "mixed")
    np.testing.assert_array_equal(loaded.encode(actions, "mixed"), bins)
    np.testing.assert_array_equal(loaded.decode(bins, "mixed"), tokenizer.decode(bins, "mixed"))

    # Normalisation statistics for cards and other policies.
    stats = loaded.statistics("bridge")
    for key in ("mean", "std", "min", "max", "q01", "q99"):
        assert len(stats[key]) == 7, key
    np.testing.assert_allclose(stats["mean"], robot_actions().mean(axis=0))
    np.testing.assert_allclose(stats["q99"], np.quantile(robot_actions(), 0.99, axis=0))
    assert stats["gripper_low"] == [0.0] and stats["gripper_high"] == [1.0]


# ---------------------------------------------------------------------------------------------------------------------
# Image processor
# ---------------------------------------------------------------------------------------------------------------------
def test_every_input_kind_gives_the_same_pixel_values():
    image_processor = LAPAImageProcessor(size=32)
    picture = frames(batch=1, height=40, width=56)[0]  # non-square: resized whole to 32 x 32
    reference = image_processor(Image.fromarray(picture))["pixel_values"]
    assert reference.shape == (1, 3, 32, 32) and reference.dtype == torch.float32

    as_float = picture.astype(np.float32) / 255.0
    as_tensor = torch.from_numpy(picture).permute(2, 0, 1)
    kinds = {
        "numpy uint8 (H,W,3)": picture,
        "numpy uint8 (B,H,W,3)": picture[None],
        "numpy float (H,W,3)": as_float,
        "numpy float64 (B,H,W,3)": as_float[None].astype(np.float64),
        "torch uint8 (3,H,W)": as_tensor,
        "torch float (B,3,H,W)": as_tensor[None].float() / 255.0,
        "list of PIL": [Image.fromarray(picture)],
        "list of numpy": [picture],
        "PIL RGBA": Image.fromarray(picture).convert("RGBA"),
    }
    for name, images in kinds.items():
        pixels = image_processor(images)["pixel_values"]
        assert pixels.shape == (1, 3, 32, 32), name
        torch.testing.assert_close(pixels, reference, atol=1e-5, rtol=0, msg=name)

    batch = image_processor([Image.fromarray(picture), frames(batch=1, height=20, width=20, seed=5)[0]])
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    torch.testing.assert_close(batch["pixel_values"][:1], reference)
    assert isinstance(image_processor(picture, return_tensors="np")["pixel_values"], np.ndarray)


def test_pixel_values_are_normalised_with_the_configured_statistics():
    image_processor = LAPAImageProcessor(size=8, image_mean=[0.5, 0.25, 0.0], image_std=[0.5, 0.25, 2.0])
    colour = np.zeros((10, 14, 3), dtype=np.uint8)
    colour[...] = (255, 0, 102)
    pixels = image_processor(colour)["pixel_values"][0]
    expected = torch.tensor([(1.0 - 0.5) / 0.5, (0.0 - 0.25) / 0.25, (0.4 - 0.0) / 2.0])
    torch.testing.assert_close(pixels, expected[:, None, None].expand(3, 8, 8), atol=1e-6, rtol=0)


def test_center_crop_removes_the_border_and_keeps_the_shape():
    image_processor = LAPAImageProcessor(size=32)  # default crop keeps 90% of the area: ~2.6% of each side
    picture = np.zeros((100, 100, 3), dtype=np.uint8)
    picture[:2] = picture[-2:] = picture[:, :2] = picture[:, -2:] = 255  # a 2 px white frame
    plain = image_processor(picture)["pixel_values"]
    cropped = image_processor(picture, center_crop=True)["pixel_values"]
    assert cropped.shape == plain.shape == (1, 3, 32, 32)
    black = image_processor(np.zeros_like(picture))["pixel_values"]
    assert not torch.allclose(plain, black, atol=1e-3), "the frame shows without the crop"
    torch.testing.assert_close(cropped, black, atol=1e-6, rtol=0)

    gentler = LAPAImageProcessor(size=32, center_crop_fraction=1.0)
    torch.testing.assert_close(gentler(picture, center_crop=True)["pixel_values"], plain)


@pytest.mark.parametrize(
    "images, error, message",
    [
        (np.zeros((16, 16, 4), dtype=np.uint8), ValueError, r"3 channels.*4 channels"),
        (np.zeros((3, 16, 16), dtype=np.uint8), ValueError, r"3 channels.*channels-last"),
        (torch.zeros(16, 16, 3, dtype=torch.uint8), ValueError, r"3 channels.*channels-first"),
        (np.zeros((16, 16), dtype=np.uint8), ValueError, r"3 dims.*got 2 dims"),
        (torch.zeros(1, 1, 3, 8, 8), ValueError, r"4 dims.*got 5 dims"),
        (np.full((8, 8, 3), 1.5, dtype=np.float32), ValueError, r"\[0, 1\].*1\.5"),
        (torch.full((3, 8, 8), -0.5), ValueError, r"\[0, 1\].*-0\.5"),
        (np.full((8, 8, 3), np.nan, dtype=np.float32), ValueError, "NaN"),
        (np.zeros((8, 8, 3), dtype=np.int32), TypeError, "dtype int32"),
        ("robot.png", TypeError, "string; load the image first"),
        (None, TypeError, "None"),
        (42, TypeError, "unsupported image type int"),
        ([], ValueError, "empty list"),
        ([np.zeros((2, 8, 8, 3), dtype=np.uint8)], ValueError, "a list must hold single images"),
        ([Image.new("RGB", (8, 8)), "x"], TypeError, r"images\[1\]: got a string"),
    ],
)
def test_bad_images_raise_errors_naming_the_problem(images, error, message):
    with pytest.raises(error, match=message):
        LAPAImageProcessor(size=8)(images)


def test_image_processor_settings_are_checked():
    with pytest.raises(ValueError, match="size"):
        LAPAImageProcessor(size=0)
    with pytest.raises(ValueError, match="center_crop_fraction"):
        LAPAImageProcessor(center_crop_fraction=1.5)
    with pytest.raises(ValueError, match="image_std must be positive"):
        LAPAImageProcessor(image_std=[1.0, 0.0, 1.0])


def test_image_processor_saves_and_loads_with_auto_image_processor(tmp_path):
    image_processor = LAPAImageProcessor(size=48, image_mean=[0.5] * 3, image_std=[0.25] * 3, center_crop_fraction=0.8)
    image_processor.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is LAPAImageProcessor
    settings = (loaded.size, loaded.image_mean, loaded.image_std, loaded.center_crop_fraction)
    assert settings == (48, [0.5] * 3, [0.25] * 3, 0.8)
    picture = frames(batch=1)
    torch.testing.assert_close(
        loaded(picture, center_crop=True)["pixel_values"], image_processor(picture, center_crop=True)["pixel_values"]
    )


# ---------------------------------------------------------------------------------------------------------------------
# Tiny tokenizer
# ---------------------------------------------------------------------------------------------------------------------
def test_tiny_tokenizer_is_byte_level_deterministic_and_saveable(tmp_path):
    tokenizer = build_tiny_tokenizer()
    assert len(tokenizer) == 261
    special_ids = (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert special_ids == (0, 1, 2, 3)
    assert tokenizer.convert_tokens_to_ids("<image>") == 4
    text = "Pick up the cup, then Ä \n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == [5 + byte for byte in text.encode("utf-8")]
    assert tokenizer.decode(ids) == text
    assert tokenizer("a<image>b", add_special_tokens=False)["input_ids"] == [5 + ord("a"), 4, 5 + ord("b")]
    assert build_tiny_tokenizer().get_vocab() == tokenizer.get_vocab()

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<s>", "</s>", "<pad>")


# ---------------------------------------------------------------------------------------------------------------------
# Processor
# ---------------------------------------------------------------------------------------------------------------------
def test_latent_and_action_tokens_are_contiguous_after_the_base_vocabulary():
    tokenizer = build_tiny_tokenizer()
    base_vocab = dict(tokenizer.get_vocab())
    sample = "move the arm <image> left"
    before = tokenizer(sample, add_special_tokens=False)["input_ids"]
    processor = LAPAProcessor.from_components(tokenizer, LAPAImageProcessor(size=32), num_image_tokens=NUM_IMAGE_TOKENS)

    assert processor.latent_token_offset == len(base_vocab) == 261
    assert processor.action_token_offset == 261 + 8
    assert processor.vocab_size == len(tokenizer) == 261 + 8 + 256
    assert processor.image_token_id == 4
    vocab = tokenizer.get_vocab()
    assert all(vocab[token] == i for token, i in base_vocab.items()), "existing ids must keep their meaning"
    assert [vocab[f"<latent_{k}>"] for k in range(8)] == list(range(261, 269))
    assert [vocab[f"<action_{k}>"] for k in range(256)] == list(range(269, 525))
    # Never split, and existing text encodes as before.
    assert tokenizer("<latent_7><action_0><action_255>", add_special_tokens=False)["input_ids"] == [268, 269, 524]
    assert tokenizer(sample, add_special_tokens=False)["input_ids"] == before
    # Building again on the same tokenizer adds nothing.
    again = LAPAProcessor.from_components(tokenizer, LAPAImageProcessor(size=32), num_image_tokens=NUM_IMAGE_TOKENS)
    assert again.vocab_size == 525 and again.latent_token_offset == 261


def test_processor_rejects_tokenizers_without_a_proper_token_layout():
    with pytest.raises(ValueError, match="from_components"):
        LAPAProcessor(LAPAImageProcessor(size=32), build_tiny_tokenizer())
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens(["<latent_0>", "<something_else>"], special_tokens=True)
    with pytest.raises(ValueError, match="latent tokens .* do not have contiguous ids"):
        LAPAProcessor.from_components(tokenizer, LAPAImageProcessor(size=32))


def test_sequence_layout_and_labels_only_at_latent_targets(processor):
    codes = np.array([[1, 2, 3, 4], [0, 7, 7, 0]])
    instructions = ["pick up the cup", "open the drawer"]
    batch = processor(images=frames(), text=instructions, latent_codes=codes)
    input_ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert input_ids.dtype == labels.dtype == torch.int64 and input_ids.shape == labels.shape == mask.shape
    assert batch["pixel_values"].shape == (2, 3, 32, 32)

    for i, instruction in enumerate(instructions):
        prompt = processor.tokenizer(
            f"What action should the robot take to {instruction}?", add_special_tokens=False
        )["input_ids"]
        expected = [1] + [4] * NUM_IMAGE_TOKENS + prompt + (codes[i] + processor.latent_token_offset).tolist()
        row = input_ids[i][mask[i].bool()].tolist()
        assert row == expected
        target = labels[i] != -100
        assert target.sum() == 4 and target[-4:].all(), "labels only at the s latent positions, at the end"
        assert torch.equal(labels[i][target], input_ids[i][-4:])
    # No EOS anywhere after the targets.
    assert (input_ids != processor.tokenizer.eos_token_id).all()


def test_left_padding_for_instructions_of_different_lengths(processor):
    instructions = ["go", "put the red block into the second drawer from the top"]
    prompt_only = processor(images=frames(), text=instructions)
    assert set(prompt_only.keys()) == {"input_ids", "attention_mask", "pixel_values"}
    with_targets = processor(images=frames(), text=instructions, latent_codes=np.zeros((2, 4), dtype=np.int64))

    for batch, tail in ((prompt_only, 0), (with_targets, 4)):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        lengths = [1 + NUM_IMAGE_TOKENS + len(processor.tokenizer(
            processor.prompt_template.format(instruction=text), add_special_tokens=False)["input_ids"]) + tail
            for text in instructions]
        assert ids.shape[1] == max(lengths)
        pad = ids.shape[1] - lengths[0]
        assert pad > 0
        assert mask[0, :pad].eq(0).all() and mask[0, pad:].eq(1).all(), "zeros on the left only"
        assert ids[0, :pad].eq(processor.tokenizer.pad_token_id).all()
        assert ids[0, pad] == processor.tokenizer.bos_token_id
        assert mask[1].eq(1).all()
    # A generation prompt ends right after the prompt text, in every row; padding is never a target.
    assert (prompt_only["input_ids"][:, -1] == processor.tokenizer.convert_tokens_to_ids("?")).all()
    assert with_targets["labels"][0, :pad].eq(-100).all()


def test_latent_targets_decode_back_to_the_codes(processor):
    codes = np.random.default_rng(0).integers(0, 8, (3, 4))
    batch = processor(images=frames(batch=3), text=["a", "bb", "ccc"], latent_codes=torch.from_numpy(codes))
    decoded = processor.decode_latent_actions(batch["input_ids"][:, -4:])
    assert isinstance(decoded, torch.Tensor) and decoded.dtype == torch.int64
    np.testing.assert_array_equal(decoded.numpy(), codes)
    np.testing.assert_array_equal(processor.decode_latent_actions(batch["input_ids"][:, -4:].numpy()), codes)
    with pytest.raises(ValueError, match="not latent-action tokens"):
        processor.decode_latent_actions(batch["input_ids"][:, -5:-1])
    with pytest.raises(ValueError, match="expected 4 latent tokens"):
        processor.decode_latent_actions(batch["input_ids"][:, -3:])


def test_action_targets_decode_within_half_a_bin(processor):
    actions = robot_actions(num_steps=64, seed=7)
    batch = processor(images=frames(batch=64), text=["pick"] * 64, actions=actions, dataset="bridge")
    target_ids = batch["input_ids"][:, -7:]
    assert (batch["labels"][:, -7:] == target_ids).all() and (batch["labels"][:, :-7] == -100).all()
    assert ((target_ids >= processor.action_token_offset) & (target_ids < processor.action_token_offset + 256)).all()

    decoded = processor.decode_actions(target_ids)
    assert decoded.dtype == np.float32 and decoded.shape == (64, 7)
    bins = (target_ids - processor.action_token_offset).numpy()
    widths = processor.action_tokenizer.bin_widths("bridge")
    for dim in range(6):
        inside = np.abs(actions[:, dim]) < 0.1  # within the fitted range (std 0.05); clipped values may be farther
        error = np.abs(decoded[inside, dim] - actions[inside, dim])
        assert np.all(error <= widths[dim][bins[inside, dim]] / 2 + 1e-6)
    np.testing.assert_array_equal(decoded[:, 6], actions[:, 6])
    with pytest.raises(ValueError, match="not action tokens"):
        processor.decode_actions(np.full((1, 7), processor.latent_token_offset))


def test_auto_processor_round_trip(processor, tmp_path):
    processor.fit_action_tokenizer(robot_actions(seed=4)[:, :5], "fractal")
    processor.save_pretrained(tmp_path)
    for name in ("processor_config.json", "action_tokenizer.json", "tokenizer.json", "processing_lapa.py",
                 "action_tokenizer.py", "image_processing_lapa.py"):
        assert (tmp_path / name).is_file(), name
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["auto_map"]["AutoProcessor"] == "processing_lapa.LAPAProcessor"
    assert (config["num_latent_codes"], config["latent_sequence_length"], config["num_action_bins"]) == (8, 4, 256)
    assert config["num_image_tokens"] == NUM_IMAGE_TOKENS and config["add_bos"] is True

    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is LAPAProcessor
    assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert (loaded.latent_token_offset, loaded.action_token_offset, loaded.image_token_id, loaded.vocab_size) == (
        processor.latent_token_offset, processor.action_token_offset, processor.image_token_id, processor.vocab_size)
    assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()
    assert loaded.action_tokenizer == processor.action_tokenizer
    assert loaded.action_tokenizer.datasets == ["bridge", "fractal"]
    for name in ("num_latent_codes", "latent_sequence_length", "num_action_bins", "num_image_tokens",
                 "image_token", "prompt_template", "add_bos"):
        assert getattr(loaded, name) == getattr(processor, name), name

    inputs = dict(
        images=frames(), text=["stack the cups", "wipe"], actions=robot_actions(num_steps=2), dataset="bridge"
    )
    expected, got = processor(**inputs), loaded(**inputs)
    for key in ("input_ids", "attention_mask", "labels", "pixel_values"):
        assert torch.equal(got[key], expected[key]), key


def test_remote_code_loads_where_the_project_is_not_importable(processor, tmp_path):
    folder = tmp_path / "processor"
    processor.save_pretrained(folder)
    inputs = dict(images=frames(), text=["pick up the spoon", "close"], actions=robot_actions(num_steps=2))
    expected = processor(**inputs, return_tensors="np")
    np.save(tmp_path / "images.npy", inputs["images"])
    np.save(tmp_path / "actions.npy", inputs["actions"])

    script = textwrap.dedent(
        f"""
        import json, sys  # BLOCKED and the import blocker come from run_without_the_project

        import numpy as np
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
        assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED]
        batch = processor(images=np.load("images.npy"), text={inputs["text"]!r}, actions=np.load("actions.npy"),
                          return_tensors="np")
        print(json.dumps({{key: batch[key].tolist() for key in ("input_ids", "attention_mask", "labels")}}))
        """
    )
    result = run_without_the_project(script, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("input_ids", "attention_mask", "labels"):
        assert got[key] == expected[key].tolist(), key


def test_processor_bad_inputs_raise_clear_errors(processor):
    images, text = frames(), ["pick", "place"]
    with pytest.raises(KeyError, match="unknown dataset 'kitchen'.*'bridge'"):
        processor(images=images, text=text, actions=robot_actions(num_steps=2), dataset="kitchen")
    with pytest.raises(ValueError, match="'bridge' has 7 dimensions, got last axis 5"):
        processor(images=images, text=text, actions=np.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"shape \(batch, D\)"):
        processor(images=images, text=text, actions=np.zeros(7))
    with pytest.raises(TypeError, match="string; load the image first"):
        processor(images="frame.png", text="pick")
    with pytest.raises(ValueError, match="3 channels"):
        processor(images=np.zeros((2, 16, 16, 1), dtype=np.uint8), text=text)
    with pytest.raises(ValueError, match=r"batch size mismatch: 3 image\(s\) for 2 instruction\(s\)"):
        processor(images=frames(batch=3), text=text)
    with pytest.raises(ValueError, match="batch size mismatch: 3 action rows"):
        processor(images=images, text=text, actions=np.zeros((3, 7)))
    with pytest.raises(ValueError, match=r"\[0, 8\).*from 0 to 8"):
        processor(images=images, text=text, latent_codes=[[0, 1, 2, 8], [0, 0, 0, 0]])
    with pytest.raises(ValueError, match=r"from -1 to"):
        processor(images=images, text=text, latent_codes=[[0, 1, 2, -1], [0, 0, 0, 0]])
    with pytest.raises(ValueError, match=r"\(batch, s\) = \(2, 4\).*\(2, 3\)"):
        processor(images=images, text=text, latent_codes=np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="must be integers"):
        processor(images=images, text=text, latent_codes=np.zeros((2, 4)))
    with pytest.raises(ValueError, match="not both"):
        processor(images=images, text=text, latent_codes=np.zeros((2, 4), dtype=np.int64), actions=np.zeros((2, 7)))
    with pytest.raises(ValueError, match="images are required"):
        processor(text=text)
    with pytest.raises(ValueError, match="text is required"):
        processor(images=images)
    with pytest.raises(ValueError, match="contains the image token or a latent/action token"):
        processor(images=images, text=["pick <action_3>", "place"])
    processor.fit_action_tokenizer(robot_actions(seed=9), "fractal")
    with pytest.raises(ValueError, match="several datasets.*'bridge', 'fractal'"):
        processor(images=images, text=text, actions=np.zeros((2, 7)))


# ---------------------------------------------------------------------------------------------------------------------
# Action chunks (k future actions per example)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def chunk_processor():
    processor = LAPAProcessor.from_components(
        build_tiny_tokenizer(), LAPAImageProcessor(size=32), num_image_tokens=NUM_IMAGE_TOKENS, action_chunk_size=3
    )
    processor.fit_action_tokenizer(robot_actions(), "bridge", gripper_dims=[6], gripper_threshold=0.5)
    return processor


def test_action_chunks_are_k_times_d_time_major_tokens_that_decode_within_half_a_bin(chunk_processor):
    processor, k, batch_size = chunk_processor, 3, 32
    chunks = robot_actions(num_steps=batch_size * k, seed=7).reshape(batch_size, k, 7)
    batch = processor(images=frames(batch=batch_size), text=["pick"] * batch_size, actions=chunks, dataset="bridge")
    target_ids = batch["input_ids"][:, -k * 7:]
    assert (batch["labels"][:, -k * 7:] == target_ids).all() and (batch["labels"][:, :-k * 7] == -100).all()
    # Time-major: the 7 tokens of step 0, then those of step 1, ...; each step's tokens are what one action gives.
    single = processor.action_tokenizer.encode(chunks[:, 1], dataset="bridge") + processor.action_token_offset
    np.testing.assert_array_equal(target_ids[:, 7:14].numpy(), single)
    assert processor.num_action_tokens("bridge") == k * 7

    decoded = processor.decode_actions(target_ids)
    assert decoded.dtype == np.float32 and decoded.shape == (batch_size, k, 7)
    assert processor.decode_actions(target_ids[0]).shape == (k, 7)
    bins = (target_ids - processor.action_token_offset).numpy().reshape(batch_size, k, 7)
    widths = processor.action_tokenizer.bin_widths("bridge")
    for dim in range(6):
        inside = np.abs(chunks[..., dim]) < 0.1
        error = np.abs(decoded[..., dim][inside] - chunks[..., dim][inside])
        assert np.all(error <= widths[dim][bins[..., dim][inside]] / 2 + 1e-6)
    np.testing.assert_array_equal(decoded[..., 6], chunks[..., 6])


def test_action_chunk_size_is_saved_and_old_processors_load_as_one(chunk_processor, processor, tmp_path):
    chunk_processor.save_pretrained(tmp_path / "chunked")
    assert json.loads((tmp_path / "chunked" / "processor_config.json").read_text())["action_chunk_size"] == 3
    assert AutoProcessor.from_pretrained(tmp_path / "chunked").action_chunk_size == 3
    processor.save_pretrained(tmp_path / "old")
    config_path = tmp_path / "old" / "processor_config.json"
    config = json.loads(config_path.read_text())
    config.pop("action_chunk_size", None)
    config_path.write_text(json.dumps(config))
    assert AutoProcessor.from_pretrained(tmp_path / "old").action_chunk_size == 1


def test_action_chunk_shape_errors(chunk_processor, processor):
    with pytest.raises(ValueError, match=r"actions must have shape \(batch, 3, D\)"):
        chunk_processor(images=frames(), text=["a", "b"], actions=np.zeros((2, 7), np.float32))
    with pytest.raises(ValueError, match=r"actions must have shape \(batch, 3, D\)"):
        chunk_processor(images=frames(), text=["a", "b"], actions=np.zeros((2, 2, 7), np.float32))
    with pytest.raises(ValueError, match="expected k x D = 21 action tokens"):
        chunk_processor.decode_actions(np.full((2, 7), chunk_processor.action_token_offset))
    # k = 1 takes (B, D) as before, and (B, 1, D) as the same target.
    one = processor(images=frames(), text=["a", "b"], actions=robot_actions(2)[:, None], dataset="bridge")
    same = processor(images=frames(), text=["a", "b"], actions=robot_actions(2), dataset="bridge")
    assert torch.equal(one["input_ids"], same["input_ids"])
