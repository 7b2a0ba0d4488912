"""Training checkpoints that resume exactly and load without executing code.

A checkpoint is a folder `<output_dir>/checkpoints/step-<N>/`:

    model.safetensors        the (unwrapped) model's weights
    optimizer.pt             the optimizer's state_dict (tensors and plain numbers: read with weights_only=True)
    rank-<r>.pt              per process: RNG states (torch, numpy, python) and any extra tensors (e.g. the
                             quantizer's codebook hit counters), plain containers only
    trainer_state.json       step, data position, config, metrics

It is written into `step-<N>.tmp` and renamed when complete, so a run killed while saving leaves the previous
checkpoint intact and never a half-written one that `latest_checkpoint` would pick.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

CHECKPOINT_PREFIX = "step-"


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "algorithm": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["algorithm"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _model_state(model: torch.nn.Module, trainable_only: bool, keys_only: bool = False) -> dict:
    """The weights a checkpoint stores, as contiguous CPU tensors, each storage once (tied weights are saved under
    their first name; `load_state_dict` restores the tie through the shared module)."""
    if trainable_only:
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    else:
        named = list(model.state_dict(keep_vars=True).items())
    seen, state = set(), {}
    for name, tensor in named:
        key = (tensor.data_ptr(), tuple(tensor.shape)) if tensor.numel() else (name,)
        if key in seen:
            continue
        seen.add(key)
        state[name] = None if keys_only else tensor.detach().contiguous().cpu()
    return state


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:07d}"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and not p.name.endswith(".tmp")
            and (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


def save_checkpoint(
    accelerator,
    output_dir: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    rank_extra: dict | None = None,
    keep: int | None = None,
    trainable_only: bool = False,
) -> Path:
    """Save a checkpoint from every process (collective: call on all ranks). Returns its folder.

    `trainable_only=True` stores only the parameters that train (e.g. LoRA adapters and trainable token rows):
    the frozen rest is rebuilt identically by the run itself (same base weights, same seed) when it resumes."""
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rank_state = {"rng": _rng_state(), "extra": rank_extra or {}}
    torch.save(rank_state, tmp / f"rank-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        state = _model_state(unwrapped, trainable_only)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "trainable_only": str(trainable_only)})
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step}, indent=2))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        if keep:
            root = final.parent
            done = sorted(
                (p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and not p.name.endswith(".tmp")),
                key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]),
            )
            for old in done[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, folder: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Restore model, optimizer and this process's RNG states strictly. Returns (trainer_state, rank_extra)."""
    folder = Path(folder)
    required = ["model.safetensors", "optimizer.pt", "trainer_state.json", f"rank-{accelerator.process_index}.pt"]
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Checkpoint {folder} is incomplete (missing {missing}); was it written by a run with "
            f"{accelerator.num_processes} processes?"
        )
    unwrapped = accelerator.unwrap_model(model)
    state = load_file(str(folder / "model.safetensors"))
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        trainable_only = (handle.metadata() or {}).get("trainable_only") == "True"
    expected = set(_model_state(unwrapped, trainable_only, keys_only=True))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"Checkpoint {folder} does not match the model being trained: missing {missing[:10]}, unexpected "
            f"{unexpected[:10]} (was it written by a run with other settings?)"
        )
    unwrapped.load_state_dict(state, strict=False)  # the key sets were compared exactly above (tied aliases are stored once)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    rank_state = torch.load(folder / f"rank-{accelerator.process_index}.pt", map_location="cpu", weights_only=True)
    _set_rng_state(rank_state["rng"])
    trainer_state = json.loads((folder / "trainer_state.json").read_text())
    return trainer_state, rank_state.get("extra", {})
