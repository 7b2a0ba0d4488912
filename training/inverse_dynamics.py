"""The VPT baseline's inverse dynamics model (IDM): actions from frame pairs, learnt on the few labelled episodes, then
used to pseudo-label every pretraining video with actions (Baker et al. 2022; LAPA's appendix: "ResNet18 followed by
an MLP layer ... trained to predict an action when given two frames ... Adam optimizer with a learning rate 1e-4").

    idm = train_idm(IDMTrainingConfig(dataset="data/metaworld", episodes=[0, 1, 2], output_dir="runs/idm"))
    pseudo_label_dataset(idm, "data/metaworld_mt40", "data/metaworld_mt40_vpt")   # `action` replaced by the IDM's

The two frames are x_t and x_{t+H} with the latent actions' gap H (0.6 s by default): the IDM sees exactly what the
quantizer's encoder sees when it labels frame t, so VPT and LAPA differ only in what the label is (an action regressed
from a few labelled episodes vs a latent code learnt from all videos). Meta-World records one frame per 80 Hz control
step, where adjacent frames differ by under a pixel at 64 px; the expert's actions are smooth over 0.6 s.

The model is ResNet-18's layout (a 7x7 stride-2 stem, a max-pool, four stages of two basic blocks at widths w, 2w, 4w,
8w) on the two RGB frames stacked as 6 channels, global average pooling, and an MLP to the action (normalised by the
training actions' mean and std, which the model keeps as buffers). Its weights are saved as safetensors.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .data import FramePairDataset, load_lerobot_dataset
from .data.files import copy_tree_except, remove_temporary_files, write_bytes_atomically, write_parquet_atomically
from .data.lerobot_format import EPISODES_DIR, INFO_PATH, STATS_PATH, column_to_numpy
from .data.lerobot_legacy import v3_data_files
from .data.stats import compute_vector_stats, stats_to_json

logger = logging.getLogger(__name__)

PSEUDO_ACTIONS_INFO_KEY = "pseudo_actions"  # info.json record of a pseudo-labelled dataset


# --------------------------------------------------------------------------------------------------------- model
class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convolutions with batch norm, and a 1x1 projection when the shape changes."""

    def __init__(self, channels_in: int, channels_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.shortcut = nn.Identity()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(nn.Conv2d(channels_in, channels_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(channels_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


@dataclass
class IDMConfig:
    action_dim: int = 4
    width: int = 64  # ResNet-18: 64; stages are w, 2w, 4w, 8w
    hidden_size: int = 256  # the MLP's hidden layer
    image_size: int = 64
    gap_seconds: float = 0.6


class InverseDynamicsModel(nn.Module):
    """(x_t, x_{t+H}) -> a_t. `forward(pixel_values)`: (B, 2, 3, S, S) float in [0, 1] -> (B, D) normalised
    actions; `predict` returns actions in the data's units."""

    def __init__(self, config: IDMConfig):
        super().__init__()
        self.config = config
        w = config.width
        self.stem = nn.Sequential(nn.Conv2d(6, w, 7, 2, 3, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        stages, channels = [], w
        for i, out in enumerate((w, 2 * w, 4 * w, 8 * w)):
            stages += [BasicBlock(channels, out, 1 if i == 0 else 2), BasicBlock(out, out, 1)]
            channels = out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.Linear(channels, config.hidden_size), nn.ReLU(),
                                  nn.Linear(config.hidden_size, config.action_dim))
        self.register_buffer("action_mean", torch.zeros(config.action_dim))
        self.register_buffer("action_std", torch.ones(config.action_dim))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 5 or pixel_values.shape[1:3] != (2, 3):
            raise ValueError(f"pixel_values must be (B, 2, 3, S, S) frame pairs, got {tuple(pixel_values.shape)}")
        x = pixel_values.flatten(1, 2) * 2.0 - 1.0  # (B, 6, S, S) in [-1, 1]
        features = self.stages(self.stem(x)).mean(dim=(2, 3))
        return self.head(features)

    @torch.no_grad()
    def predict(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self(pixel_values) * self.action_std + self.action_mean

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / "model.safetensors"))
        (folder / "idm_config.json").write_text(json.dumps(dataclasses.asdict(self.config), indent=2))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "InverseDynamicsModel":
        folder = Path(folder)
        if not (folder / "idm_config.json").is_file():
            raise FileNotFoundError(f"{folder} holds no inverse dynamics model (idm_config.json)")
        config = json.loads((folder / "idm_config.json").read_text())
        unknown = sorted(set(config) - {f.name for f in dataclasses.fields(IDMConfig)})
        if unknown:
            raise ValueError(f"{folder / 'idm_config.json'}: unknown keys {unknown}")
        model = cls(IDMConfig(**config))
        model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
        return model.eval()


# ------------------------------------------------------------------------------------------------------ training
@dataclass
class IDMTrainingConfig:
    dataset: str = ""  # the labelled LeRobot dataset
    episodes: list = field(default_factory=list)  # the labelled episodes the IDM learns from
    heldout_episodes: list = field(default_factory=list)  # reported as held-out L1 (never trained on)
    output_dir: str = "runs/idm"
    width: int = 64
    hidden_size: int = 256
    image_size: int = 64
    gap_seconds: float = 0.6
    learning_rate: float = 1e-4  # the paper's
    batch_size: int = 64
    max_steps: int = 2000
    save_every: int = 250  # steps between checkpoints (the latest is kept; a killed run resumes from it)
    seed: int = 0


def _pairs(c: IDMTrainingConfig, source, episodes: list[int]) -> FramePairDataset:
    return FramePairDataset(source, gap_seconds=c.gap_seconds, image_size=c.image_size, output="float",
                            episodes=episodes, episode_cache_size=len(episodes))


def _mean_l1(model: InverseDynamicsModel, pairs: FramePairDataset, batch_size: int = 256) -> list[float]:
    """Mean absolute error per action dimension over every pair, in the data's units."""
    model.eval()
    total, count = None, 0
    loader = torch.utils.data.DataLoader(pairs, batch_size=batch_size)
    for batch in loader:
        error = (model.predict(batch["pixel_values"]) - torch.as_tensor(batch["action"]).float()).abs().sum(0)
        total = error if total is None else total + error
        count += len(batch["pixel_values"])
    model.train()
    return (total / max(count, 1)).tolist()


class _OneProcess:
    """What `training.checkpointing` asks of an Accelerator, for the IDM's single-process loop."""
    is_main_process, process_index, num_processes = True, 0, 1

    @staticmethod
    def wait_for_everyone() -> None:
        pass

    @staticmethod
    def unwrap_model(model: nn.Module) -> nn.Module:
        return model


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The shuffled full batches of one epoch: a function of (seed, epoch) only, so a resumed run continues the same
    order from any step."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def train_idm(c: IDMTrainingConfig) -> InverseDynamicsModel:
    """Trains on the pairs of `c.episodes` with Adam (MSE on normalised actions) and saves the model and its held-out
    L1 in `c.output_dir` (`model/` and `idm_metrics.json`). A finished run is loaded, not trained again; an interrupted
    one resumes from its latest checkpoint (`checkpoints/step-N`, every `c.save_every` steps) with the same result as
    an uninterrupted run."""
    from .checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint

    output = Path(c.output_dir)
    if (output / "model" / "model.safetensors").is_file():
        return InverseDynamicsModel.from_pretrained(output / "model")
    if not c.episodes:
        raise ValueError("the IDM needs labelled episodes to learn from (IDMTrainingConfig.episodes is empty)")
    if c.save_every < 1:
        raise ValueError(f"save_every must be >= 1, got {c.save_every}")
    torch.manual_seed(c.seed)
    source = load_lerobot_dataset(c.dataset)
    train_pairs = _pairs(c, source, sorted(c.episodes))
    actions = np.concatenate([source.episode_actions(e) for e in sorted(c.episodes)])
    model = InverseDynamicsModel(IDMConfig(action_dim=actions.shape[1], width=c.width, hidden_size=c.hidden_size,
                                           image_size=c.image_size, gap_seconds=c.gap_seconds))
    model.action_mean.copy_(torch.as_tensor(actions.mean(0), dtype=torch.float32))
    model.action_std.copy_(torch.as_tensor(actions.std(0) + 1e-6, dtype=torch.float32))
    optimizer = torch.optim.Adam(model.parameters(), lr=c.learning_rate)
    batches_per_epoch = len(train_pairs) // c.batch_size
    if batches_per_epoch == 0:
        raise ValueError(f"{len(train_pairs)} labelled frame pairs are fewer than one batch of {c.batch_size}")
    settings = {k: v for k, v in dataclasses.asdict(c).items() if k not in ("output_dir", "max_steps", "save_every")}
    step, losses, seconds = 0, [], 0.0
    resume_from = latest_checkpoint(output)
    if resume_from is not None:
        state, _ = load_checkpoint(_OneProcess(), resume_from, model=model, optimizer=optimizer)
        if state.get("settings") != settings:
            raise ValueError(f"{resume_from} was written by an IDM run with other settings ({state.get('settings')}, "
                             f"now {settings}); remove {output / 'checkpoints'} to start again")
        step, losses, seconds = state["step"], state["recent_losses"], state["seconds"]
        logger.info("inverse dynamics model: resuming from %s", resume_from)
    model.train()
    start = time.perf_counter() - seconds
    progress = tqdm(total=c.max_steps, initial=step, desc="inverse dynamics model", leave=False)
    while step < c.max_steps:
        epoch, skip = divmod(step, batches_per_epoch)
        batch_sampler = _epoch_batches(len(train_pairs), c.batch_size, c.seed, epoch)[skip:]
        for batch in torch.utils.data.DataLoader(train_pairs, batch_sampler=batch_sampler):
            target = (torch.as_tensor(batch["action"]).float() - model.action_mean) / model.action_std
            loss = torch.nn.functional.mse_loss(model(batch["pixel_values"]), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses = [*losses[-49:], loss.item()]
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{np.mean(losses):.3f}")
            if step % c.save_every == 0 and step < c.max_steps:
                save_checkpoint(_OneProcess(), output, step, model=model, optimizer=optimizer, keep=1, trainer_state={
                    "settings": settings, "recent_losses": losses, "seconds": time.perf_counter() - start})
            if step >= c.max_steps:
                break
    progress.close()
    metrics = {"steps": step, "seconds": time.perf_counter() - start, "final_train_loss": float(np.mean(losses)),
               "train_pairs": len(train_pairs), "train_l1_per_dim": _mean_l1(model, train_pairs)}
    if c.heldout_episodes:
        metrics["heldout_l1_per_dim"] = _mean_l1(model, _pairs(c, source, sorted(c.heldout_episodes)))
        metrics["heldout_mean_baseline_l1_per_dim"] = np.abs(
            np.concatenate([source.episode_actions(e) for e in sorted(c.heldout_episodes)]) - actions.mean(0)
        ).mean(0).tolist()
    model.eval().save_pretrained(output / "model")
    (output / "idm_metrics.json").write_text(json.dumps(metrics, indent=2))
    return model


# ------------------------------------------------------------------------------------------------ pseudo-labels
@torch.no_grad()
def predict_episode_actions(model: InverseDynamicsModel, pairs: FramePairDataset, episode_index: int,
                            batch_size: int = 256) -> np.ndarray:
    """The IDM's action for every frame t of one episode (the pair (x_t, x_{t+H}), clamped at the end): (T, D)."""
    frames = torch.as_tensor(pairs.decode_episode(episode_index)).permute(0, 3, 1, 2)  # (T, H, W, 3) -> (T, 3, S, S)
    count = pairs.num_pairs(episode_index)
    targets = torch.as_tensor([pairs._target(episode_index, t) for t in range(count)])
    out = []
    for start in range(0, count, batch_size):
        t = torch.arange(start, min(start + batch_size, count))
        pixel_values = torch.stack([frames[t], frames[targets[t]]], dim=1).float() / 255.0
        out.append(model.predict(pixel_values))
    return torch.cat(out).numpy().astype(np.float32)


def pseudo_label_dataset(model: InverseDynamicsModel, dataset: str | Path, output: str | Path, *,
                         record: dict | None = None) -> dict:
    """Writes `output`: the LeRobot v3.0 dataset `dataset` with its `action` column replaced by the IDM's actions
    (videos hard-linked, action statistics recomputed, `info.json["pseudo_actions"]` recording the IDM and the L1
    to the true actions where the source had them). Returns that record; a finished output is reused."""
    output, dataset = Path(output), Path(dataset)
    if (output / INFO_PATH).is_file() and PSEUDO_ACTIONS_INFO_KEY in json.loads((output / INFO_PATH).read_text()):
        return json.loads((output / INFO_PATH).read_text())[PSEUDO_ACTIONS_INFO_KEY]
    source = load_lerobot_dataset(dataset)
    if not source.meta.is_v3:
        raise ValueError(f"{dataset}: pseudo-labelling writes LeRobot v3.0 datasets from v3.0 sources")
    c = model.config
    pairs = FramePairDataset(source, gap_seconds=c.gap_seconds, image_size=c.image_size, output="uint8",
                             episode_cache_size=1)
    model.eval()
    predicted, errors = {}, []
    for episode in tqdm(pairs.episode_indices, desc="pseudo-labelling with the IDM", leave=False):
        predicted[episode] = predict_episode_actions(model, pairs, episode)
        truth = source.episode_actions(episode)
        if truth is not None and truth.shape == predicted[episode].shape:
            errors.append(np.abs(predicted[episode] - truth))
    output.mkdir(parents=True, exist_ok=True)
    remove_temporary_files(output)
    _rewrite_actions(source.meta, output, predicted)
    info = json.loads((dataset / INFO_PATH).read_text())
    stats_path = dataset / STATS_PATH
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    all_actions = np.concatenate([predicted[e] for e in sorted(predicted)])
    stats["action"] = stats_to_json({"x": compute_vector_stats(all_actions.astype(np.float64))})["x"]
    write_bytes_atomically(output / STATS_PATH, json.dumps(stats, indent=4).encode())
    copy_tree_except(dataset, output, {".cache", ".git", "data", EPISODES_DIR, INFO_PATH, STATS_PATH},
                     copy_videos=False)
    errors_all = np.concatenate(errors) if errors else None
    info[PSEUDO_ACTIONS_INFO_KEY] = {
        **(record or {}), "source": str(dataset), "idm": dataclasses.asdict(c), "frames": int(len(all_actions)),
        "l1_to_true_actions_per_dim": None if errors_all is None else errors_all.mean(0).tolist(),
    }
    write_bytes_atomically(output / INFO_PATH, json.dumps(info, indent=4).encode())  # last: marks it finished
    return info[PSEUDO_ACTIONS_INFO_KEY]


def _rewrite_actions(meta, output: Path, predicted: dict[int, np.ndarray]) -> None:
    """Each data file with its `action` rows replaced (by episode and frame index); the per-episode action stats of
    meta/episodes recomputed."""
    for source_path, relative in v3_data_files(meta):
        table = pq.read_table(source_path)
        episodes = column_to_numpy(table.column("episode_index")).astype(np.int64)
        frame_index = column_to_numpy(table.column("frame_index")).astype(np.int64)
        rows = np.stack([predicted[int(e)][int(t)] for e, t in zip(episodes, frame_index)]) if len(table) else \
            np.zeros((0, next(iter(predicted.values())).shape[1]), np.float32)
        column = table.schema.get_field_index("action")
        kind = table.schema.field(column).type
        values = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1), kind.value_type), rows.shape[1]) \
            if pa.types.is_fixed_size_list(kind) else pa.array(rows.tolist(), kind)
        write_parquet_atomically(table.set_column(column, table.schema.field(column), values), output / relative)
    for source_path in sorted((meta.root / EPISODES_DIR).glob("chunk-*/file-*.parquet")):
        table = pq.read_table(source_path)
        episodes = table.column("episode_index").to_pylist()
        per_episode = [compute_vector_stats(predicted[e].astype(np.float64)) for e in episodes]
        for stat in per_episode[0] if per_episode else ():
            name = f"stats/action/{stat}"
            if name in table.column_names:
                index = table.column_names.index(name)
                values = pa.array([np.asarray(s[stat]).tolist() for s in per_episode], table.schema.field(index).type)
                table = table.set_column(index, table.schema.field(index), values)
        write_parquet_atomically(table, output / source_path.relative_to(meta.root))
