"""What a VLA checkpoint was trained on, for its closed-loop evaluation: the camera, the image size and the initial
states its training episodes used.

`training/vla_training.py` saves `training_config.json` beside the model: its `dataset` (LeRobot dataset folders or
Hub ids), `camera_key` (None = the dataset's first camera) and `init_from` (the model it started from, e.g. the
latent-pretrained one, whose own folder may hold its `training_config.json`). The datasets' `meta/info.json` give the
camera feature `observation.images.<camera>` and its image shape; datasets written by
`training.envs.metaworld_data` record each episode's `metaworld_task` and `episode_seed` in their episodes metadata.

    record = training_record("runs/finetune/model")
    observation_settings(record, camera=None, image_size=None)     # {"camera": "corner", "image_size": 64, ...}
    check_seed_overlap(training_episode_seeds("runs/finetune/model"), {"reach-v3": [10**9, ...]})
"""

from __future__ import annotations

import json
from pathlib import Path

#: Name of the training record a VLA folder holds (written by `training/vla_training.py`).
TRAINING_RECORD = "training_config.json"
CAMERA_PREFIX = "observation.images."


def training_record(model_path: str | Path) -> dict | None:
    """The model folder's `training_config.json`, or None (a Hub id, or a model not trained by this project)."""
    path = Path(model_path) / TRAINING_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    return record if isinstance(record, dict) else None


def _local_datasets(record: dict) -> tuple[list[Path], list[str]]:
    """(the record's datasets present here as LeRobot folders, the others)."""
    datasets = record.get("dataset") or []
    datasets = [datasets] if isinstance(datasets, str) else list(datasets)
    local, missing = [], []
    for dataset in datasets:
        path = Path(str(dataset))
        if (path / "meta" / "info.json").is_file():
            local.append(path)
        else:
            missing.append(str(dataset))
    return local, missing


def _camera_feature(features: dict, camera_key: str | None, where: Path) -> str:
    cameras = [key for key, ft in features.items() if ft.get("dtype") in ("video", "image")]
    if not cameras:
        raise ValueError(f"{where}: the dataset has no camera feature")
    if camera_key is None:
        return cameras[0]
    key = camera_key if camera_key.startswith(CAMERA_PREFIX) else CAMERA_PREFIX + camera_key
    if key not in cameras:
        raise ValueError(f"{where}: the training record's camera {camera_key!r} is not in the dataset ({cameras})")
    return key


def _square_size(feature: dict, key: str, where: Path) -> int:
    shape, names = list(feature.get("shape") or []), list(feature.get("names") or [])
    if "height" in names and "width" in names:
        height, width = shape[names.index("height")], shape[names.index("width")]
    elif len(shape) == 3:
        height, width = (shape[1], shape[2]) if shape[0] == 3 else (shape[0], shape[1])
    else:
        raise ValueError(f"{where}: cannot read the image size of {key} from its shape {shape}")
    if height != width:
        raise ValueError(f"{where}: {key} is {height}x{width}; Meta-World renders square images")
    return int(height)


def recorded_observation_settings(record: dict | None) -> dict | None:
    """{"camera", "image_size", "source"} the model was trained with, from its first local dataset's info.json, or
    None when no dataset of the record is here (the camera name alone is then in `record["camera_key"]`)."""
    if not record:
        return None
    local, _ = _local_datasets(record)
    if not local:
        return None
    root = local[0]
    features = json.loads((root / "meta" / "info.json").read_text()).get("features", {})
    key = _camera_feature(features, record.get("camera_key"), root)
    return {"camera": key.removeprefix(CAMERA_PREFIX), "image_size": _square_size(features[key], key, root),
            "source": str(root / "meta" / "info.json")}


def observation_settings(recorded: dict | None, camera: str | None, image_size: int | None, *,
                         default_camera: str = "corner", default_image_size: int = 64) -> dict:
    """The camera and image size to evaluate with: what the user gave, else what was recorded, else the defaults.
    A given value that disagrees with the record is a ValueError naming both (the policy would see other images
    than in training)."""
    if recorded:
        for name, given in (("camera", camera), ("image_size", image_size)):
            if given is not None and given != recorded[name]:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} {given} disagrees with the policy's training data, which used "
                                 f"{name} {recorded[name]!r} ({recorded['source']}); leave {flag} out to use it")
        return {"camera": recorded["camera"], "image_size": recorded["image_size"], "source": recorded["source"]}
    return {"camera": camera or default_camera, "image_size": image_size or default_image_size,
            "source": "given" if camera and image_size else "given and default" if camera or image_size else "default"}


def _record_chain(model_path: str | Path, max_depth: int = 8) -> list[tuple[str, dict]]:
    """(folder, training record) of the model and of the `init_from` models it descends from, nearest first."""
    chain, seen, path = [], set(), str(model_path)
    while path and len(chain) < max_depth:
        key = str(Path(path).resolve()) if Path(path).exists() else path
        if key in seen:
            break
        seen.add(key)
        record = training_record(path)
        if record is None:
            break
        chain.append((path, record))
        path = record.get("init_from")
    return chain


def training_episode_seeds(model_path: str | Path) -> dict:
    """The initial states the model's training data used: {"seeds": {task: {seed: dataset}}, "checked": [dataset
    folders read], "unchecked": [(dataset, why)]}, over the datasets of its training record and of its `init_from`
    chain. Every episode of a dataset counts (its held-out episodes were seen by the run too, as evaluation data)."""
    from training.data import LeRobotDatasetMetadata

    seeds: dict[str, dict[int, str]] = {}
    checked, unchecked = [], []
    for folder, record in _record_chain(model_path):
        local, missing = _local_datasets(record)
        unchecked += [(dataset, f"not a local dataset folder (named by {folder}/{TRAINING_RECORD})")
                      for dataset in missing]
        for root in local:
            if str(root) in checked:
                continue
            episodes = LeRobotDatasetMetadata(root).episodes
            known = [ep for ep in episodes if "episode_seed" in ep and "metaworld_task" in ep]
            if len(known) < len(episodes):
                unchecked.append((str(root), f"{len(episodes) - len(known)} episode(s) record no Meta-World seed"))
            for ep in known:
                seeds.setdefault(str(ep["metaworld_task"]), {})[int(ep["episode_seed"])] = str(root)
            checked.append(str(root))
    return {"seeds": seeds, "checked": checked, "unchecked": unchecked}


def check_seed_overlap(training_seeds: dict, evaluation_seeds: dict[str, list[int]]) -> None:
    """ValueError when an evaluation episode would start from an initial state a training episode of the same task
    started from (`training_seeds` from `training_episode_seeds`, `evaluation_seeds` {task: seeds})."""
    clashes = []
    for task, task_seeds in evaluation_seeds.items():
        used = training_seeds["seeds"].get(task, {})
        overlap = sorted(seed for seed in task_seeds if seed in used)
        if overlap:
            clashes.append(f"{task}: {len(overlap)} seed(s), e.g. {overlap[0]} (in {used[overlap[0]]})")
    if clashes:
        raise ValueError("the evaluation's initial states overlap the policy's training episodes, so success would "
                         "measure memorisation: " + "; ".join(clashes) + ". Choose another --seed, or a dataset "
                         "generated with a run seed below 1000")


__all__ = [
    "TRAINING_RECORD",
    "check_seed_overlap",
    "observation_settings",
    "recorded_observation_settings",
    "training_episode_seeds",
    "training_record",
]
