"""Writes the Space's example start frames: `examples/*.png` and `examples/examples.json` ([[file, instruction]]).

    python spaces/lapa_world_model/make_examples.py                      # from outputs/quickstart/metaworld if it
                                                                         # exists, else rendered from Meta-World
    python spaces/lapa_world_model/make_examples.py --dataset DIR --episodes 0,10,20

Why files and not code: the Space must not need the simulator (MuJoCo, EGL) or the dataset to start, so the frames
are made once here, on a machine with the `sim` extra, and committed with the Space. They are the first frame of a
few episodes of the quickstart's dataset (the same camera and size the models were trained on), or, when that
dataset has not been made, a seeded reset of each task rendered the way `training.envs.metaworld_data` records it
(corner camera, 64 px: the quickstart's `--image-size`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
#: Tasks whose scenes differ at a glance (drawer, window, button, door), with the instructions the data uses.
DEFAULT_TASKS = ("drawer-open-v3", "window-close-v3", "button-press-topdown-v3", "door-open-v3")


def from_dataset(folder: str, episodes: list[int] | None) -> list[tuple[np.ndarray, str, str]]:
    """First frames of `episodes` (default: the first episode of each of up to four tasks) of a LeRobot dataset."""
    from training.data import load_lerobot_dataset

    source = load_lerobot_dataset(folder)
    camera = source.resolve_camera_key(None)
    if episodes is None:
        seen, episodes = set(), []
        for episode in source.episode_indices:
            task = source.episode_task(episode)
            if task not in seen:
                seen.add(task)
                episodes.append(int(episode))
            if len(episodes) == len(DEFAULT_TASKS):
                break
    out = []
    for episode in episodes:
        frame = source.read_frames(episode, camera, np.array([0]))[0]
        out.append((frame, source.episode_task(episode), f"episode{episode:03d}"))
    return out


def rendered(tasks, image_size: int, seed: int) -> list[tuple[np.ndarray, str, str]]:
    """A seeded initial state of each task, rendered like the recorded data."""
    from training.envs.metaworld_env import MetaWorldTaskEnv
    from training.envs.metaworld_tasks import task_instruction

    out = []
    for task in tasks:
        env = MetaWorldTaskEnv(task, image_size=image_size)
        try:
            env.reset(seed)
            frame = next(iter(env.render().values()))
        finally:
            env.close()
        out.append((frame, task_instruction(task), task.removesuffix("-v3")))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="outputs/quickstart/metaworld",
                        help="LeRobot dataset to take first frames from, when it exists")
    parser.add_argument("--episodes", default=None, help="comma-separated episode indices (default: one per task)")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="tasks to render without a dataset")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(HERE / "examples"))
    args = parser.parse_args(argv)
    if Path(args.dataset).is_dir():
        episodes = None if args.episodes is None else [int(e) for e in args.episodes.split(",")]
        examples = from_dataset(args.dataset, episodes)
        source = f"first frames of {args.dataset}"
    else:
        examples = rendered(args.tasks.split(","), args.image_size, args.seed)
        source = f"Meta-World resets (seed {args.seed}, {args.image_size} px; {args.dataset} does not exist)"
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    for old in output.glob("*.png"):
        old.unlink()
    table = []
    for frame, instruction, name in examples:
        Image.fromarray(frame).save(output / f"{name}.png")
        table.append([f"{name}.png", instruction])
    (output / "examples.json").write_text(json.dumps({"source": source, "examples": table}, indent=2) + "\n")
    print(f"wrote {len(table)} examples to {output} ({source})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
