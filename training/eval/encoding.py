"""One pass of a latent action quantizer over held-out frame pairs, kept as numpy columns for the metrics.

    rows = choose_rows(len(pairs), max_pairs, seed)
    encoded = encode_pairs(model.eval(), pairs, rows)   # EncodedPairs: codes, latents, per-pair MSEs, actions

Everything the metrics, probes and plots read comes from this pass, so the model runs once per evaluation (twice
with probe-fitting pairs, the second time encoder only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

#: Side of the average-pooled frame-t thumbnail used as the leakage baseline's features.
LEAKAGE_POOL_SIZE = 8


@dataclass
class EncodedPairs:
    """Everything the metrics need from one pass of the model over N frame pairs (numpy, on CPU).

    dataset_index (N,) position in the dataset given; episode_index, frame_index, target_frame_index (N,) int64
    (target_frame_index is -1 when the items do not carry it); codes (N, s) int64; latents (N, s*q) float32;
    frame_t_features (N, 3*8*8) float32; prediction_mse, prediction_mse_unclamped, copy_mse (N,) float64;
    action_at_t (N, A) float32 or None when the items carry no action.
    """

    dataset_index: np.ndarray
    episode_index: np.ndarray
    frame_index: np.ndarray
    target_frame_index: np.ndarray
    codes: np.ndarray
    latents: np.ndarray
    frame_t_features: np.ndarray
    prediction_mse: np.ndarray
    prediction_mse_unclamped: np.ndarray
    copy_mse: np.ndarray
    action_at_t: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.dataset_index)


class _Rows(torch.utils.data.Dataset):
    """Rows `indices` of a map-style dataset, keeping each row's position in the original dataset."""

    def __init__(self, dataset, indices: np.ndarray):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return {**self.dataset[int(self.indices[i])], "_dataset_index": int(self.indices[i])}


def collate_pairs(items: list[dict]) -> dict:
    """Stacks the fields the evaluation uses; other fields (the task string, ...) are dropped."""
    for key in ("pixel_values", "episode_index", "frame_index"):
        if key not in items[0]:
            raise KeyError(
                f"frame-pair items must carry {key!r} (FramePairDataset items do); this one has {sorted(items[0])}"
            )
    batch = {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "dataset_index": torch.tensor([item["_dataset_index"] for item in items]),
        "episode_index": torch.tensor([int(item["episode_index"]) for item in items]),
        "frame_index": torch.tensor([int(item["frame_index"]) for item in items]),
        "target_frame_index": torch.tensor([int(item.get("target_frame_index", -1)) for item in items]),
    }
    if all("action" in item for item in items):
        actions = [torch.as_tensor(item["action"], dtype=torch.float32).reshape(-1) for item in items]
        batch["action"] = torch.stack(actions)
    return batch


def as_unit_float(pixel_values: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float in [0, 1]; float pixels unchanged (the model checks their range)."""
    if pixel_values.dtype == torch.uint8:
        return pixel_values.float().div_(255.0)
    if not pixel_values.is_floating_point():
        raise TypeError(f"pixel_values must be uint8 or float in [0, 1], got {pixel_values.dtype}")
    return pixel_values


def choose_rows(num_rows: int, max_rows: int | None, seed: int) -> np.ndarray:
    """All row indices, or a seeded random subset of `max_rows` of them, sorted (so that a dataset that caches
    decoded episodes decodes each episode once)."""
    if max_rows is None or max_rows >= num_rows:
        return np.arange(num_rows)
    if max_rows < 1:
        raise ValueError(f"max_pairs must be at least 1, got {max_rows}")
    return np.sort(np.random.default_rng(seed).choice(num_rows, size=max_rows, replace=False))


@torch.no_grad()
def encode_pairs(
    model,
    pairs,
    rows: np.ndarray,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    seed: int = 0,
    description: str = "quantizer eval",
    with_reconstruction: bool = True,
) -> EncodedPairs:
    """One pass of `model` (already in eval mode) over the pairs `rows` of `pairs`, in batches.

    The model's eval-mode forward decodes with the hard codes, so its reconstruction is `decode(frame_t, codes)`.
    `with_reconstruction=False` runs the encoder only (for the probes' fitting pairs); the MSE columns are NaN.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    loader = torch.utils.data.DataLoader(
        _Rows(pairs, rows),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_pairs,
        # A generator of its own: a DataLoader otherwise draws its base seed from the global RNG, and evaluating
        # would change the training run's random stream.
        generator=torch.Generator().manual_seed(seed),
    )
    columns: dict[str, list] = {key: [] for key in EncodedPairs.__dataclass_fields__}
    has_action = True
    for batch in tqdm(loader, desc=description, disable=None, leave=False):
        pixels = as_unit_float(batch["pixel_values"]).to(device)
        frame_t, frame_next = pixels[:, 0].float(), pixels[:, 1].float()
        if with_reconstruction:
            out = model(pixels.to(dtype), return_dict=True)
            prediction = out.reconstruction.float()
            columns["prediction_mse_unclamped"].append((prediction - frame_next).square().mean(dim=(1, 2, 3)))
            columns["prediction_mse"].append((prediction.clamp(0, 1) - frame_next).square().mean(dim=(1, 2, 3)))
        else:
            out = model.encode(pixels.to(dtype))
            not_computed = torch.full((len(pixels),), float("nan"), device=pixels.device)
            columns["prediction_mse_unclamped"].append(not_computed)
            columns["prediction_mse"].append(not_computed)
        columns["copy_mse"].append((frame_t - frame_next).square().mean(dim=(1, 2, 3)))
        columns["frame_t_features"].append(F.adaptive_avg_pool2d(frame_t, LEAKAGE_POOL_SIZE).flatten(1))
        columns["codes"].append(out.codes)
        columns["latents"].append(out.latents.float().flatten(1))
        for key in ("dataset_index", "episode_index", "frame_index", "target_frame_index"):
            columns[key].append(batch[key])
        has_action &= "action" in batch
        if has_action:
            columns["action_at_t"].append(batch["action"])
    arrays = {}
    for key, parts in columns.items():
        if key == "action_at_t" and not has_action:
            arrays[key] = None
            continue
        arrays[key] = torch.cat(parts).cpu().numpy()
    for key in ("prediction_mse", "prediction_mse_unclamped", "copy_mse"):
        arrays[key] = arrays[key].astype(np.float64)
    return EncodedPairs(**arrays)

