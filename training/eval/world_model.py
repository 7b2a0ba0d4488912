"""World-model rollouts: the VLA imagines a future by neural inference alone.

    rollout = imagine(vla, quantizer, frame, "open the drawer", steps=8)   # ImaginedRollout
    rollout.frames                     # (9, S, S, 3) uint8: the start frame, then one imagined frame per gap
    rollout_psnr(rollout.frames, real) # PSNR (dB) of each imagined frame against the real one at the same time
    write_rollout("rollout.gif", rollout, real=real)   # imagined | real, side by side, the codes under each frame

Each step, the VLA predicts the latent action of the current frame (`predict_latent_actions`) and the quantizer
decodes it into the frame one gap (`gap_seconds`, 0.6 s for robot video) later (`decode`); that frame is the next
step's input. No simulator and no camera are involved, so the rollout shows what the two models have learned
together about the task's dynamics, and how fast their errors compound.

Every frame, the start frame included, is held as uint8 at the quantizer's size and the next step reads exactly
that array (/ 255): the frames a rollout returns (and writes) reproduce it, step by step, with nothing hidden in
float precision, and the models see what a camera would give them. The decoder's output is clamped to [0, 1] and
rounded. A start frame of another size is resized to the quantizer's S x S (aspect ratio not kept, as the training
pairs are) with `F.interpolate(mode="bilinear", antialias=True)`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .metrics import psnr

#: Most steps one call imagines: 256 gaps is 2.5 min of robot time at 0.6 s, far past any episode and past where
#: compounding errors leave anything to look at; a larger number is much more likely a typo than a wish.
MAX_STEPS = 256
#: Caption text is drawn in Pillow's default font; each line of the band under a frame is this many pixels high.
CAPTION_LINE_HEIGHT = 14
#: Pixels between the imagined and the real panel (and around the caption text).
PANEL_GAP = 4
_BAND_COLOR = (255, 255, 255)
_TEXT_COLOR = (0, 0, 0)
_ENDED_COLOR = (64, 64, 64)


@dataclass
class ImaginedRollout:
    """What `imagine` returns.

    frames: (steps + 1, S, S, 3) uint8, frame 0 the (resized) start frame; (B, steps + 1, S, S, 3) for a batch.
    codes: (steps, s) int64, codes[k] the latent action that turned frames[k] into frames[k + 1]; (B, steps, s).
    instruction: the instruction (a list of B for a batch).
    gap_seconds: the time between two frames, from the quantizer's config (None when it does not record it).
    """

    frames: np.ndarray
    codes: np.ndarray
    instruction: str | list[str]
    gap_seconds: float | None = None

    @property
    def steps(self) -> int:
        return self.codes.shape[-2]


def check_world_model(vla, quantizer) -> None:
    """ValueError unless the VLA's latent tokens are the quantizer's codes: a rollout decodes the VLA's codes with
    the quantizer, so both must share |C| (codebook size) and s (codes per frame pair)."""
    config = getattr(vla, "config", None)
    num_codes = getattr(config, "num_latent_codes", None)
    length = getattr(config, "latent_sequence_length", None)
    if not num_codes or not length:
        raise ValueError(
            f"the VLA has no latent-action tokens (num_latent_codes={num_codes}, latent_sequence_length={length}): "
            "a world-model rollout needs a latent-pretrained VLA"
        )
    quantizer_config = getattr(quantizer, "config", None)
    if not hasattr(quantizer_config, "codebook_size") or not hasattr(quantizer, "decode"):
        raise ValueError(f"expected a LAPAQuantizerModel as the quantizer, got {type(quantizer).__name__}")
    if quantizer_config.codebook_size != num_codes:
        raise ValueError(
            f"the quantizer's codebook has {quantizer_config.codebook_size} codes (codebook_size) but the VLA "
            f"predicts {num_codes} latent codes (num_latent_codes): they were not trained together"
        )
    if quantizer_config.code_seq_len != length:
        raise ValueError(
            f"the quantizer uses {quantizer_config.code_seq_len} codes per frame pair (code_seq_len) but the VLA "
            f"predicts {length} (latent_sequence_length): they were not trained together"
        )


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise ValueError(f"steps must be an integer, got {steps!r}")
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be between 1 and {MAX_STEPS}, got {steps}")
    return int(steps)


def _as_float_batch(frame) -> tuple[torch.Tensor, bool]:
    """Any accepted start frame -> ((B, 3, H, W) float32 in [0, 1], whether a batch was given)."""
    from PIL import Image

    if isinstance(frame, Image.Image):
        frame = np.asarray(frame.convert("RGB"))
    if isinstance(frame, (list, tuple)):
        if not frame:
            raise ValueError("got an empty list of start frames")
        parts = [_as_float_batch(f) for f in frame]
        if any(batched for _, batched in parts):
            raise ValueError("a list of start frames must hold single frames")
        if len({tuple(p.shape) for p, _ in parts}) > 1:
            raise ValueError(f"the start frames differ in size: {[tuple(p.shape[2:]) for p, _ in parts]}")
        return torch.cat([p for p, _ in parts]), True
    if isinstance(frame, np.ndarray):
        if frame.ndim not in (3, 4) or frame.shape[-1] != 3:
            raise ValueError(f"a numpy start frame must be (H, W, 3) or (B, H, W, 3), got shape {frame.shape}")
        tensor, batched = torch.tensor(frame).movedim(-1, -3), frame.ndim == 4  # a copy: PIL's arrays are read-only
    elif isinstance(frame, torch.Tensor):
        if frame.ndim not in (3, 4) or frame.shape[-3] != 3:
            raise ValueError(f"a tensor start frame must be (3, H, W) or (B, 3, H, W), got shape "
                             f"{tuple(frame.shape)}")
        tensor, batched = frame.detach().cpu(), frame.ndim == 4
    else:
        raise TypeError(f"the start frame must be a uint8 numpy array (H, W, 3), a PIL image or a float tensor "
                        f"(3, H, W) in [0, 1], got {type(frame).__name__}")
    if tensor.numel() == 0:
        raise ValueError(f"the start frame is empty (shape {tuple(frame.shape)})")
    if tensor.dtype == torch.uint8:
        return tensor.float().div(255).reshape(-1, *tensor.shape[-3:]), batched
    if not tensor.is_floating_point():
        raise ValueError(f"the start frame must be uint8 (0-255) or float in [0, 1], got dtype {tensor.dtype}")
    tensor = tensor.float()
    low, high = torch.aminmax(tensor)
    if not (0 <= low.item() and high.item() <= 1):  # NaN fails too
        raise ValueError(f"a float start frame must lie in [0, 1], got min {low.item():.4g} and max "
                         f"{high.item():.4g} (divide uint8 pixels by 255)")
    return tensor.reshape(-1, *tensor.shape[-3:]), batched


def resize_frames(frames: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] -> (B, 3, size, size): bilinear with antialiasing, aspect ratio not kept."""
    if tuple(frames.shape[-2:]) == (size, size):
        return frames
    return F.interpolate(frames, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """(B, 3, S, S) float -> (B, S, S, 3) uint8: clamped to [0, 1], scaled by 255 and rounded."""
    return frames.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def start_frames(frame, image_size: int) -> tuple[np.ndarray, bool]:
    """The rollout's first frame(s): (B, S, S, 3) uint8 at `image_size`, and whether a batch was given."""
    pixels, batched = _as_float_batch(frame)
    return to_uint8(resize_frames(pixels, image_size)), batched


@contextlib.contextmanager
def _eval_mode(*models):
    """Eval mode (no dropout) for the rollout, then each model back in the mode it was in."""
    was_training = [model.training for model in models]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for model, training in zip(models, was_training):
            model.train(training)


@torch.no_grad()
def imagine(vla, quantizer, frame, instruction: str | Sequence[str], steps: int, *, processor=None,
            do_sample: bool = False, temperature: float = 1.0, generator: torch.Generator | None = None,
            center_crop: bool = False) -> ImaginedRollout:
    """Roll the world model out `steps` gaps from `frame` under `instruction` (see the module docstring).

    `frame`: a uint8 array (H, W, 3), a PIL image or a float tensor (3, H, W) in [0, 1]; or a batch (uint8
    (B, H, W, 3), float (B, 3, H, W) or a list) with one instruction or B of them. Greedy codes by default;
    `do_sample` samples them at `temperature` (`generator`, a CPU generator, makes that reproducible). The VLA runs
    on its device and the quantizer on its own; both in eval mode for the call.
    """
    check_world_model(vla, quantizer)
    steps = _check_steps(steps)
    current, batched = start_frames(frame, quantizer.config.image_size)
    batch = len(current)
    instructions = [instruction] * batch if isinstance(instruction, str) else list(instruction)
    if len(instructions) != batch or not all(isinstance(text, str) for text in instructions):
        raise ValueError(f"give one instruction (a string) or one per start frame ({batch}), got {instruction!r}")
    sampling = dict(do_sample=do_sample, temperature=temperature, generator=generator) if do_sample else {}
    device, dtype = quantizer.device, quantizer.dtype
    frames, codes = [current], []
    with _eval_mode(vla, quantizer):
        for _ in range(steps):
            step_codes = vla.predict_latent_actions(current, instructions, processor=processor,
                                                    center_crop=center_crop, **sampling)
            pixels = torch.from_numpy(current).to(device).permute(0, 3, 1, 2).to(dtype).div(255)
            current = to_uint8(quantizer.decode(pixels, step_codes.to(device)))
            frames.append(current)
            codes.append(step_codes.cpu().to(torch.int64).numpy())
    frames_array, codes_array = np.stack(frames, axis=1), np.stack(codes, axis=1)  # (B, T, ...), (B, steps, s)
    gap = getattr(quantizer.config, "gap_seconds", None)
    if batched:
        return ImaginedRollout(frames_array, codes_array, instructions, gap)
    return ImaginedRollout(frames_array[0], codes_array[0], instructions[0], gap)


def _frames_array(frames, name: str) -> np.ndarray:
    frames = frames.frames if isinstance(frames, ImaginedRollout) else np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim < 4 or frames.shape[-1] != 3:
        raise ValueError(f"{name} must be uint8 frames (T, H, W, 3), got {frames.dtype} of shape {frames.shape}")
    return frames


def _resize_uint8(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (..., H, W, 3) -> (..., height, width, 3) by the same resize as the start frame's."""
    if frames.shape[-3:-1] == (height, width):
        return frames
    lead = frames.shape[:-3]
    pixels = torch.from_numpy(np.ascontiguousarray(frames.reshape(-1, *frames.shape[-3:]))).permute(0, 3, 1, 2)
    pixels = F.interpolate(pixels.float().div(255), size=(height, width), mode="bilinear", antialias=True,
                           align_corners=False)
    return to_uint8(pixels).reshape(*lead, height, width, 3)


def rollout_psnr(imagined, real) -> np.ndarray:
    """PSNR (dB, peak 1 on pixels / 255) of each imagined frame against the real frame at the same time.

    `imagined`, `real`: uint8 (T, H, W, 3) (or an `ImaginedRollout`; leading batch axes allowed) with the same T;
    element 0 compares the start frames. A real frame of another size is resized to the imagined size first.
    Identical frames give the cap of `training.eval.metrics.psnr` (100 dB).
    """
    imagined, real = _frames_array(imagined, "imagined"), _frames_array(real, "real")
    if imagined.shape[:-3] != real.shape[:-3]:
        raise ValueError(f"imagined and real must hold frames at the same times: got {imagined.shape[:-3]} frames "
                         f"and {real.shape[:-3]}")
    real = _resize_uint8(real, *imagined.shape[-3:-1])
    error = (imagined.astype(np.float64) - real.astype(np.float64)) / 255.0
    return np.asarray(psnr((error**2).mean(axis=(-3, -2, -1))), dtype=np.float64)


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _wrap(text: str, width: int, draw, font) -> list[str]:
    """Greedy word wrap of one caption line to `width` pixels (a word longer than the width keeps its line)."""
    lines, line = [], ""
    for word in text.split(" "):
        candidate = f"{line} {word}" if line else word
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + [line]


def _caption(step: int, codes, label: str | None, gap_seconds: float | None) -> list[str]:
    """The text under frame `step`: its label (side by side only), "start" or the codes that produced it."""
    time = f"  t={step * gap_seconds:.1f}s" if gap_seconds else ""
    if step == 0:
        text = "start" + time
    else:
        text = f"step {step}" + (f"  codes {' '.join(str(int(c)) for c in codes[step - 1])}" if codes is not None
                                 else "") + time
    return ([label] if label else []) + [text]


def render_rollout(frames, codes=None, *, real=None, scale: int = 4, labels=("imagined", "real"),
                   gap_seconds: float | None = None) -> np.ndarray:
    """The frames `write_rollout` writes: (T, height, width, 3) uint8.

    Each frame upscaled `scale` times (nearest), a caption band under it; with `real` (uint8 (T', H, W, 3),
    T' <= T, resized to the imagined size), the real frame at the same time to the right, `PANEL_GAP` pixels
    apart; past the real episode's end that panel is grey and says so. Width and height are made even (padding
    on the right and bottom) so that the frames encode to yuv420p video.
    """
    from PIL import Image, ImageDraw

    if isinstance(frames, ImaginedRollout):
        codes = frames.codes if codes is None else codes
        gap_seconds = frames.gap_seconds if gap_seconds is None else gap_seconds
    frames = _frames_array(frames, "frames")
    if frames.ndim != 4:
        raise ValueError(f"write one rollout at a time: frames must be (T, H, W, 3), got shape {frames.shape}")
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    count, height, width = frames.shape[:3]
    if codes is not None:
        codes = np.asarray(codes)
        if codes.ndim != 2 or len(codes) != count - 1:
            raise ValueError(f"codes must be (T - 1, s) = ({count - 1}, s) for {count} frames, got {codes.shape}")
    panels = [frames]
    if real is not None:
        real = _resize_uint8(_frames_array(real, "real"), height, width)
        if real.ndim != 4 or len(real) > count:
            raise ValueError(f"real must be (T', H, W, 3) with T' <= {count} frames, got shape {real.shape}")
        panels.append(real)
    font, side = _font(), width * scale
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    # The codes are the imagined rollout's: the real panel's caption has its label, step and time only.
    captions = [[_caption(k, codes if p == 0 else None, labels[p] if real is not None else None, gap_seconds)
                 for k in range(count)] for p in range(len(panels))]
    wrapped = [[sum((_wrap(line, side - 2 * PANEL_GAP, probe, font) for line in text), []) for text in panel]
               for panel in captions]
    band = max(len(lines) for panel in wrapped for lines in panel) * CAPTION_LINE_HEIGHT + 2 * PANEL_GAP
    canvas_width = len(panels) * side + (len(panels) - 1) * PANEL_GAP
    canvas_height = height * scale + band
    out = np.full((count, canvas_height + canvas_height % 2, canvas_width + canvas_width % 2, 3), 255, np.uint8)
    for k in range(count):
        image = Image.new("RGB", (out.shape[2], out.shape[1]), _BAND_COLOR)
        draw = ImageDraw.Draw(image)
        for p, panel in enumerate(panels):
            left = p * (side + PANEL_GAP)
            if k < len(panel):
                big = np.repeat(np.repeat(panel[k], scale, axis=0), scale, axis=1)
                image.paste(Image.fromarray(big), (left, 0))
            else:
                draw.rectangle([left, 0, left + side - 1, height * scale - 1], fill=_ENDED_COLOR)
                draw.text((left + PANEL_GAP, PANEL_GAP), "episode ended", fill=(255, 255, 255), font=font)
            for i, line in enumerate(wrapped[p][k]):
                draw.text((left + PANEL_GAP, height * scale + PANEL_GAP + i * CAPTION_LINE_HEIGHT), line,
                          fill=_TEXT_COLOR, font=font)
        out[k] = np.asarray(image)
    return out


def write_rollout(path: str | Path, frames, codes=None, *, fps: float = 2.0, real=None, scale: int = 4,
                  labels=("imagined", "real"), gap_seconds: float | None = None) -> Path:
    """Writes a rollout as a GIF (Pillow; looping) or an MP4 (H.264, PyAV) by the suffix of `path`.

    `frames`: uint8 (T, H, W, 3) or an `ImaginedRollout` (whose codes and gap are then the defaults); `codes`:
    (T - 1, s), shown under frame k as the codes that produced it. Layout: `render_rollout`. `fps`: frames per
    second of the file (1 / gap_seconds plays it in robot time). Returns the path.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".gif", ".mp4"):
        raise ValueError(f"{path}: write_rollout writes .gif or .mp4 files, got {path.suffix or 'no suffix'!r}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    canvas = render_rollout(frames, codes, real=real, scale=scale, labels=labels, gap_seconds=gap_seconds)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".gif":
        from PIL import Image

        images = [Image.fromarray(frame) for frame in canvas]
        images[0].save(path, save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)), loop=0,
                       optimize=False)
    else:
        from training.data.video import encode_video

        encode_video(path, canvas, fps=fps, crf=18)
    return path


__all__ = [
    "CAPTION_LINE_HEIGHT",
    "MAX_STEPS",
    "PANEL_GAP",
    "ImaginedRollout",
    "check_world_model",
    "imagine",
    "render_rollout",
    "resize_frames",
    "rollout_psnr",
    "start_frames",
    "to_uint8",
    "write_rollout",
]


def load_vla(folder: str | Path, device: torch.device | str = "cpu"):
    """The LAPA VLA of a `save_pretrained` folder in fp32 eval mode on `device`, with the processor saved beside it
    (a ValueError without one: a rollout formats its prompts with it)."""
    import processing_lapa  # noqa: F401  (registers LAPAProcessor with AutoProcessor, which loads the saved processor)
    from modeling_lapa import LAPAForActionPrediction

    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{folder}: not a folder (expected a save_pretrained LAPA VLA folder)")
    vla = LAPAForActionPrediction.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()
    if vla.processor is None:
        raise ValueError(f"{folder}: no processor beside the model (save it with processor.save_pretrained)")
    return vla


def imagine_beside_real(vla, quantizer, real_frames: np.ndarray, instruction: str, *, gap_frames: int,
                        max_steps: int = 16, path: str | Path | None = None, fps: float = 2.0) -> dict | None:
    """The world model against the simulator: imagine from the first frame of a real episode, one gap at a time, and
    score each imagined frame against the real frame at the same time (`real_frames[k * gap_frames]`).

    `real_frames`: uint8 (T, H, W, 3), one frame per control step. Returns None when the episode is shorter than one
    gap; else {"steps", "psnr" (per step of horizon, dB), "copy_psnr" (the start frame held still, the baseline a
    world model must beat), "codes", "video_path"}, and writes the side-by-side video to `path` when given."""
    if gap_frames < 1:
        raise ValueError(f"gap_frames must be >= 1, got {gap_frames}")
    real = _frames_array(real_frames, "real_frames")[::gap_frames]
    steps = min(max_steps, len(real) - 1)
    if steps < 1:
        return None
    rollout = imagine(vla, quantizer, real[0], instruction, steps)
    real = real[: steps + 1]
    held_still = np.repeat(rollout.frames[:1], steps + 1, axis=0)
    result = {"steps": steps, "psnr": rollout_psnr(rollout.frames, real)[1:].tolist(),
              "copy_psnr": rollout_psnr(held_still, real)[1:].tolist(), "codes": rollout.codes.tolist(),
              "video_path": None}
    if path is not None:
        result["video_path"] = str(write_rollout(path, rollout, real=real, fps=fps))
    return result
