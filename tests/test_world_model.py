"""World-model rollouts (`training.eval.world_model`, `training.imagine`): every imagined frame and code recomputed
independently step by step, the start frame's conversion, clear errors, the written GIF / MP4, the PSNR per step,
and the command line end to end on a tiny LeRobot dataset. Tiny random-init models built in code."""

import re
import shlex

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import modeling_lapa  # noqa: F401  (registers the LAPA models with the Auto classes)
from data_fixtures import build_v30_dataset, synthetic_frames
from modeling_lapa import (
    LAPAConfig,
    LAPAForActionPrediction,
    LAPAQuantizerConfig,
    LAPAQuantizerModel,
    count_image_tokens,
    tiny_backbone_config,
)
from processing_lapa import LAPAImageProcessor, LAPAProcessor, build_tiny_tokenizer
from training import imagine as imagine_cli
from training.data import decode_video
from training.eval.metrics import psnr
from training.eval.world_model import (
    CAPTION_LINE_HEIGHT,
    MAX_STEPS,
    PANEL_GAP,
    ImaginedRollout,
    check_world_model,
    imagine,
    render_rollout,
    rollout_psnr,
    write_rollout,
)

SIZE = 32  # the quantizer's image_size
INSTRUCTION = "open the drawer"


def build_vla(num_latent_codes: int = 8, latent_sequence_length: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    backbone_config = tiny_backbone_config("llava", image_size=32, patch_size=8, hidden_size=64, num_layers=2)
    processor = LAPAProcessor.from_components(
        build_tiny_tokenizer(), LAPAImageProcessor(size=32), num_latent_codes=num_latent_codes,
        latent_sequence_length=latent_sequence_length, num_action_bins=16,
        num_image_tokens=count_image_tokens(backbone_config),
    )
    vla = LAPAForActionPrediction(LAPAConfig.from_processor(backbone_config, processor)).eval()
    vla.processor = processor
    return vla


def build_quantizer(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    settings = dict(hidden_size=32, quant_dim=8, codebook_size=8, code_seq_len=4, image_size=SIZE, patch_size=4,
                    spatial_depth=1, temporal_depth=1, num_heads=2, head_dim=16, gap_seconds=0.6)
    settings.update(overrides)
    return LAPAQuantizerModel(LAPAQuantizerConfig(**settings)).eval()


@pytest.fixture(scope="module")
def models():
    return build_vla(), build_quantizer()


def start_frame(height=SIZE, width=SIZE, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def decoded_independently(quantizer, frame: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The documented step: uint8 frame / 255 -> decode -> clamp to [0, 1] -> x 255, rounded to uint8."""
    pixels = torch.tensor(frame, dtype=torch.float32).permute(2, 0, 1)[None] / 255
    with torch.no_grad():
        prediction = quantizer.decode(pixels, torch.tensor(codes)[None])[0]
    return np.rint(prediction.clamp(0, 1).numpy() * 255).astype(np.uint8).transpose(1, 2, 0)


# -- imagine ----------------------------------------------------------------------------------------------------
def test_each_step_is_the_vla_codes_of_the_previous_imagined_frame_decoded_by_the_quantizer(models):
    vla, quantizer = models
    frame = start_frame()
    rollout = imagine(vla, quantizer, frame, INSTRUCTION, steps=4)
    assert isinstance(rollout, ImaginedRollout)
    assert rollout.frames.shape == (5, SIZE, SIZE, 3) and rollout.frames.dtype == np.uint8
    assert rollout.codes.shape == (4, 4) and rollout.codes.dtype == np.int64
    assert rollout.steps == 4 and rollout.instruction == INSTRUCTION and rollout.gap_seconds == 0.6
    np.testing.assert_array_equal(rollout.frames[0], frame)  # already at the quantizer's size: unchanged
    for k in range(4):
        expected_codes = vla.predict_latent_actions(rollout.frames[k][None], [INSTRUCTION])[0].numpy()
        np.testing.assert_array_equal(rollout.codes[k], expected_codes)
        np.testing.assert_array_equal(rollout.frames[k + 1], decoded_independently(quantizer, rollout.frames[k],
                                                                                   rollout.codes[k]))
    # The test has power: the codes change along the rollout, so they were predicted from the imagined frames.
    assert len({tuple(codes) for codes in rollout.codes}) > 1
    assert not np.array_equal(rollout.frames[1], rollout.frames[0])


def test_start_frame_of_another_size_is_resized_and_every_input_kind_gives_the_same_rollout(models):
    vla, quantizer = models
    frame = start_frame(40, 48)
    rollout = imagine(vla, quantizer, frame, INSTRUCTION, steps=1)
    pixels = torch.tensor(frame).permute(2, 0, 1)[None].float() / 255
    resized = F.interpolate(pixels, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    expected = np.rint(resized[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    np.testing.assert_array_equal(rollout.frames[0], expected)
    for same in (Image.fromarray(frame), torch.tensor(frame).permute(2, 0, 1).float() / 255):
        other = imagine(vla, quantizer, same, INSTRUCTION, steps=1)
        np.testing.assert_array_equal(other.frames, rollout.frames)
        np.testing.assert_array_equal(other.codes, rollout.codes)
    # A uniform image stays that colour whatever the resize (an independent check of the range handling).
    uniform = imagine(vla, quantizer, np.full((50, 70, 3), 77, np.uint8), INSTRUCTION, steps=1)
    assert (uniform.frames[0] == 77).all()


def test_a_batch_of_start_frames_rolls_out_each_row_as_alone(models):
    vla, quantizer = models
    frames = np.stack([start_frame(seed=1), start_frame(seed=2)])
    batch = imagine(vla, quantizer, frames, INSTRUCTION, steps=2)
    assert batch.frames.shape == (2, 3, SIZE, SIZE, 3) and batch.codes.shape == (2, 2, 4)
    assert batch.instruction == [INSTRUCTION, INSTRUCTION]
    for row in range(2):
        alone = imagine(vla, quantizer, frames[row], INSTRUCTION, steps=2)
        np.testing.assert_array_equal(batch.codes[row], alone.codes)
        assert np.abs(batch.frames[row].astype(int) - alone.frames.astype(int)).max() <= 1  # float batch effects


def test_sampling_is_reproducible_with_a_generator_and_models_keep_their_mode(models):
    vla, quantizer = models
    runs = [imagine(vla, quantizer, start_frame(), INSTRUCTION, steps=3, do_sample=True, temperature=5.0,
                    generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    np.testing.assert_array_equal(runs[0].codes, runs[1].codes)
    np.testing.assert_array_equal(runs[0].frames, runs[1].frames)
    quantizer.train()
    try:
        imagine(vla, quantizer, start_frame(), INSTRUCTION, steps=1)
        assert quantizer.training and not vla.training
    finally:
        quantizer.eval()


def test_a_quantizer_that_does_not_match_the_vla_is_refused_naming_both_numbers(models):
    vla, _ = models
    with pytest.raises(ValueError, match=r"codebook has 16 codes.*predicts 8 latent codes"):
        check_world_model(vla, build_quantizer(codebook_size=16))
    with pytest.raises(ValueError, match=r"uses 2 codes per frame pair.*predicts 4"):
        imagine(vla, build_quantizer(code_seq_len=2), start_frame(), INSTRUCTION, steps=1)
    no_latents = build_vla()
    no_latents.config.num_latent_codes = 0
    with pytest.raises(ValueError, match="no latent-action tokens"):
        check_world_model(no_latents, build_quantizer())
    with pytest.raises(ValueError, match="LAPAQuantizerModel"):
        check_world_model(vla, torch.nn.Linear(2, 2))


@pytest.mark.parametrize("steps", [0, -1, MAX_STEPS + 1, 2.5, True, "3"])
def test_bad_steps_are_refused(models, steps):
    with pytest.raises(ValueError, match="steps must"):
        imagine(*models, start_frame(), INSTRUCTION, steps=steps)


@pytest.mark.parametrize("frame,error,message", [
    (np.zeros((SIZE, SIZE), np.uint8), ValueError, r"\(H, W, 3\)"),
    (np.zeros((SIZE, SIZE, 4), np.uint8), ValueError, r"\(H, W, 3\)"),
    (np.zeros((0, SIZE, 3), np.uint8), ValueError, "empty"),
    (np.zeros((SIZE, SIZE, 3), np.int16), ValueError, "uint8"),
    (np.full((SIZE, SIZE, 3), 1.5, np.float32), ValueError, r"\[0, 1\].*max 1\.5"),
    (torch.full((3, SIZE, SIZE), -0.1), ValueError, r"\[0, 1\]"),
    (torch.full((3, SIZE, SIZE), float("nan")), ValueError, r"\[0, 1\]"),
    (torch.zeros(SIZE, SIZE, 3), ValueError, r"\(3, H, W\)"),
    ("start.png", TypeError, "uint8 numpy array"),
])
def test_bad_start_frames_are_refused_naming_the_problem(models, frame, error, message):
    with pytest.raises(error, match=message):
        imagine(*models, frame, INSTRUCTION, steps=1)


def test_one_instruction_or_one_per_start_frame(models):
    frames = np.stack([start_frame(seed=1), start_frame(seed=2)])
    with pytest.raises(ValueError, match=r"one per start frame \(2\)"):
        imagine(*models, frames, [INSTRUCTION] * 3, steps=1)


# -- PSNR -------------------------------------------------------------------------------------------------------
def test_rollout_psnr_per_step_matches_a_hand_computation():
    frames = np.random.default_rng(0).integers(20, 200, size=(4, 16, 16, 3), dtype=np.uint8)
    assert np.allclose(rollout_psnr(frames, frames.copy()), psnr(0.0))  # identical: the cap, 100 dB
    assert psnr(0.0) >= 100
    offsets = np.array([0, 5, 10, 40])
    real = (frames.astype(int) + offsets[:, None, None, None]).astype(np.uint8)
    expected = [psnr(0.0)] + [20 * np.log10(255 / d) for d in offsets[1:]]
    np.testing.assert_allclose(rollout_psnr(frames, real), expected, rtol=1e-9)
    # Real frames of another size are resized to the imagined size first (uniform frames stay uniform).
    small, large = np.full((3, 16, 16, 3), 100, np.uint8), np.full((3, 40, 24, 3), 110, np.uint8)
    np.testing.assert_allclose(rollout_psnr(small, large), 20 * np.log10(255 / 10), rtol=1e-9)
    # An ImaginedRollout and leading batch axes are accepted.
    rollout = ImaginedRollout(frames, np.zeros((3, 4), np.int64), INSTRUCTION)
    np.testing.assert_allclose(rollout_psnr(rollout, real), expected, rtol=1e-9)
    assert rollout_psnr(np.stack([frames, frames]), np.stack([real, real])).shape == (2, 4)


def test_rollout_psnr_refuses_frames_at_different_times_or_not_uint8():
    frames = np.zeros((4, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="same times"):
        rollout_psnr(frames, frames[:3])
    with pytest.raises(ValueError, match="uint8"):
        rollout_psnr(frames, frames.astype(np.float32))


# -- writing ----------------------------------------------------------------------------------------------------
def upscaled(frame: np.ndarray, scale: int) -> np.ndarray:
    return np.kron(frame, np.ones((scale, scale, 1), np.uint8))


def test_render_puts_frames_codes_and_the_real_rollout_where_they_belong():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8)
    real = rng.integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)  # the episode ends before the rollout
    codes = np.array([[1, 2, 3, 4], [0, 0, 0, 0], [7, 6, 5, 4]])
    scale, side = 8, 128
    canvas = render_rollout(frames, codes, real=real, scale=scale)
    band = 2 * CAPTION_LINE_HEIGHT + 2 * PANEL_GAP  # two lines: the label, then "step k  codes a b c d"
    assert canvas.shape == (4, side + band, 2 * side + PANEL_GAP, 3) and canvas.dtype == np.uint8
    for k in range(4):
        np.testing.assert_array_equal(canvas[k, :side, :side], upscaled(frames[k], scale))
        if k < 3:
            np.testing.assert_array_equal(canvas[k, :side, side + PANEL_GAP:], upscaled(real[k], scale))
        else:  # past the real episode's end: a grey panel with a note
            assert (canvas[k, side // 2:side, side + PANEL_GAP:] == 64).all()
        caption = canvas[k, side:]
        assert (caption < 128).any() and (caption == 255).mean() > 0.5  # dark text on a white band
    # The codes are drawn under the imagined frame they produced, and only there.
    other = render_rollout(frames, codes[[2, 1, 0]], real=real, scale=scale)
    assert not np.array_equal(other[1, side:, :side], canvas[1, side:, :side])
    np.testing.assert_array_equal(other[2, side:], canvas[2, side:])  # same codes at step 2
    np.testing.assert_array_equal(other[1, side:, side + PANEL_GAP:], canvas[1, side:, side + PANEL_GAP:])
    np.testing.assert_array_equal(other[0], canvas[0])  # "start": no codes
    # Frames differ in their step caption even where the codes are the same.
    assert not np.array_equal(canvas[1, side:, :side], canvas[2, side:, :side])
    # Captions wider than a narrow panel wrap onto more lines: the band grows, the width does not.
    narrow = render_rollout(frames, codes, real=real, scale=2, gap_seconds=0.6)
    assert narrow.shape[2] == 2 * 32 + PANEL_GAP and narrow.shape[1] > 32 + band
    # Odd sizes are padded to even ones (for yuv420p video).
    odd = render_rollout(frames[:, :15, :15], scale=3)  # 45 + one caption line ("step k") = 67 high, 45 wide
    assert 45 + CAPTION_LINE_HEIGHT + 2 * PANEL_GAP == 67 and odd.shape[1:3] == (68, 46)


def test_render_checks_its_inputs():
    frames = np.zeros((3, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match=r"\(T - 1, s\) = \(2, s\)"):
        render_rollout(frames, np.zeros((3, 4)))
    with pytest.raises(ValueError, match="T' <= 3"):
        render_rollout(frames, real=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="one rollout at a time"):
        render_rollout(np.zeros((2, 3, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="scale"):
        render_rollout(frames, scale=0)
    with pytest.raises(ValueError, match=r"\.gif or \.mp4"):
        write_rollout("rollout.png", frames)


def test_gif_has_one_frame_per_step_at_the_expected_size(models, tmp_path):
    rollout = imagine(*models, start_frame(), INSTRUCTION, steps=3)
    alone = write_rollout(tmp_path / "alone.gif", rollout, scale=4)
    beside = write_rollout(tmp_path / "beside.gif", rollout, real=start_frame(seed=5)[None].repeat(4, 0), scale=4)
    one_line, two_lines = CAPTION_LINE_HEIGHT + 2 * PANEL_GAP, 2 * CAPTION_LINE_HEIGHT + 2 * PANEL_GAP
    for path, size in ((alone, (4 * SIZE, 4 * SIZE + one_line)),
                       (beside, (2 * 4 * SIZE + PANEL_GAP, 4 * SIZE + two_lines))):
        with Image.open(path) as gif:
            assert gif.format == "GIF" and gif.n_frames == 4 and gif.size == size
            gif.seek(2)
            shown = np.asarray(gif.convert("RGB"))
            # GIF keeps a palette of 256 colours: the frame is close to, not exactly, the imagined one.
            assert np.abs(shown[:4 * SIZE, :4 * SIZE].astype(int) - upscaled(rollout.frames[2], 4)).mean() < 12


def test_mp4_decodes_with_every_frame(tmp_path):
    frames = synthetic_frames(5, height=SIZE, width=SIZE)  # smooth images, which H.264 keeps well
    path = write_rollout(tmp_path / "rollout.mp4", frames, np.arange(16).reshape(4, 4) % 8, fps=5, scale=4)
    decoded, times = decode_video(path)
    assert decoded.shape == (5, 4 * SIZE + CAPTION_LINE_HEIGHT + 2 * PANEL_GAP, 4 * SIZE, 3)
    np.testing.assert_allclose(times, np.arange(5) / 5, atol=1e-6)
    for k in range(5):
        assert np.abs(decoded[k, :4 * SIZE].astype(int) - upscaled(frames[k], 4)).mean() < 6


# -- the command line -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_models(tmp_path_factory, models):
    vla, quantizer = models
    root = tmp_path_factory.mktemp("world_model")
    vla.save_pretrained(root / "vla")
    vla.processor.save_pretrained(root / "vla")
    quantizer.save_pretrained(root / "quantizer")
    mismatched = root / "quantizer16"
    build_quantizer(codebook_size=16).save_pretrained(mismatched)
    return root


def test_cli_rolls_out_from_a_dataset_beside_the_real_frames(saved_models, tmp_path, capsys):
    dataset = tmp_path / "dataset"
    truth = build_v30_dataset(dataset, codec="libx264")
    output = tmp_path / "rollout.gif"
    argv = ["--vla", str(saved_models / "vla"), "--quantizer", str(saved_models / "quantizer"),
            "--dataset", str(dataset), "--episode", "2", "--steps", "4", "--output", str(output), "--cpu"]
    assert imagine_cli.main(argv) == 0
    printed = capsys.readouterr().out
    # Episode 2 has 15 frames at 10 fps: the real frames 0.6 s = 6 frames apart are 0, 6 and 12.
    assert f"instruction: {truth['tasks'][2]!r}" in printed
    assert "camera observation.images.top, real frames [0, 6, 12]" in printed
    assert len(re.findall(r"^step \d: codes( \d){4}  PSNR +[\d.]+ dB", printed, re.M)) == 2
    assert len(re.findall(r"past the episode's end", printed)) == 2
    with Image.open(output) as gif:
        assert gif.n_frames == 5 and gif.size == (2 * 4 * SIZE + PANEL_GAP,
                                                  4 * SIZE + 2 * CAPTION_LINE_HEIGHT + 2 * PANEL_GAP)
    # The numbers it returns: the real start frame, PSNR per step the episode covers.
    result = imagine_cli.imagine_rollout(imagine_cli.resolve_config(argv + ["--camera-key", "wrist"]))
    assert result["real_frames"] == [0, 6, 12] and len(result["psnr"]) == len(result["copy_psnr"]) == 2
    assert len(result["codes"]) == 4 and result["gap_seconds"] == 0.6


def test_cli_from_an_image_matches_imagine_on_the_same_models(models, saved_models, tmp_path):
    frame = start_frame(40, 48, seed=3)
    Image.fromarray(frame).save(tmp_path / "start.png")
    output = tmp_path / "rollout.mp4"
    config = imagine_cli.resolve_config([
        "--vla", str(saved_models / "vla"), "--quantizer", str(saved_models / "quantizer"),
        "--image", str(tmp_path / "start.png"), "--instruction", INSTRUCTION, "--steps", "3", "--output",
        str(output), "--cpu"])
    result = imagine_cli.imagine_rollout(config)
    assert result["codes"] == imagine(*models, frame, INSTRUCTION, steps=3).codes.tolist()
    assert len(decode_video(output)[0]) == 4


def test_cli_errors_name_the_problem(saved_models, tmp_path, capsys):
    base = ["--vla", str(saved_models / "vla"), "--output", str(tmp_path / "r.gif")]
    image = tmp_path / "start.png"
    Image.fromarray(start_frame()).save(image)
    cases = [
        (["--quantizer", str(saved_models / "quantizer"), "--instruction", "x"], "exactly one of --image"),
        (["--quantizer", str(saved_models / "quantizer"), "--image", str(image)], "--instruction is required"),
        (["--quantizer", str(saved_models / "quantizer16"), "--image", str(image), "--instruction", "x"],
         "codebook has 16 codes"),
        (["--quantizer", str(saved_models / "quantizer"), "--image", str(tmp_path / "none.png"), "--instruction",
          "x"], "no such file"),
        (["--quantizer", str(saved_models / "quantizer"), "--image", str(image), "--instruction", "x", "--steps",
          "0"], "steps must be between 1"),
    ]
    for argv, message in cases:
        assert imagine_cli.main(base + argv) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: not allowed together
        imagine_cli.build_parser().parse_args(["--image", "a.png", "--dataset", "d"])


def test_the_documented_commands_parse_and_help_works(capsys):
    commands = re.findall(r"^    python -m training\.imagine (.+)$",
                          imagine_cli.__doc__.replace("\\\n", " "), re.M)
    assert len(commands) == 2
    for command in commands:
        config = imagine_cli.resolve_config(shlex.split(command))
        assert config.steps == 8 and config.output.startswith("rollout.")
    with pytest.raises(SystemExit) as exit_:
        imagine_cli.build_parser().parse_args(["--help"])
    assert exit_.value.code == 0 and "--camera-key" in capsys.readouterr().out
