"""The Gradio Space (`spaces/lapa_world_model`), deployed as it deploys: a `vendor.py` copy (app, examples and the
toolkit's code) started from its own folder on 127.0.0.1, with tiny random-init models built in code. Called over
HTTP with `gradio_client` (the rollout video and codes, the latent explorer grid, bad inputs refused with a message)
and looked at with a headless Chromium (Debian's package, installed by `scripts/setup.sh ...,dev`). The input checks
and the missing-models message are also tested in process. Nothing is downloaded."""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from support import REPO_ROOT
from test_world_model import build_quantizer, build_vla
from training.data import decode_video
from training.eval.world_model import imagine, render_rollout

SPACE = REPO_ROOT / "spaces" / "lapa_world_model"
SIZE = 32  # build_quantizer's image_size
CODES, SLOTS = 8, 4  # build_quantizer's codebook_size and code_seq_len (the explorer shows all of them)
MAX_STEPS = 32  # the bound the page states (app.MAX_SPACE_STEPS)
VIDEO_SCALE = 4
# The explorer's layout, as app.py documents it: tiles of the frame size times 128 // S, 6 px apart, a 56 px band of
# slot labels on the left and a 20 px band of code labels on top.
TILE, GAP, LABEL_WIDTH, LABEL_HEIGHT = SIZE * (128 // SIZE), 6, 56, 20
EXAMPLE = SPACE / "examples" / "drawer-open.png"
INSTRUCTION = "open the drawer"
STARTUP_TIMEOUT_S = 120
WINDOW = (1280, 1600)  # the screenshot's width, height
# The server runs with the warnings the test run turns into errors (pyproject.toml) as errors too, so that a
# deprecation our app triggers fails here. Ignored: gradio 6.31's own queue statistics
# (gradio/queueing.py, compute_analytics_summary) set pandas' deprecated 'future.no_silent_downcasting' option, and
# on NumPy < 2 its image postprocessing (gradio/processing_utils.py) probes the deprecated alias `np.bool8`.
SERVER_WARNINGS = ("error::DeprecationWarning,error::FutureWarning,"
                   "ignore:'future.no_silent_downcasting' is deprecated,"
                   "ignore:`np.bool8` is a deprecated alias")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def _wait_until_up(process: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the Space exited with code {process.returncode} while starting:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}config", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the Space did not answer at {url} within {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """A latent-pretrained tiny VLA (with its processor) and its quantizer, saved as the app loads them."""
    root = tmp_path_factory.mktemp("space_models")
    vla, quantizer = build_vla(), build_quantizer()
    vla.save_pretrained(root / "vla")
    vla.processor.save_pretrained(root / "vla")
    quantizer.save_pretrained(root / "quantizer")
    return root


@pytest.fixture(scope="module")
def space(tmp_path_factory, models_dir):
    """The deployable copy, running: {"url", "folder", "log"}; stopped after the module's tests."""
    vendor = _load_module("space_vendor", SPACE / "vendor.py")
    folder = vendor.vendor(tmp_path_factory.mktemp("space") / "lapa-world-model")
    port = _free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("GRADIO_", "LAPA_"))}
    env.update(LAPA_VLA=str(models_dir / "vla"), LAPA_QUANTIZER=str(models_dir / "quantizer"),
               HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONWARNINGS=SERVER_WARNINGS,
               OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)  # the copy must bring its own code (the installed project is still importable)
    log = folder.parent / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port)],
                                   cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_up(process, url, log)
        yield {"url": url, "folder": folder, "log": log}
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def client(space):
    from gradio_client import Client

    return Client(space["url"], verbose=False, download_files=str(space["folder"].parent / "downloads"))


@pytest.fixture(scope="module")
def reference(models_dir):
    """What the Space must compute: the same models and start frame, through the library directly."""
    import processing_lapa  # noqa: F401  (registers the processor with AutoProcessor: load_vla needs it)
    from training.eval.world_model import load_vla
    from training.labelling import load_quantizer

    quantizer, _ = load_quantizer(models_dir / "quantizer")
    vla = load_vla(models_dir / "vla")
    frame = np.asarray(Image.open(EXAMPLE).convert("RGB"))
    return {"vla": vla, "quantizer": quantizer, "frame": frame,
            "rollout": imagine(vla, quantizer, frame, INSTRUCTION, 3)}


@pytest.mark.slow
def test_the_deployed_copy_runs_its_own_code_and_the_given_models(client, space, models_dir):
    info = client.predict(api_name="/info")
    assert info["ready"], info["error"]
    assert Path(info["toolkit"]) == space["folder"]  # the vendored packages, not the checkout's
    assert Path(info["vla"]) == models_dir / "vla" and Path(info["quantizer"]) == models_dir / "quantizer"
    assert (info["image_size"], info["codebook_size"], info["code_seq_len"], info["max_steps"]) == (
        SIZE, CODES, SLOTS, MAX_STEPS)


@pytest.mark.slow
def test_rollout_plays_steps_plus_one_frames_of_the_world_model_with_its_codes(client, reference):
    from gradio_client import handle_file

    video, summary = client.predict(handle_file(EXAMPLE), INSTRUCTION, 3, api_name="/rollout")
    expected = reference["rollout"]
    assert summary["steps"] == 3 and summary["instruction"] == INSTRUCTION and summary["gap_seconds"] == 0.6
    assert summary["codes"] == expected.codes.tolist()  # the VLA's codes, step by step, as the library makes them
    frames, _ = decode_video(video)
    assert len(frames) == 3 + 1
    # The frames are the library's rendering (4x upscaled, codes under each), H.264-compressed.
    rendered = render_rollout(expected, scale=VIDEO_SCALE)
    assert frames.shape == rendered.shape and frames.shape[2] == SIZE * VIDEO_SCALE
    error = np.abs(frames.astype(np.float64) - rendered.astype(np.float64)).mean()
    assert error < 6, f"mean absolute difference {error:.2f} from the library's rendering"
    # ... and the imagination moves: the last frame is not the start frame.
    assert not np.array_equal(expected.frames[-1], expected.frames[0])


@pytest.mark.slow
def test_latent_explorer_is_the_grid_of_every_code_of_every_slot(client, reference):
    from gradio_client import handle_file

    path, caption = client.predict(handle_file(EXAMPLE), INSTRUCTION, api_name="/latent_explorer")
    grid = np.asarray(Image.open(path).convert("RGB"))
    assert grid.shape == (LABEL_HEIGHT + GAP + SLOTS * (TILE + GAP), LABEL_WIDTH + GAP + CODES * (TILE + GAP), 3)
    own = reference["rollout"].codes[0]
    assert str(own.tolist()) in caption

    def tile(slot: int, code: int) -> np.ndarray:
        top, left = LABEL_HEIGHT + GAP + slot * (TILE + GAP), LABEL_WIDTH + GAP + code * (TILE + GAP)
        return grid[top : top + TILE : TILE // SIZE, left : left + TILE : TILE // SIZE]  # back to S x S

    step_one = reference["rollout"].frames[1].astype(int)  # decode(frame, own codes): every slot's own tile
    for slot in range(SLOTS):
        code = int(own[slot])
        assert np.abs(tile(slot, code).astype(int) - step_one).max() <= 1  # batched decode: rounding may differ
        top, left = LABEL_HEIGHT + GAP + slot * (TILE + GAP), LABEL_WIDTH + GAP + code * (TILE + GAP)
        assert tuple(grid[top - 3, left - 3]) == (220, 30, 30)  # the VLA's own code framed in red
        # The test has power: the other codes of the slot decode to other frames.
        assert any(not np.array_equal(tile(slot, c), tile(slot, code)) for c in range(CODES) if c != code)


@pytest.mark.slow
@pytest.mark.parametrize("image, instruction, steps, message", [
    (EXAMPLE, INSTRUCTION, 0, "less than minimum value 1"),
    (EXAMPLE, INSTRUCTION, 1000, f"greater than maximum value {MAX_STEPS}"),
    (EXAMPLE, INSTRUCTION, 2.5, f"whole number between 1 and {MAX_STEPS}"),
    (EXAMPLE, "   ", 3, "Write an instruction"),
    ("tiny.png", INSTRUCTION, 3, "between 8 and 4096 pixels on each side, got 4 x 4"),
], ids=["steps-0", "steps-1000", "steps-fraction", "empty-instruction", "image-too-small"])
def test_bad_inputs_come_back_as_messages(client, space, image, instruction, steps, message):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    if image == "tiny.png":
        image = space["folder"].parent / "tiny.png"
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(image)
    with pytest.raises(AppError) as raised:
        client.predict(handle_file(image), instruction, steps, api_name="/rollout")
    assert message in str(raised.value)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("Chromium is not installed: `bash scripts/setup.sh sim,dev` installs it (Debian: apt-get install "
                "chromium); the Space's screenshot test needs it")


def _headless(space, tmp_path, *args) -> subprocess.CompletedProcess:
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
               "--force-device-scale-factor=1", f"--user-data-dir={tmp_path / 'chromium-profile'}",
               "--virtual-time-budget=8000", f"--window-size={WINDOW[0]},{WINDOW[1]}", *args, space["url"]]
    return subprocess.run(command, capture_output=True, text=True, timeout=90, cwd=tmp_path)


@pytest.mark.slow
def test_the_page_renders_in_a_headless_browser(space, tmp_path, models_dir):
    screenshot = tmp_path / "space.png"
    result = _headless(space, tmp_path, f"--screenshot={screenshot}")
    assert screenshot.is_file(), f"no screenshot (exit {result.returncode}):\n{result.stderr[-3000:]}"
    image = np.asarray(Image.open(screenshot).convert("RGB"))
    assert image.shape == (WINDOW[1], WINDOW[0], 3)
    assert image.astype(np.float64).var() > 0, "the screenshot is blank"
    # The page was built, not just its loading screen: the title, the model line and both actions are in the DOM.
    dom = _headless(space, tmp_path, "--dump-dom").stdout
    for text in ("LAPA world model", "Imagine rollout", "Latent explorer", str(models_dir / "vla")):
        assert text in dom, f"{text!r} is not in the rendered page"


# -- in process: the checks and the missing-models page ----------------------------------------------------------
@pytest.fixture(scope="module")
def app_module(tmp_path_factory, monkeypatch_module):
    """app.py imported from the checkout, with model variables pointing nowhere (the page must still build)."""
    missing = tmp_path_factory.mktemp("no_models")
    monkeypatch_module.setenv("LAPA_VLA", str(missing / "vla"))
    monkeypatch_module.setenv("LAPA_QUANTIZER", str(missing / "quantizer"))
    return _load_module("lapa_space_app", SPACE / "app.py")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_without_models_the_page_opens_and_says_what_is_missing(app_module, tmp_path):
    import gradio as gr

    world = app_module.demo.world
    assert not world.ready
    assert "Models missing" in world.describe() and "LAPA_VLA" in world.describe()
    with pytest.raises(gr.Error, match="models are not loaded"):
        app_module.make_rollout(world, np.zeros((64, 64, 3), np.uint8), INSTRUCTION, 2, tmp_path)
    assert isinstance(app_module.demo, gr.Blocks)


def test_input_checks(app_module):
    import gradio as gr

    rgba = np.zeros((16, 20, 4), np.uint8)
    assert app_module.check_image(rgba).shape == (16, 20, 3)  # alpha dropped
    assert app_module.check_image(np.zeros((16, 20), np.uint8)).shape == (16, 20, 3)  # grey to RGB
    for bad, message in [(None, "Give a start frame"), ("frame.png", "must be an image"),
                         (np.zeros((16, 16, 2), np.uint8), "RGB image"), (np.zeros((16, 16, 3)), "8-bit"),
                         (np.zeros((5000, 16, 3), np.uint8), "between 8 and 4096")]:
        with pytest.raises(gr.Error, match=message):
            app_module.check_image(bad)
    assert app_module.check_instruction("  open   the drawer ") == "open the drawer"
    for bad in ("", " \n", None, "x" * 501):
        with pytest.raises(gr.Error):
            app_module.check_instruction(bad)
    assert app_module.check_steps(8.0) == 8 and app_module.check_steps(np.int64(32)) == 32
    for bad in (0, 33, 2.5, True, "3", None):
        with pytest.raises(gr.Error, match="steps must be"):
            app_module.check_steps(bad)
    assert app_module.MAX_SPACE_STEPS == MAX_STEPS


def test_the_readme_pins_the_tested_gradio_and_declares_the_space():
    import gradio

    header = (SPACE / "README.md").read_text().split("---")[1]
    assert f"sdk_version: {gradio.__version__}" in header
    assert f"gradio=={gradio.__version__}" in (SPACE / "requirements.txt").read_text().splitlines()
    for line in ("sdk: gradio", 'python_version: "3.11"', "app_file: app.py", "  - world-model"):
        assert line in header
    examples = json.loads((SPACE / "examples" / "examples.json").read_text())["examples"]
    assert examples and all((SPACE / "examples" / name).is_file() and text for name, text in examples)
