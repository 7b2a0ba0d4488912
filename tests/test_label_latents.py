"""`training/label_latents.py`: every frame labelled exactly once with the quantizer's codes, the source kept, the
output readable by our reader and by `datasets`, and a 2-process run killed and resumed equal to a 1-process run;
the gap taken from the flag, else the quantizer's config, else the default; settings from a YAML file or a
`LabellingConfig`; the layout of the labels handed on through `LatentLabelLayout`.

Real subprocesses (`python training/label_latents.py`, `accelerate launch` with 2 CPU processes), real H.264
videos written by our writer, a tiny random quantizer saved with save_pretrained; no mocks.
"""

from __future__ import annotations

import filecmp
import json
import subprocess
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from support import REPO_ROOT, accelerate_launch
from data_fixtures import build_v21_dataset, synthetic_frames

from modeling_lapa import LAPAQuantizerConfig, LAPAQuantizerModel
from training.data import (
    LABELLING_INFO_KEY,
    UNLABELLED_CODE,
    FramePairDataset,
    LatentLabelLayout,
    LeRobotDatasetWriter,
    load_lerobot_dataset,
)
from training.label_latents import LabellingConfig, build_parser, label_latents, resolve_config
from training.label_latents import main as label_main
from training.labelling import DEFAULT_GAP_SECONDS, WORK_DIR_NAME, LabellingError, resolve_gap_seconds

LENGTHS = (10, 7, 12, 5, 9)  # 43 frames; at 10 fps and a 0.3 s gap the last 3 frames of each pair with the last
TASKS = ("push the block left", "open the drawer")
FPS = 10
GAP_SECONDS = 0.3  # the quantizer's config.json records it (trained with it), so the runs take it from there
BATCH_SIZE = 4  # smaller than most episodes: several chunks per episode


def _quantizer_config(**overrides) -> LAPAQuantizerConfig:
    settings = dict(hidden_size=32, quant_dim=8, codebook_size=8, code_seq_len=4, image_size=32, patch_size=4,
                    spatial_depth=1, temporal_depth=1, num_heads=2, head_dim=16, gap_seconds=GAP_SECONDS)
    return LAPAQuantizerConfig(**{**settings, **overrides})


def _write_source(root: Path, lengths=LENGTHS) -> None:
    """Two cameras at 40 x 48 px (the quantizer takes 32 x 32: labelling resizes), states, actions, two tasks."""
    rng = np.random.default_rng(7)
    with LeRobotDatasetWriter(root, fps=FPS, robot_type="fixture_arm", crf=18) as writer:
        for episode, length in enumerate(lengths):
            frames = {
                "observation.images.top": synthetic_frames(length, seed=episode, height=40, width=48),
                "observation.images.wrist": synthetic_frames(length, seed=episode + 9, height=40, width=48),
            }
            writer.add_episode(
                frames, task=TASKS[episode % 2], state=rng.normal(size=(length, 4)),
                action=rng.normal(size=(length, 3)), episode_metadata={"success": episode % 2 == 0},
            )


# The in-process runs use one thread, like each process of the 2-process runs (OMP_NUM_THREADS=1).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("label_latents")
    _write_source(root / "source")
    torch.manual_seed(3)  # a random model whose codes vary over these frames
    LAPAQuantizerModel(_quantizer_config()).save_pretrained(root / "quantizer")
    return root


def _common_args(workspace: Path, output: Path) -> list[str]:
    return ["--dataset", str(workspace / "source"), "--quantizer", str(workspace / "quantizer"),
            "--output", str(output), "--batch-size", str(BATCH_SIZE)]


def _launch_two_processes(workspace: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    return accelerate_launch(REPO_ROOT / "training" / "label_latents.py", *_common_args(workspace, output),
                             "--num-workers", "0", "--episodes-per-shard", "1", *extra, timeout=300)


@pytest.fixture(scope="module")
def single_run(workspace):
    """The reference: one process (this one: the script's entry point runs under `accelerate launch` below), one
    decoding worker process."""
    output = workspace / "single"
    assert label_main(_common_args(workspace, output) + ["--num-workers", "1"]) == 0
    return output


def _data_table(root: Path):
    return pq.read_table(root / "data/chunk-000/file-000.parquet")


def _direct_codes(workspace: Path) -> dict[int, np.ndarray]:
    """The codes of every frame pair computed here: the data layer's pairs, `model.encode` in chunks from each
    episode's start."""
    model = LAPAQuantizerModel.from_pretrained(workspace / "quantizer").eval()
    pairs = FramePairDataset(load_lerobot_dataset(workspace / "source"), gap_seconds=GAP_SECONDS, image_size=32)
    codes = {}
    for episode in pairs.episode_indices:
        items = list(pairs.iter_episode(episode))
        assert [item["target_frame_index"] for item in items][-3:] == [len(items) - 1] * 3  # clamped at the end
        chunks = []
        with torch.no_grad():
            for start in range(0, len(items), BATCH_SIZE):
                batch = torch.stack([item["pixel_values"] for item in items[start : start + BATCH_SIZE]])
                chunks.append(model.encode(batch).codes)
        codes[episode] = torch.cat(chunks).numpy()
    return codes


def test_single_process_labels_every_frame_once_with_the_quantizers_codes(workspace, single_run):
    source, labelled = _data_table(workspace / "source"), _data_table(single_run)
    assert labelled.column("index").to_pylist() == source.column("index").to_pylist() == list(range(sum(LENGTHS)))
    codes = np.array(labelled.column("latent_action").to_pylist())
    assert codes.shape == (sum(LENGTHS), 4) and codes.min() >= 0 and codes.max() < 8
    episode_of_row = np.array(labelled.column("episode_index").to_pylist())
    direct = _direct_codes(workspace)
    for episode, expected in direct.items():
        np.testing.assert_array_equal(codes[episode_of_row == episode], expected)
    assert len({tuple(row) for row in codes}) > 3  # a meaningful comparison: the codes vary


def test_output_keeps_the_source_frames_columns_tasks_and_metadata(workspace, single_run):
    source_root = workspace / "source"
    source, labelled = _data_table(source_root), _data_table(single_run)
    assert labelled.column_names == source.column_names + ["latent_action"]
    assert labelled.select(source.column_names).equals(source)  # every original column, same rows, same order
    for video in sorted((source_root / "videos").rglob("*.mp4")):
        copy = single_run / video.relative_to(source_root)
        assert filecmp.cmp(video, copy, shallow=False)  # frames kept as they are: no re-encode
    assert filecmp.cmp(source_root / "meta/tasks.parquet", single_run / "meta/tasks.parquet", shallow=False)
    source_episodes = pq.read_table(source_root / "meta/episodes/chunk-000/file-000.parquet")
    labelled_episodes = pq.read_table(single_run / "meta/episodes/chunk-000/file-000.parquet")
    assert labelled_episodes.select(source_episodes.column_names).equals(source_episodes)
    assert labelled_episodes.column("stats/latent_action/count").to_pylist() == [[n] for n in LENGTHS]

    source_info = json.loads((source_root / "meta/info.json").read_text())
    info = json.loads((single_run / "meta/info.json").read_text())
    assert info["features"] == {**source_info["features"], "latent_action": {
        "dtype": "int64", "shape": [4], "names": ["slot_0", "slot_1", "slot_2", "slot_3"]}}
    assert info["total_frames"] == source_info["total_frames"]
    record = info[LABELLING_INFO_KEY]
    assert record["gap_seconds"] == GAP_SECONDS and record["gap_frames"] == 3
    assert record["gap_seconds_from"] == str((workspace / "quantizer").resolve() / "config.json")
    assert record["camera_key"] == "observation.images.top" and record["image_size"] == 32
    assert record["quantizer"]["codebook_size"] == 8 and len(record["quantizer"]["weights_sha256"]) == 64
    assert record["labelled_frames"] == sum(LENGTHS) and record["skipped_episodes"] == []
    stats = json.loads((single_run / "meta/stats.json").read_text())
    assert stats["latent_action"]["count"] == [sum(LENGTHS)]
    assert set(json.loads((source_root / "meta/stats.json").read_text())) < set(stats)
    assert not (single_run / WORK_DIR_NAME).exists()


def test_output_loads_with_our_reader_and_with_datasets(workspace, single_run):
    labelled = load_lerobot_dataset(single_run)
    original = load_lerobot_dataset(workspace / "source")
    codes = np.array(_data_table(single_run).column("latent_action").to_pylist())
    for position in (0, 9, 10, 42):
        item, source_item = labelled[position], original[position]
        assert item["latent_action"].dtype == torch.int64
        assert item["latent_action"].tolist() == codes[position].tolist()
        assert item["task"] == source_item["task"]
        assert torch.equal(item["action"], source_item["action"])
        assert torch.equal(item["observation.images.wrist"], source_item["observation.images.wrist"])

    table = datasets.load_dataset("parquet", data_files=str(single_run / "data/*/*.parquet"), split="train")
    assert table.features["latent_action"] == datasets.List(datasets.Value("int64"), length=4)
    assert len(table) == sum(LENGTHS)
    assert table[12]["latent_action"] == codes[12].tolist()


def test_two_processes_killed_and_resumed_equal_one_process(workspace, single_run):
    output = workspace / "two_processes"
    # The main process SIGKILLs itself after its first shard; the launcher then stops the other one.
    killed = _launch_two_processes(workspace, output, "--debug-kill-after-shards", "1")
    assert killed.returncode != 0
    work_dir = output / WORK_DIR_NAME
    done = sorted(p.name for p in work_dir.glob("shard-*.parquet"))
    assert 1 <= len(done) < len(LENGTHS), done
    assert not (output / "meta/info.json").exists()
    # what a process killed while writing leaves behind: the resume must ignore and delete it
    (work_dir / "shard-000004.parquet.tmp-1-12345").write_bytes(b"half a parquet file")

    resumed = _launch_two_processes(workspace, output)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming: {len(done)} of {len(LENGTHS)} shards already labelled (1 half-written" in resumed.stderr

    single, double = _data_table(single_run), _data_table(output)
    assert double.equals(single)  # every frame once, same order, same codes
    for name in ("info.json", "stats.json"):
        assert json.loads((output / "meta" / name).read_text()) == json.loads((single_run / "meta" / name).read_text())
    assert not work_dir.exists()


def _run_in_process(args: list[str], capsys) -> tuple[int, str]:
    code = label_main(args + ["--num-workers", "0"])
    return code, capsys.readouterr().err


def test_resume_refusals_and_in_process_resume_with_max_shards(workspace, single_run, capsys):
    output = workspace / "in_process"
    args = _common_args(workspace, output) + ["--episodes-per-shard", "2"]
    assert _run_in_process(args + ["--max-shards-per-process", "1"], capsys)[0] == 0
    assert sorted(p.name for p in (output / WORK_DIR_NAME).glob("shard-*")) == ["shard-000000.parquet"]

    code, err = _run_in_process(args + ["--no-resume"], capsys)
    assert code == 2 and "unfinished labelling run" in err and "--overwrite" in err
    code, err = _run_in_process(args + ["--gap-seconds", "0.4"], capsys)
    assert code == 2 and "other settings (gap_seconds: 0.3 -> 0.4)" in err

    assert _run_in_process(args, capsys)[0] == 0  # resumes by default
    assert _data_table(output).equals(_data_table(single_run))  # shards of 2 episodes: same codes
    code, err = _run_in_process(args, capsys)
    assert code == 2 and "exists and is a labelled dataset; pass --overwrite" in err
    assert _run_in_process(args + ["--overwrite", "--camera-key", "wrist"], capsys)[0] == 0
    info = json.loads((output / "meta/info.json").read_text())
    assert info[LABELLING_INFO_KEY]["camera_key"] == "observation.images.wrist"


def test_clear_errors(workspace, tmp_path, capsys):
    base = _common_args(workspace, tmp_path / "out")

    code, err = _run_in_process(base + ["--camera-key", "side"], capsys)
    assert code == 2 and "'side' not found" in err and "observation.images.wrist" in err

    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    code, err = _run_in_process(base[:2] + ["--quantizer", str(not_a_model)] + base[4:], capsys)
    assert code == 2 and "no config.json" in err
    (not_a_model / "config.json").write_text(json.dumps({"model_type": "bert"}))
    code, err = _run_in_process(base[:2] + ["--quantizer", str(not_a_model)] + base[4:], capsys)
    assert code == 2 and "model_type 'bert'" in err and "not a LAPA quantizer" in err

    code, err = _run_in_process(base[:4] + ["--output", str(workspace / "source" / "labelled")], capsys)
    assert code == 2 and "is the source dataset or inside" in err

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    code, err = _run_in_process(base[:4] + ["--output", str(occupied)], capsys)
    assert code == 2 and "exists and is not empty; pass --overwrite" in err
    code, err = _run_in_process(base[:4] + ["--output", str(occupied), "--overwrite"], capsys)
    assert code == 2 and "is not a labelled dataset or an unfinished labelling run" in err
    assert (occupied / "notes.txt").exists()

    code, err = _run_in_process(["--dataset", str(tmp_path / "missing")] + base[2:], capsys)
    assert code == 2 and "neither an existing folder nor a Hub repo id" in err
    assert not (tmp_path / "out").exists()  # no error left anything behind


def test_episode_too_short_for_the_gap_fails_or_is_kept_unlabelled(workspace, tmp_path, capsys):
    source = tmp_path / "source"
    _write_source(source, lengths=(6, 2, 5))  # episode 1 has 2 frames, the gap is 3
    args = ["--dataset", str(source), "--quantizer", str(workspace / "quantizer"), "--output", str(tmp_path / "out")]
    code, err = _run_in_process(args, capsys)
    assert code == 2 and "episode 1" in err and "has 2 frames but the pair gap is 3" in err

    assert _run_in_process(args + ["--skip-corrupt"], capsys)[0] == 0
    table = _data_table(tmp_path / "out")
    assert table.num_rows == 13  # no row dropped
    codes = np.array(table.column("latent_action").to_pylist())
    episode = np.array(table.column("episode_index").to_pylist())
    assert (codes[episode == 1] == UNLABELLED_CODE).all() and (codes[episode != 1] >= 0).all()
    record = json.loads((tmp_path / "out/meta/info.json").read_text())[LABELLING_INFO_KEY]
    assert record["unlabelled_frames"] == 2 and record["labelled_frames"] == 11
    assert [(s["episode_index"], s["error_type"]) for s in record["skipped_episodes"]] == [
        (1, "GapLongerThanEpisodeError")]
    assert load_lerobot_dataset(tmp_path / "out")[7]["latent_action"].tolist() == [UNLABELLED_CODE] * 4


def test_relabelling_a_labelled_dataset_replaces_its_labels(workspace, single_run, tmp_path, capsys):
    output = tmp_path / "relabelled"
    args = ["--dataset", str(single_run), "--quantizer", str(workspace / "quantizer"), "--output", str(output),
            "--batch-size", str(BATCH_SIZE)]
    assert _run_in_process(args, capsys)[0] == 0
    assert _data_table(output).equals(_data_table(single_run))  # one latent_action column, the same codes
    assert list(json.loads((output / "meta/info.json").read_text())["features"])[-1] == "latent_action"
    table = datasets.load_dataset("parquet", data_files=str(output / "data/*/*.parquet"), split="train")
    assert table.column_names.count("latent_action") == 1


def test_v21_source_becomes_a_v30_dataset_with_the_same_frames(workspace, tmp_path, capsys):
    source, output = tmp_path / "v21", tmp_path / "out"
    truth = build_v21_dataset(source)  # one parquet and one mp4 per episode, jsonl metadata
    args = ["--dataset", str(source), "--quantizer", str(workspace / "quantizer"), "--output", str(output),
            "--batch-size", str(BATCH_SIZE)]
    assert _run_in_process(args, capsys)[0] == 0
    info = json.loads((output / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info[LABELLING_INFO_KEY]["source"]["codebase_version"] == "v2.1"
    camera = truth["cameras"][0]
    for episode in range(len(truth["lengths"])):  # each episode's files, hard-linked under v3.0 names
        old_video = source / f"videos/chunk-000/{camera}/episode_{episode:06d}.mp4"
        assert filecmp.cmp(old_video, output / f"videos/{camera}/chunk-000/file-{episode:03d}.mp4", shallow=False)
        old_rows = pq.read_table(source / f"data/chunk-000/episode_{episode:06d}.parquet")
        new_rows = pq.read_table(output / f"data/chunk-000/file-{episode:03d}.parquet")
        assert new_rows.select(old_rows.column_names).equals(old_rows)

    original, labelled = load_lerobot_dataset(source), load_lerobot_dataset(output)
    assert labelled.meta.codebase_version == "v3.0" and len(labelled) == len(original) == sum(truth["lengths"])
    for position in range(len(original)):
        item, source_item = labelled[position], original[position]
        assert item["task"] == source_item["task"] and torch.equal(item["action"], source_item["action"])
        assert torch.equal(item[camera], source_item[camera])
    model = LAPAQuantizerModel.from_pretrained(workspace / "quantizer").eval()
    pairs = FramePairDataset(original, gap_seconds=GAP_SECONDS, image_size=32)
    items = list(pairs.iter_episode(1))
    with torch.no_grad():
        expected = torch.cat([model.encode(torch.stack([i["pixel_values"] for i in items[s : s + BATCH_SIZE]])).codes
                              for s in range(0, len(items), BATCH_SIZE)])
    start = truth["lengths"][0]
    assert torch.equal(torch.stack([labelled[start + t]["latent_action"] for t in range(len(items))]), expected)
    table = datasets.load_dataset("parquet", data_files=str(output / "data/*/*.parquet"), split="train")
    assert len(table) == sum(truth["lengths"]) and table.features["latent_action"].length == 4


def test_a_merge_killed_midway_is_redone_from_the_shards(workspace, single_run, capsys):
    output = workspace / "merge_killed"
    args = _common_args(workspace, output)
    assert _run_in_process(args + ["--keep-work-dir"], capsys)[0] == 0
    # what a kill during the merge leaves: info.json not yet written, a data file half-written, a temporary file
    (output / "meta/info.json").unlink()
    data_file = output / "data/chunk-000/file-000.parquet"
    data_file.write_bytes(data_file.read_bytes()[:100])
    stray = data_file.with_name(data_file.name + ".tmp-4242")
    stray.write_bytes(b"partial")

    assert _run_in_process(args, capsys)[0] == 0  # the work dir is there: resumes, nothing to label, merges
    assert _data_table(output).equals(_data_table(single_run))
    assert not stray.exists() and not (output / WORK_DIR_NAME).exists()
    assert json.loads((output / "meta/info.json").read_text()) == json.loads((single_run / "meta/info.json").read_text())


# -- the gap, the settings, the hand-off ----------------------------------------------------------------------
def test_the_gap_is_the_flag_else_the_quantizers_else_the_default():
    trained = _quantizer_config(gap_seconds=0.4)
    assert resolve_gap_seconds(0.5, trained, "/models/q") == (0.5, "--gap-seconds")
    assert resolve_gap_seconds(None, trained, "/models/q") == (0.4, "/models/q/config.json")
    unknown = _quantizer_config(gap_seconds=None)  # a quantizer saved before the field: its gap is unknown
    assert resolve_gap_seconds(None, unknown, "/models/q") == (DEFAULT_GAP_SECONDS, "default") == (0.6, "default")
    with pytest.raises(LabellingError, match="positive"):
        resolve_gap_seconds(-0.1, trained, "/models/q")


def test_a_quantizer_without_a_recorded_gap_labels_with_the_default(workspace, tmp_path, capsys):
    source, quantizer = tmp_path / "source", tmp_path / "quantizer"
    _write_source(source, lengths=(8, 9))  # longer than the default gap (6 frames at 10 fps)
    torch.manual_seed(3)
    LAPAQuantizerModel(_quantizer_config(gap_seconds=None)).save_pretrained(quantizer)
    # a training config beside the model is not read: the model's own config is the one record of its gap
    (quantizer / "training_config.json").write_text(json.dumps({"gap_seconds": 0.2}))
    args = ["--dataset", str(source), "--quantizer", str(quantizer), "--output", str(tmp_path / "out")]
    assert _run_in_process(args, capsys)[0] == 0
    record = json.loads((tmp_path / "out/meta/info.json").read_text())[LABELLING_INFO_KEY]
    assert (record["gap_seconds"], record["gap_seconds_from"], record["gap_frames"]) == (0.6, "default", 6)


def test_the_labelled_dataset_hands_its_layout_on(workspace, single_run):
    layout = LatentLabelLayout.read(load_lerobot_dataset(single_run))
    assert layout == LatentLabelLayout(codebook_size=8, code_seq_len=4, gap_seconds=GAP_SECONDS, fps=FPS,
                                       quantizer=str((workspace / "quantizer").resolve()))


def test_settings_from_a_yaml_file_then_the_flags(workspace, tmp_path, capsys):
    settings = {"dataset": str(workspace / "source"), "quantizer": str(workspace / "quantizer"),
                "output": str(tmp_path / "out"), "batch_size": BATCH_SIZE, "camera_key": "wrist",
                "skip_corrupt": True, "gap_seconds": "3e-1"}  # YAML 1.1 reads 3e-1 as a string: still a number
    path = tmp_path / "labelling.yaml"
    path.write_text(yaml.safe_dump(settings))
    config = resolve_config(["--config", str(path), "--no-skip-corrupt", "--num-workers", "0"])
    assert config == LabellingConfig(**{**settings, "skip_corrupt": False, "gap_seconds": 0.3, "num_workers": 0})
    assert resolve_config(["--config", str(path), "--resume"]).resume is True

    path.write_text(yaml.safe_dump({**settings, "batch_sise": 8}))
    code, err = _run_in_process(["--config", str(path)], capsys)
    assert code == 2 and "'batch_sise' (did you mean 'batch_size'?)" in err
    path.write_text(yaml.safe_dump({**settings, "overwrite": True, "resume": False}))
    code, err = _run_in_process(["--config", str(path)], capsys)
    assert code == 2 and "exclude each other" in err
    code, err = _run_in_process(["--dataset", str(workspace / "source")], capsys)
    assert code == 2 and "--quantizer is required" in err
    with pytest.raises(SystemExit):  # on the command line the two are exclusive, as before
        build_parser().parse_args(["--resume", "--overwrite"])
    assert not (tmp_path / "out").exists()


def test_label_latents_takes_a_config_object_or_a_yaml_file(workspace, single_run, tmp_path, capsys):
    config = LabellingConfig(dataset=workspace / "source", quantizer=workspace / "quantizer", output=tmp_path / "a",
                             batch_size=BATCH_SIZE, num_workers=0)
    result = label_latents(config)
    assert result["merged"] and result["output"] == str(tmp_path / "a")
    assert result["record"] == json.loads((tmp_path / "a/meta/info.json").read_text())[LABELLING_INFO_KEY]
    assert _data_table(tmp_path / "a").equals(_data_table(single_run))

    path = tmp_path / "labelling.yaml"
    path.write_text(yaml.safe_dump({"dataset": str(workspace / "source"), "quantizer": str(workspace / "quantizer"),
                                    "output": str(tmp_path / "b"), "batch_size": BATCH_SIZE}))
    assert _run_in_process(["--config", str(path)], capsys)[0] == 0
    assert _data_table(tmp_path / "b").equals(_data_table(single_run))
