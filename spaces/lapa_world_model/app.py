"""LAPA world model: a Gradio Space that imagines robot futures from one frame and an instruction.

    python spaces/lapa_world_model/app.py                          # http://127.0.0.1:7860, the quickstart's models
    LAPA_VLA=user/lapa-vla LAPA_QUANTIZER=user/lapa-quantizer python spaces/lapa_world_model/app.py --port 8000

Two views of what the two LAPA models learned together, by neural inference alone (no simulator, no camera):

- rollout (API name `rollout`): the latent-pretrained VLA predicts the latent action of the current frame, the
  latent action quantizer's decoder turns it into the frame one gap (`gap_seconds`, 0.6 s) later, and that frame is
  the next input (`training.eval.world_model.imagine`). The closed-loop imagination plays as an MP4 (each frame
  upscaled, the codes that made it written under it: `write_rollout`), and the codes come back as JSON.
- latent explorer (API name `latent_explorer`): the start frame decoded under every code of each slot, the other
  slots at the codes the VLA predicts for it (the paper's Figures 5 and 12; `latent_explorer_images`). A column
  where the frames differ is a code that moves something; the red frame is the VLA's own choice.

Where the code comes from: this project installed (`pip install -e ".[space]"`), else the packages copied next to
this file by `vendor.py` (how the Space is deployed), else the checkout two folders up. Where the models come from:
`LAPA_VLA` / `LAPA_QUANTIZER` (a `save_pretrained` folder or a Hub model id), else `models/vla` and
`models/quantizer` next to this file (`vendor.py --with-models`), else the quickstart's
`outputs/quickstart/lapa/model` and `outputs/quickstart/quantizer/model`. Without them the page opens and says what
is missing. Host and port: `--host` / `--port`, else `GRADIO_SERVER_NAME` / `GRADIO_SERVER_PORT` (set by Hugging
Face Spaces), else 127.0.0.1:7860.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

# Why before importing gradio: nothing is sent or fetched at run time (usage analytics, version checks).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _import_toolkit() -> str:
    """Makes `modeling_lapa`, `processing_lapa` and `training` importable; returns where they were found.

    Why three places: a developer runs the app from the checkout with the project installed; the deployed Space has
    no installed project, only the packages `vendor.py` copied next to this file (found first anyway, since Python
    puts the script's folder first on sys.path); a bare checkout without `pip install -e .` still works."""
    try:
        import modeling_lapa  # noqa: F401
        import training  # noqa: F401
    except ImportError:
        if not (REPO / "modeling_lapa").is_dir():
            raise ImportError(
                "the LAPA toolkit is not importable: install it (pip install -e '.[space]' in the checkout) or copy "
                "it next to app.py with `python spaces/lapa_world_model/vendor.py --output DIR`"
            ) from None
        sys.path.insert(0, str(REPO))
        import modeling_lapa  # noqa: F401
    return str(Path(sys.modules["modeling_lapa"].__file__).resolve().parents[1])


TOOLKIT_ROOT = _import_toolkit()

import processing_lapa  # noqa: E402,F401  (registers the LAPA processor with AutoProcessor: load_vla needs it)
import torch  # noqa: E402

from training.eval.plots import latent_explorer_images  # noqa: E402
from training.eval.world_model import check_world_model, imagine, load_vla, write_rollout  # noqa: E402
from training.labelling import load_quantizer  # noqa: E402

#: Most steps one rollout imagines here: each step is one VLA forward pass and one decode (about 0.1 s for the
#: quickstart's tiny models on a CPU Space), and past ~32 gaps (19 s of robot time) compounding errors leave little
#: to look at. The library's own bound (`world_model.MAX_STEPS`) is far higher.
MAX_SPACE_STEPS = 32
DEFAULT_STEPS = 8
#: Start frames smaller than this are not images of a scene; larger ones are refused before being decoded in full
#: (the models see S x S pixels anyway: 64 for the quickstart).
MIN_SIDE, MAX_SIDE = 8, 4096
MAX_INSTRUCTION_CHARS = 500
#: Rollout video: each frame upscaled this many times (nearest), so that a 64 px frame plays at 256 px.
VIDEO_SCALE = 4
#: Latent explorer layout (pixels): tiles of about EXPLORER_TILE px (frame size times an integer), GAP between them,
#: a left band for the slot labels and a top band for the code labels; the VLA's own code framed in red.
EXPLORER_TILE = 128
EXPLORER_GAP = 6
EXPLORER_LABEL_WIDTH = 56
EXPLORER_LABEL_HEIGHT = 20
OWN_CODE_COLOR = (220, 30, 30)
#: The explorer shows at most this many codes of at most this many slots (the plots' defaults: a grid that fits).
EXPLORER_MAX_CODES = 16
EXPLORER_MAX_SLOTS = 4
SEED = 0
EXAMPLES = HERE / "examples"
QUICKSTART_VLA = Path("outputs/quickstart/lapa/model")
QUICKSTART_QUANTIZER = Path("outputs/quickstart/quantizer/model")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def explorer_tile_scale(image_size: int) -> int:
    """The integer upscaling of the explorer's tiles: about EXPLORER_TILE px each, never below the frame's size."""
    return max(1, EXPLORER_TILE // image_size)


def explorer_canvas_size(num_slots: int, num_codes: int, image_size: int) -> tuple[int, int]:
    """(height, width) of the explorer image for a grid of `num_slots` rows and `num_codes` columns."""
    tile = image_size * explorer_tile_scale(image_size)
    return (EXPLORER_LABEL_HEIGHT + EXPLORER_GAP + num_slots * (tile + EXPLORER_GAP),
            EXPLORER_LABEL_WIDTH + EXPLORER_GAP + num_codes * (tile + EXPLORER_GAP))


# -- models ------------------------------------------------------------------------------------------------------
def resolve_model(spec: str | None, candidates: list[Path], what: str) -> Path:
    """A model folder: `spec` (a folder, or a Hub model id downloaded into the Hub cache), else the first candidate
    folder that exists. FileNotFoundError naming everything tried when there is none."""
    if spec:
        path = Path(spec).expanduser()
        if path.is_dir():
            return path
        if _HUB_ID.match(spec) and not path.exists():
            from huggingface_hub import snapshot_download

            try:
                return Path(snapshot_download(repo_id=spec))
            except Exception as error:  # noqa: BLE001 - offline, unknown id, gated: the message keeps the cause
                raise FileNotFoundError(f"{what} {spec!r}: could not get it from the Hub ({error})") from error
        raise FileNotFoundError(f"{what} {spec!r}: no such folder (and not a Hub model id like user/name)")
    for path in candidates:
        if path.is_dir():
            return path
    raise FileNotFoundError(f"no {what} found (looked in {', '.join(str(p) for p in candidates)})")


@dataclass
class WorldModel:
    """The loaded VLA and quantizer, or why they could not be loaded (shown in the page and by every action)."""

    vla: object = None
    quantizer: object = None
    vla_path: str | None = None
    quantizer_path: str | None = None
    error: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def ready(self) -> bool:
        return self.error is None

    def require(self) -> None:
        if not self.ready:
            raise gr.Error(f"The models are not loaded: {self.error}", title="Models missing")

    def describe(self) -> str:
        if not self.ready:
            return (f"**Models missing.** {self.error}. Run `python -m training.quickstart` (writes "
                    f"`{QUICKSTART_VLA}` and `{QUICKSTART_QUANTIZER}`), or set `LAPA_VLA` and `LAPA_QUANTIZER` to "
                    "`save_pretrained` folders or Hub model ids, then restart the app.")
        config = self.quantizer.config
        gap = getattr(config, "gap_seconds", None)
        return (f"**Models:** VLA `{self.vla_path}`, quantizer `{self.quantizer_path}`: latent actions of "
                f"{config.code_seq_len} codes from a codebook of {config.codebook_size}, frames of "
                f"{config.image_size} x {config.image_size} px, one step = {gap if gap else 'one gap'} s of robot "
                f"time. Code: `{TOOLKIT_ROOT}`.")


def load_world_model(vla_spec: str | None = None, quantizer_spec: str | None = None) -> WorldModel:
    """Loads both models on the CPU (fp32, eval) and checks they were trained together; never raises, so that the
    page opens and tells what is wrong."""
    vla_candidates = [HERE / "models" / "vla", REPO / QUICKSTART_VLA, Path.cwd() / QUICKSTART_VLA]
    quantizer_candidates = [HERE / "models" / "quantizer", REPO / QUICKSTART_QUANTIZER,
                            Path.cwd() / QUICKSTART_QUANTIZER]
    try:
        vla_path = resolve_model(vla_spec, vla_candidates, "VLA (LAPA_VLA)")
        quantizer_path = resolve_model(quantizer_spec, quantizer_candidates, "quantizer (LAPA_QUANTIZER)")
        quantizer, _ = load_quantizer(quantizer_path, device="cpu")
        vla = load_vla(vla_path, device="cpu")
        check_world_model(vla, quantizer)
    except Exception as error:  # noqa: BLE001 - any failure becomes the page's message, not a crash at start
        return WorldModel(error=str(error).rstrip("."))
    return WorldModel(vla, quantizer, str(vla_path), str(quantizer_path))


# -- inputs --------------------------------------------------------------------------------------------------------
def check_image(image) -> np.ndarray:
    """The start frame as uint8 (H, W, 3); gr.Error with what is wrong otherwise."""
    if image is None:
        raise gr.Error("Give a start frame: upload an image or pick one of the examples.", title="No start frame")
    if not isinstance(image, np.ndarray):
        raise gr.Error(f"The start frame must be an image, got {type(image).__name__}.", title="Bad start frame")
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise gr.Error(f"The start frame must be an RGB image (height, width, 3), got shape {image.shape}.",
                       title="Bad start frame")
    if image.dtype != np.uint8:
        raise gr.Error(f"The start frame must have 8-bit pixels (uint8), got {image.dtype}.", title="Bad start frame")
    height, width = image.shape[:2]
    if min(height, width) < MIN_SIDE or max(height, width) > MAX_SIDE:
        raise gr.Error(f"The start frame must be between {MIN_SIDE} and {MAX_SIDE} pixels on each side, got "
                       f"{width} x {height}.", title="Bad start frame")
    return np.ascontiguousarray(image[..., :3])


def check_instruction(instruction) -> str:
    if not isinstance(instruction, str):
        raise gr.Error(f"The instruction must be text, got {type(instruction).__name__}.", title="Bad instruction")
    text = " ".join(instruction.split())
    if not text:
        raise gr.Error("Write an instruction, e.g. 'open the drawer'.", title="Empty instruction")
    if len(text) > MAX_INSTRUCTION_CHARS:
        raise gr.Error(f"The instruction is {len(text)} characters long; at most {MAX_INSTRUCTION_CHARS}.",
                       title="Bad instruction")
    return text


def check_steps(steps) -> int:
    """Steps as an int in [1, MAX_SPACE_STEPS]; a slider sends floats, so 8.0 is 8 but 2.5 is refused."""
    if isinstance(steps, bool) or not isinstance(steps, (int, float, np.integer, np.floating)) or \
            not float(steps).is_integer():
        raise gr.Error(f"steps must be a whole number between 1 and {MAX_SPACE_STEPS}, got {steps!r}.",
                       title="Bad steps")
    if not 1 <= steps <= MAX_SPACE_STEPS:
        raise gr.Error(f"steps must be between 1 and {MAX_SPACE_STEPS}, got {int(steps)}.", title="Bad steps")
    return int(steps)


# -- actions -------------------------------------------------------------------------------------------------------
def make_rollout(world: WorldModel, image, instruction, steps, output_dir: Path):
    """The `rollout` action: (MP4 path, {"instruction", "steps", "gap_seconds", "frame_size", "codes"})."""
    world.require()
    frame, text, count = check_image(image), check_instruction(instruction), check_steps(steps)
    with world.lock:
        torch.manual_seed(SEED)  # greedy codes: the seed is for any sampling a later version adds
        rollout = imagine(world.vla, world.quantizer, frame, text, count)
    gap = rollout.gap_seconds
    output_dir.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(suffix=".mp4", prefix="rollout-", dir=output_dir)  # unique per call
    os.close(handle)
    path = Path(name)
    # Robot time when the quantizer records its gap (0.6 s -> 1.7 fps), else 2 frames per second.
    write_rollout(path, rollout, fps=1.0 / gap if gap else 2.0, scale=VIDEO_SCALE)
    summary = {"instruction": text, "steps": count, "gap_seconds": gap,
               "frame_size": int(world.quantizer.config.image_size), "codes": rollout.codes.tolist()}
    return str(path), summary


def make_explorer(world: WorldModel, image, instruction):
    """The `latent_explorer` action: (grid image uint8, caption). Row k: slot k takes every code in turn, the other
    slots keep the codes the VLA predicts for this frame and instruction; the VLA's own code is framed in red."""
    from PIL import Image, ImageDraw, ImageFont

    world.require()
    frame, text = check_image(image), check_instruction(instruction)
    size = world.quantizer.config.image_size
    with world.lock:
        start = imagine(world.vla, world.quantizer, frame, text, 1)  # the resized frame and the VLA's codes for it
        own = torch.from_numpy(start.codes[0])
        pixels = torch.from_numpy(start.frames[0]).permute(2, 0, 1).float().div(255)
        decoded = latent_explorer_images(world.quantizer, pixels, own, max_codes=EXPLORER_MAX_CODES,
                                         max_slots=EXPLORER_MAX_SLOTS)
    tiles = decoded.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()  # (S, K, H, W, 3)
    num_slots, num_codes = tiles.shape[:2]
    scale = explorer_tile_scale(size)
    tile = size * scale
    height, width = explorer_canvas_size(num_slots, num_codes, size)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    left0 = EXPLORER_LABEL_WIDTH + EXPLORER_GAP
    top0 = EXPLORER_LABEL_HEIGHT + EXPLORER_GAP
    for code in range(num_codes):
        draw.text((left0 + code * (tile + EXPLORER_GAP) + 2, 4), f"code {code}", fill=(0, 0, 0), font=font)
    for slot in range(num_slots):
        top = top0 + slot * (tile + EXPLORER_GAP)
        draw.text((4, top + tile // 2 - 6), f"slot {slot}", fill=(0, 0, 0), font=font)
        for code in range(num_codes):
            left = left0 + code * (tile + EXPLORER_GAP)
            big = np.repeat(np.repeat(tiles[slot, code], scale, axis=0), scale, axis=1)
            canvas.paste(Image.fromarray(big), (left, top))
            if code == int(own[slot]):
                draw.rectangle([left - 3, top - 3, left + tile + 2, top + tile + 2], outline=OWN_CODE_COLOR, width=2)
    config = world.quantizer.config
    shown = []
    if num_codes < config.codebook_size:
        shown.append(f"first {num_codes} of {config.codebook_size} codes")
    if num_slots < config.code_seq_len:
        shown.append(f"first {num_slots} of {config.code_seq_len} slots")
    caption = (f"The frame decoded under every code of each slot, the other slots at the VLA's codes "
               f"{own.tolist()} for *{text}* (framed in red){' (' + ', '.join(shown) + ')' if shown else ''}.")
    return np.asarray(canvas), caption


def _examples() -> list[list[str]]:
    """[[png path, instruction]] from examples/examples.json (written by make_examples.py); [] without it."""
    import json

    table = EXAMPLES / "examples.json"
    if not table.is_file():
        return []
    rows = json.loads(table.read_text())["examples"]
    return [[str(EXAMPLES / name), instruction] for name, instruction in rows if (EXAMPLES / name).is_file()]


# -- page ----------------------------------------------------------------------------------------------------------
def build_demo(world: WorldModel | None = None) -> gr.Blocks:
    """The page. `world` defaults to the models named by LAPA_VLA / LAPA_QUANTIZER (or the default folders)."""
    if world is None:
        world = load_world_model(os.environ.get("LAPA_VLA"), os.environ.get("LAPA_QUANTIZER"))
    output_dir = Path(tempfile.mkdtemp(prefix="lapa-space-"))

    def rollout(image, instruction, steps):
        return make_rollout(world, image, instruction, steps, output_dir)

    def latent_explorer(image, instruction):
        return make_explorer(world, image, instruction)

    def info() -> dict:
        """What the page runs on (for clients and tests): model paths, sizes, the code's location, the bounds."""
        config = world.quantizer.config if world.ready else None
        return {"ready": world.ready, "error": world.error, "toolkit": TOOLKIT_ROOT, "vla": world.vla_path,
                "quantizer": world.quantizer_path, "max_steps": MAX_SPACE_STEPS,
                "image_size": None if config is None else int(config.image_size),
                "codebook_size": None if config is None else int(config.codebook_size),
                "code_seq_len": None if config is None else int(config.code_seq_len),
                "gap_seconds": None if config is None else getattr(config, "gap_seconds", None)}

    with gr.Blocks(title="LAPA world model") as demo:
        gr.Markdown(
            "# LAPA world model\n"
            "Give a robot camera frame and an instruction. The latent-pretrained VLA predicts a **latent action**; "
            "the latent action quantizer's decoder imagines the frame it leads to; that frame is the next input "
            "([LAPA: Latent Action Pretraining from Videos](https://arxiv.org/abs/2410.11758)). "
            "No simulator is involved: what plays is what the two models learned about the task.")
        gr.Markdown(world.describe(), elem_id="model-status")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(label="start frame", type="numpy", image_mode="RGB", sources=["upload", "clipboard"],
                                 height=256)
                instruction = gr.Textbox(label="instruction", value="open the drawer", max_lines=2)
                steps = gr.Slider(1, MAX_SPACE_STEPS, value=DEFAULT_STEPS, step=1,
                                  label=f"steps (1 to {MAX_SPACE_STEPS}; one step = one gap of robot time)")
                with gr.Row():
                    rollout_button = gr.Button("Imagine rollout", variant="primary")
                    explorer_button = gr.Button("Latent explorer")
                examples = _examples()
                if examples:
                    gr.Examples(examples, inputs=[image, instruction], label="Meta-World start frames")
            with gr.Column(scale=2):
                video = gr.Video(label="imagined rollout (codes under each frame)", format="mp4", autoplay=True,
                                 loop=True, height=320)
                codes = gr.JSON(label="latent actions per step")
                explorer = gr.Image(label="latent explorer: rows = slots, columns = codes", type="numpy",
                                    format="png", interactive=False)
                explorer_caption = gr.Markdown()
        rollout_button.click(rollout, [image, instruction, steps], [video, codes], api_name="rollout")
        explorer_button.click(latent_explorer, [image, instruction], [explorer, explorer_caption],
                              api_name="latent_explorer")
        gr.api(info, api_name="info")
    demo.world = world
    return demo


demo = build_demo()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    args = parser.parse_args(argv)
    demo.queue(default_concurrency_limit=1).launch(server_name=args.host, server_port=args.port,
                                                   allowed_paths=[str(EXAMPLES)], show_error=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
