"""Dataset cards for LeRobot datasets, plain or labelled with latent actions.

    from hub_cards.dataset_cards import dataset_card

    built = dataset_card("outputs/quickstart/metaworld_latent", "me/metaworld-mt10-latent", quantizer_id="me/laq")

The card follows LeRobot's own (`lerobot/datasets/card_template.md`): tag `LeRobot`, `task_categories: robotics`,
a `configs` entry whose `data_files` are the frame tables (`data/*/*.parquet`, so the Hub viewer and
`datasets.load_dataset(repo)` read them), and `meta/info.json` shown under "Dataset Structure". A labelled dataset
also says what its `latent_action` column is, from the `LatentLabelLayout` recorded in `meta/info.json` (codebook
size, codes per frame, gap, fps) and the quantizer that made the labels: the next stage reads exactly that record,
so the card cannot describe labels other than those the data holds.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import DatasetCard, DatasetCardData

from .common import CITATION, DATASET, DEFAULT_LICENSE, PAPER_URL, BuiltCard, CardError, card_text, table

DATA_FILES = "data/*/*.parquet"  # LeRobot's pattern: v3.0 data/chunk-000/file-000.parquet, v2.x episode files
MAX_TASKS_SHOWN = 50


def size_category(frames: int) -> str:
    """The Hub's `size_categories` bucket of a number of rows (frames)."""
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                        (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M")):
        if frames < limit:
            return name
    return "n>100M"


def _metadata(folder: Path):
    """Our reader's view of `meta/` (tasks, episodes, features), with its errors as CardError."""
    from training.data import LeRobotDatasetMetadata
    from training.data.errors import DataLayerError

    try:
        return LeRobotDatasetMetadata(folder)
    except (DataLayerError, KeyError, ValueError, OSError) as error:
        raise CardError(f"{folder}: not a readable LeRobot dataset ({error})") from error


def _latent_layout(meta):
    """The dataset's `LatentLabelLayout`, None when it has no labels; CardError when its labels lack the record."""
    from training.data import LABELLING_INFO_KEY, LATENT_ACTION_KEY, LatentLabelLayout
    from training.data.errors import LabellingRecordError

    if LATENT_ACTION_KEY not in meta.features and LABELLING_INFO_KEY not in meta.info:
        return None
    try:
        return LatentLabelLayout.read(meta)
    except LabellingRecordError as error:
        raise CardError(f"{meta.root}: the card's latent-action section needs the labelling record: {error}") from error


def latent_section(meta, layout, quantizer_id: str | None) -> str:
    """What the `latent_action` column holds and how it was made."""
    from training.data import LABELLING_INFO_KEY, UNLABELLED_CODE

    record = meta.info.get(LABELLING_INFO_KEY) or {}
    quantizer = record.get("quantizer") or {}
    gap_frames = max(1, round(layout.gap_seconds * layout.fps))
    made_by = (f"[{quantizer_id}](https://huggingface.co/{quantizer_id})" if quantizer_id else
               f"`{Path(layout.quantizer).name}` (a local folder when labelled)")
    rows = [
        ["codebook size, |C|", layout.codebook_size],
        ["codes per frame, s", layout.code_seq_len],
        ["gap between the two frames of a pair", f"{layout.gap_seconds:g} s = {gap_frames} frames at {layout.fps:g} fps"],
        ["quantizer", made_by],
        ["quantizer weights digest (sha256 over its weight files)", f"`{quantizer.get('weights_sha256', '')}`"],
        ["labelled frames", record.get("labelled_frames")],
        ["unlabelled frames (all slots -1)", record.get("unlabelled_frames")],
        ["skipped episodes", len(record.get("skipped_episodes") or [])],
    ]
    return "\n".join([
        "## Latent actions", "",
        f"Every frame row has a `latent_action` column: {layout.code_seq_len} int64 codes in [0, "
        f"{layout.codebook_size}), the latent action a [LAPA]({PAPER_URL}) quantizer's encoder gives the frame pair "
        f"(x_t, x_t+{gap_frames}) of the same episode (clamped at the episode's end); {UNLABELLED_CODE} in every "
        "slot of the rows of an episode that could not be labelled. A latent VLA is pretrained to predict them "
        "(`training/pretrain.py`); the full record is `latent_action_labelling` in `meta/info.json`.", "",
        table(["", ""], rows),
    ])


def dataset_card(folder: str | Path, repo_id: str, *, license: str = DEFAULT_LICENSE,
                 quantizer_id: str | None = None) -> BuiltCard:
    """The card of a LeRobot dataset folder: LeRobot's metadata and structure, the tasks, cameras and features, and
    for a labelled dataset its latent actions."""
    folder = Path(folder)
    meta = _metadata(folder)
    layout = _latent_layout(meta)
    version = meta.info.get("codebase_version")
    if not list(folder.glob(DATA_FILES)):
        raise CardError(f"{folder}: no frame tables matching {DATA_FILES}")
    features = [[f"`{key}`", ft.get("dtype"), ft.get("shape")] for key, ft in meta.features.items()]
    tasks = meta.tasks[:MAX_TASKS_SHOWN]
    body = [
        f"# {repo_id.split('/')[-1]}", "",
        "This dataset is in the [LeRobot](https://github.com/huggingface/lerobot) format (codebase version "
        f"{version}), written by the LAPA toolkit.", "",
        "## Dataset Description", "",
        table(["", ""], [["robot type", meta.robot_type], ["episodes", meta.total_episodes],
                         ["frames", meta.total_frames], ["frame rate", f"{meta.fps} fps"],
                         ["cameras", ", ".join(f"`{key}`" for key in meta.camera_keys)],
                         ["tasks", meta.total_tasks]]),
        "", "Tasks: " + "; ".join(f'"{task}"' for task in tasks)
        + (f"; and {len(meta.tasks) - len(tasks)} more" if len(meta.tasks) > len(tasks) else "") + ".", "",
        "- **Paper:** " + (f"[LAPA: Latent Action Pretraining from Videos]({PAPER_URL})" if layout else "n/a"),
        f"- **License:** {license}", "",
    ]
    if layout is not None:
        body += [latent_section(meta, layout, quantizer_id), ""]
    body += [
        "## Usage", "", "```python", "from datasets import load_dataset", "",
        f'frames = load_dataset("{repo_id}", split="train")  # the frame tables (videos are separate MP4 files)',
        "```", "",
        "With the LAPA toolkit (frames decoded from the videos): `training.data.load_lerobot_dataset"
        f'("{repo_id}")`.', "",
        "## Dataset Structure", "", "Features:", "", table(["feature", "dtype", "shape"], features), "",
        "[meta/info.json](meta/info.json):", "```json", json.dumps(meta.info, indent=4), "```", "",
    ]
    if layout is not None:
        body += ["## Citation", "", CITATION]
    tags = ["LeRobot"] + (["lapa", "latent-actions"] if layout is not None else [])
    data = DatasetCardData(license=license, task_categories=["robotics"], tags=tags,
                           size_categories=[size_category(meta.total_frames)],
                           configs=[{"config_name": "default", "data_files": DATA_FILES}])
    return BuiltCard(DatasetCard(card_text(data, "\n".join(body))), DATASET, "dataset", folder, {})
