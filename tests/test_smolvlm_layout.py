"""The real-backbone path is faithful to its backbone: for an Idefics3/SmolVLM backbone the LAPA prompt holds the image
exactly as the backbone's own processor (transformers' `Idefics3Processor`, no image splitting) writes it,
`<fake_token_around_image> <global-img> <image> x n <fake_token_around_image>`, with the backbone tokenizer's ids.

The backbone is a tiny Idefics3 folder built here (tokenizer with the Idefics3 special tokens, the Idefics3 image
processor at 16 px, an `Idefics3Processor` saved and loaded back with `AutoProcessor`, random weights), read by the
`smolvlm` preset's own code path with the folder in place of the Hub id. Nothing is downloaded, nothing is mocked."""

import numpy as np
import pytest
import torch
import transformers
from transformers import AutoModelForImageTextToText, AutoProcessor, Idefics3Processor

import modeling_lapa  # noqa: F401
import processing_lapa  # noqa: F401
from modeling_lapa import count_image_tokens, tiny_backbone_config
from processing_lapa import (
    DEFAULT_PROMPT_TEMPLATE, LAPAImageProcessor, LAPAProcessor, build_tiny_tokenizer, image_layout_for,
)
from support import FIXTURES
from training.vla_training import build_processor_and_model, config_from_preset

# transformers >= 5 names the PIL backend `Idefics3ImageProcessorPil` (the plain name needs torchvision, which this
# environment does not have); older releases call the PIL one `Idefics3ImageProcessor`.
Idefics3ImagesPil = getattr(transformers, "Idefics3ImageProcessorPil", None) or transformers.Idefics3ImageProcessor

IDEFICS3_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
IMAGE_SIZE = 16
INSTRUCTIONS = ["open the drawer", "push the red button all the way down"]


def frames(batch=2, seed=0) -> np.ndarray:
    """Square frames at the vision encoder's size (what LAPA feeds: one frame at the model's resolution)."""
    return np.random.default_rng(seed).integers(0, 256, (batch, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)


def idefics3_tokenizer():
    """A small tokenizer holding the Idefics3 special tokens, as SmolVLM's does."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": IDEFICS3_TOKENS})
    return tokenizer


@pytest.fixture(scope="module")
def backbone_folder(tmp_path_factory):
    """A local stand-in for HuggingFaceTB/SmolVLM-256M-Instruct: config, weights, tokenizer and Idefics3Processor."""
    folder = tmp_path_factory.mktemp("tiny_idefics3")
    tokenizer = idefics3_tokenizer()
    config = tiny_backbone_config("idefics3", image_size=IMAGE_SIZE, patch_size=4, hidden_size=32, num_layers=1,
                                  vocab_size=len(tokenizer))
    config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config).save_pretrained(folder)
    image_processor = Idefics3ImagesPil(size={"longest_edge": IMAGE_SIZE}, max_image_size={"longest_edge": IMAGE_SIZE},
                                        do_image_splitting=False)
    Idefics3Processor(image_processor, tokenizer, image_seq_len=count_image_tokens(config)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def smolvlm_path(backbone_folder):
    """(processor, model) built by the smolvlm preset's code, the folder in place of the Hub id."""
    settings = config_from_preset("pretrain", "smolvlm", backbone=str(backbone_folder), dataset=["unused"],
                                  num_action_bins=16)
    processor, model = build_processor_and_model(settings, num_latent_codes=8, latent_sequence_length=4)
    rng = np.random.default_rng(0)
    processor.fit_action_tokenizer(rng.normal(size=(200, 3)).astype(np.float32), dataset="toy")
    return processor, model.eval()


def their_inputs(folder, instruction, image):
    """The backbone's own processor on our prompt text, with one image placeholder where our image goes."""
    theirs = AutoProcessor.from_pretrained(folder)
    assert type(theirs) is Idefics3Processor
    text = theirs.tokenizer.bos_token + "<image>" + DEFAULT_PROMPT_TEMPLATE.format(instruction=instruction)
    return theirs(images=[image], text=[text], return_tensors="pt")


@pytest.mark.parametrize("task", ["latent", "action"])
def test_the_prompt_is_the_token_sequence_idefics3_processor_builds(smolvlm_path, backbone_folder, task):
    processor, model = smolvlm_path
    assert processor.image_layout == "idefics3"
    images = frames()
    ours = processor(images=images, text=INSTRUCTIONS, task=task, return_tensors="pt")
    assert ours["pixel_values"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    for row in range(2):
        theirs = their_inputs(backbone_folder, INSTRUCTIONS[row], images[row])
        # One global image, no tiles: the same image count and the same pixel grid.
        assert theirs["pixel_values"].shape == (1, 1, 3, IMAGE_SIZE, IMAGE_SIZE)
        # Ours are left padded into one batch (the two instructions differ in length).
        our_ids = ours["input_ids"][row][ours["attention_mask"][row].bool()]
        assert our_ids.tolist() == theirs["input_ids"][0].tolist(), row
    n = processor.num_image_tokens
    assert n == model.config.num_image_tokens == count_image_tokens(model.config.backbone_config) == 4
    for row in ours["input_ids"]:
        assert int((row == model.config.image_token_id).sum()) == n  # placeholders only; the wrappers are text
    fake, global_image = processor.tokenizer.convert_tokens_to_ids(["<fake_token_around_image>", "<global-img>"])
    assert processor.image_prompt_ids == [fake, global_image] + [processor.image_token_id] * n + [fake]


def test_targets_follow_the_wrapped_prompt_and_only_they_are_labelled(smolvlm_path, backbone_folder):
    processor, _ = smolvlm_path
    codes = np.array([[1, 2, 3, 4], [7, 0, 0, 5]])
    prompt = processor(images=frames(), text=INSTRUCTIONS, return_tensors="pt")
    batch = processor(images=frames(), text=INSTRUCTIONS, latent_codes=codes, return_tensors="pt")
    assert torch.equal(batch["input_ids"][:, :-4], prompt["input_ids"])
    assert torch.equal(batch["input_ids"][:, -4:], torch.as_tensor(codes) + processor.latent_token_offset)
    assert torch.equal(batch["labels"][:, -4:], batch["input_ids"][:, -4:])
    assert (batch["labels"][:, :-4] == -100).all()
    assert torch.equal(batch["attention_mask"][:, :-4], prompt["attention_mask"])


def test_the_backbone_reads_the_layout_and_the_model_predicts(smolvlm_path, backbone_folder):
    processor, model = smolvlm_path
    images = frames()
    ours = processor(images=images[:1], text=INSTRUCTIONS[0], return_tensors="pt")
    theirs = their_inputs(backbone_folder, INSTRUCTIONS[0], images[0])
    # The backbone's logits on its own processor's inputs equal ours through LAPA (same ids; the pixels agree up to
    # the two image processors' float rounding at an unchanged size).
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"][:, 0], rtol=0, atol=1e-5)
    with torch.no_grad():
        reference = model.backbone(input_ids=theirs["input_ids"], attention_mask=theirs["attention_mask"],
                                   pixel_values=theirs["pixel_values"],
                                   pixel_attention_mask=theirs["pixel_attention_mask"]).logits
        lapa = model(**ours).logits
    torch.testing.assert_close(lapa, reference, rtol=1e-4, atol=1e-4)

    batch = processor(images=images, text=INSTRUCTIONS, latent_codes=np.array([[1, 2, 3, 4], [7, 0, 0, 5]]))
    out = model(**batch)
    assert torch.isfinite(out.loss) and int(out.num_target_tokens) == 8
    codes = model.predict_latent_actions(images, INSTRUCTIONS)
    assert codes.shape == (2, 4) and codes.min() >= 0 and codes.max() < 8
    actions = model.predict_action(images, INSTRUCTIONS)
    assert actions.shape == (2, 3) and np.isfinite(actions).all()


def test_the_idefics3_layout_round_trips_through_a_saved_processor(smolvlm_path, tmp_path):
    processor, _ = smolvlm_path
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is LAPAProcessor and loaded.image_layout == "idefics3"
    inputs = dict(images=frames(), text=INSTRUCTIONS, latent_codes=np.array([[1, 2, 3, 4], [7, 0, 0, 5]]))
    expected, got = processor(**inputs), loaded(**inputs)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(got[key], expected[key]), key


def test_the_tiny_llava_prompt_is_unchanged():
    processor = LAPAProcessor.from_components(build_tiny_tokenizer(), LAPAImageProcessor(size=32), num_image_tokens=16)
    assert processor.image_layout == "plain" and processor.image_prompt_ids == [4] * 16
    text = DEFAULT_PROMPT_TEMPLATE.format(instruction="open the drawer")
    ids = processor(images=frames(1), text="open the drawer")["input_ids"][0].tolist()
    # The byte tokenizer: <s> is 1, <image> is 4, byte b is 5 + b.
    assert ids == [1] + [4] * 16 + [5 + b for b in text.encode()]


def test_a_processor_saved_before_image_layouts_loads_plain():
    old = AutoProcessor.from_pretrained(FIXTURES / "saved_vla")
    assert type(old) is LAPAProcessor and old.image_layout == "plain"
    assert old.image_prompt_ids == [old.image_token_id] * old.num_image_tokens


def test_family_layouts_and_clear_errors():
    assert image_layout_for("idefics3") == image_layout_for("smolvlm") == "idefics3"
    assert image_layout_for("llava") == image_layout_for("paligemma") == image_layout_for("lwm") == "plain"
    with pytest.raises(ValueError, match=r"no '<fake_token_around_image>' and no '<global-img>' token"):
        LAPAProcessor.from_components(build_tiny_tokenizer(), LAPAImageProcessor(size=16), num_image_tokens=4,
                                      image_layout="idefics3")
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>"]})
    with pytest.raises(ValueError, match=r"no '<global-img>' token"):
        LAPAProcessor.from_components(tokenizer, LAPAImageProcessor(size=16), num_image_tokens=4,
                                      image_layout="idefics3")
    with pytest.raises(ValueError, match="image_layout must be one of"):
        LAPAProcessor.from_components(build_tiny_tokenizer(), LAPAImageProcessor(size=16), image_layout="tiles")
    processor = LAPAProcessor.from_components(idefics3_tokenizer(), LAPAImageProcessor(size=16), num_image_tokens=4,
                                              image_layout="idefics3")
    with pytest.raises(ValueError, match="wrapper tokens"):
        processor(images=frames(1), text="press <global-img> twice")
