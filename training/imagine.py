"""World-model rollouts from the command line: the VLA's latent action for the current frame, decoded by the
quantizer into the frame one gap later, which becomes the next input (imagination by neural inference alone).

    python -m training.imagine --vla outputs/vla --quantizer outputs/quantizer --image start.png \\
        --instruction "open the drawer" --steps 8 --output rollout.gif
    python -m training.imagine --vla outputs/vla --quantizer outputs/quantizer --dataset outputs/metaworld_mt10 \\
        --episode 3 --frame 0 --steps 8 --output rollout.mp4

With --dataset the start frame is frame --frame of episode --episode (camera --camera-key, default the dataset's
first), the instruction defaults to the episode's task, and the real frames at the same times (every
gap_seconds * fps frames) are shown beside the imagined ones, with the PSNR of each imagined frame against the real
one printed beside the copy-the-start-frame baseline. Frames are read at the quantizer's size (resized while
decoding, as in training); an --image of another size is resized bilinearly (antialiased). The gap is the one the
quantizer was trained with (`gap_seconds` in its config.json; 0.6 s when it does not record one).

Settings: every flag is a field of `ImagineConfig` (`--steps 8` is `steps: 8`), so a YAML file works too
(`--config imagine.yaml`). From Python: `imagine_rollout(ImagineConfig(vla=..., quantizer=..., image=..., ...))`,
or `training.eval.world_model.imagine` with loaded models.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from training.data import gap_in_frames, load_lerobot_dataset
from training.data.errors import DataLayerError
from training.eval.world_model import imagine, load_vla, rollout_psnr, write_rollout
from training.labelling import LabellingError, load_quantizer, resolve_gap_seconds
from training.settings import resolve_stage_config, stage_parser


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class ImagineConfig:
    """Every setting of a rollout: one flag per field (`camera_key` is `--camera-key`), and a key of a `--config`
    YAML file. `vla`, `quantizer`, `output` and one of `image` / `dataset` are required."""

    vla: str | None = field(default=None, metadata=_help(
        "a latent-pretrained LAPA VLA folder (save_pretrained, with its processor). Required"))
    quantizer: str | None = field(default=None, metadata=_help(
        "the LAPA quantizer folder whose codes the VLA was pretrained on. Required"))
    image: str | None = field(default=None, metadata=_help("start frame: an image file (PNG, JPEG, ...)"))
    dataset: str | None = field(default=None, metadata=_help(
        "start frame from a LeRobot dataset (folder or Hub repo id), with the real rollout beside the imagined one"))
    episode: int = field(default=0, metadata=_help("--dataset: the episode index (default: 0)"))
    frame: int = field(default=0, metadata=_help("--dataset: the start frame's index in the episode (default: 0)"))
    camera_key: str | None = field(default=None, metadata=_help(
        "--dataset: camera, full name or last part; default: the dataset's first camera"))
    instruction: str | None = field(default=None, metadata=_help(
        "the instruction; default with --dataset: the episode's task (required with --image)"))
    steps: int = field(default=8, metadata=_help("gaps to imagine (default: 8)"))
    output: str | None = field(default=None, metadata=_help("the .gif or .mp4 to write. Required"))
    fps: float | None = field(default=None, metadata=_help(
        "frames per second of the output; default: 1 / gap_seconds (robot time)"))
    scale: int = field(default=4, metadata=_help("upscaling of each frame, nearest neighbour (default: 4)"))
    do_sample: bool = field(default=False, metadata=_help(
        "sample the latent codes instead of taking the most likely ones (default: greedy)"))
    temperature: float = field(default=1.0, metadata=_help("sampling temperature with --do-sample (default: 1.0)"))
    seed: int = field(default=0, metadata=_help("seed of the sampling (default: 0)"))
    cpu: bool = field(default=False, metadata=_help("run on CPU even if a GPU is available"))

    def __post_init__(self):
        # Values from YAML and the command line are parsed like YAML (`--instruction 3` is the int 3).
        for name in ("vla", "quantizer", "image", "dataset", "camera_key", "instruction", "output"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike, int, float)):
                raise ValueError(f"{name} must be a string, got {value!r}")
            setattr(self, name, None if value is None else str(value))
        for name in ("vla", "quantizer", "output"):
            if getattr(self, name) is None:
                raise ValueError(f"--{name} is required")
        if (self.image is None) == (self.dataset is None):
            raise ValueError("give the start frame with exactly one of --image FILE and --dataset LEROBOT_DIR")
        if self.image is not None and self.instruction is None:
            raise ValueError("--instruction is required with --image")
        for name in ("episode", "frame", "steps", "scale", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.episode < 0 or self.frame < 0:
            raise ValueError(f"--episode and --frame must be >= 0, got {self.episode} and {self.frame}")
        for name in ("fps", "temperature"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")


def build_parser():
    parts = __doc__.split("\n\n", 1)
    return stage_parser(ImagineConfig, prog="imagine", description=parts[0], epilog=parts[1],
                        exclusive=[("image", "dataset")])


def resolve_config(argv: list[str] | None = None) -> ImagineConfig:
    """defaults <- YAML file (`--config`) <- command line, into an `ImagineConfig`; ValueError on a bad setting."""
    return resolve_stage_config(ImagineConfig, build_parser(), argv)


def real_frames(config: ImagineConfig, image_size: int, gap_seconds: float) -> dict:
    """--dataset: the start frame and the real frames every gap after it (as many as the episode holds, up to
    `steps`), at the quantizer's size, with the instruction and where they came from."""
    source = load_lerobot_dataset(config.dataset, episodes=[config.episode])
    camera = source.resolve_camera_key(config.camera_key)
    length = source.episode_length(config.episode)
    if config.frame >= length:
        raise ValueError(f"--frame {config.frame} is past the end of episode {config.episode} ({length} frames)")
    gap = gap_in_frames(gap_seconds, source.meta.fps)
    indices = np.arange(config.frame, length, gap)[: config.steps + 1]
    frames = source.read_frames(config.episode, camera, indices, size=image_size)
    instruction = config.instruction if config.instruction is not None else source.episode_task(
        config.episode, config.frame)
    return {"frames": frames, "indices": indices, "instruction": instruction, "camera": camera, "gap_frames": gap,
            "fps": float(source.meta.fps)}


def _start_image(path: str) -> np.ndarray:
    from PIL import Image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--image {path}: no such file")
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _report(rollout, real: dict | None) -> dict:
    """Prints the codes of each step and, with real frames, the PSNR per step; returns the numbers."""
    result = {"codes": rollout.codes.tolist()}
    lines = [f"instruction: {rollout.instruction!r}"]
    if real is None:
        lines += [f"step {k + 1}: codes {' '.join(map(str, codes))}" for k, codes in enumerate(rollout.codes)]
    else:
        count = len(real["frames"])
        scores = rollout_psnr(rollout.frames[:count], real["frames"])
        copy = rollout_psnr(np.repeat(rollout.frames[:1], count, axis=0), real["frames"])
        result.update(psnr=scores[1:].tolist(), copy_psnr=copy[1:].tolist(), real_frames=real["indices"].tolist())
        lines.append(f"camera {real['camera']}, real frames {real['indices'].tolist()} ({real['gap_frames']} apart "
                     f"at {real['fps']:g} fps); PSNR in dB against the real frame, beside the start frame's:")
        for k, codes in enumerate(rollout.codes):
            score = f"PSNR {scores[k + 1]:6.2f} dB (start frame {copy[k + 1]:6.2f} dB)" if k + 1 < count else \
                "past the episode's end"
            lines.append(f"step {k + 1}: codes {' '.join(map(str, codes))}  {score}")
    print("\n".join(lines))
    return result


def imagine_rollout(config: ImagineConfig) -> dict:
    """Loads the models, imagines `config.steps` gaps from the start frame and writes `config.output`.

    Returns {"output", "codes" (steps lists of s codes), "gap_seconds"} and, with --dataset, "psnr" and
    "copy_psnr" (per step that the episode still covers) and "real_frames" (their frame indices). Raises
    ValueError / FileNotFoundError / LabellingError / DataLayerError when it cannot run.
    """
    device = torch.device("cuda" if torch.cuda.is_available() and not config.cpu else "cpu")
    quantizer, record = load_quantizer(config.quantizer, device=device)
    gap_seconds, _ = resolve_gap_seconds(None, quantizer.config, record["path"])
    vla = load_vla(config.vla, device)
    real = None
    if config.dataset is not None:
        real = real_frames(config, quantizer.config.image_size, gap_seconds)
        start, instruction = real["frames"][0], real["instruction"]
    else:
        start, instruction = _start_image(config.image), config.instruction
    generator = torch.Generator().manual_seed(config.seed)
    rollout = imagine(vla, quantizer, start, instruction, config.steps, do_sample=config.do_sample,
                      temperature=config.temperature, generator=generator)
    rollout.gap_seconds = gap_seconds
    result = _report(rollout, real)
    write_rollout(config.output, rollout, fps=config.fps or 1.0 / gap_seconds, scale=config.scale,
                  real=None if real is None else real["frames"])
    print(f"wrote {config.output}")
    return {"output": config.output, "gap_seconds": gap_seconds, **result}


def main(argv: list[str] | None = None) -> int:
    try:
        config = resolve_config(argv)
        imagine_rollout(config)
    except (ValueError, FileNotFoundError, KeyError, LabellingError, DataLayerError) as error:
        print(f"imagine: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
