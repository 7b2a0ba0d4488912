"""Held-out evaluation of a LAPA vision-language-action model (latent pretraining or action finetuning).

    metrics = evaluate_vla(model, processor, eval_frames, collator, train_targets, target="latent", dataset=name,
                           device=device, max_frames=2000, batch_size=64, seed=0)
    metrics["token_accuracy"], metrics["majority_baseline_accuracy"]

Teacher-forced: the model sees the prompt and the true target tokens before each position and predicts the next
one, each target a softmax over its own block of the vocabulary (the latent codes, or the action bins). The
baseline predicts, at every position, the most frequent training token of that position; for actions, the L1
error of the greedy decoded actions is reported beside that of the majority bins' actions. With action chunks (k > 1)
the positions are the k x D tokens of the chunk (time-major), so the accuracy counts every token of the chunk and the
baseline has its own majority bin for each (step, dimension); the L1 errors average over the whole chunk.
"""

from __future__ import annotations

import numpy as np
import torch


def majority_tokens(train_targets: np.ndarray) -> np.ndarray:
    """The most frequent training token of each target position: train_targets (N, P) int -> (P,) int (the lowest
    token on a tie, `np.argmax`'s rule)."""
    return np.array([np.bincount(column).argmax() for column in train_targets.T])


def _accuracy(hits: np.ndarray, per_position: bool):
    """hits (N, P) bool -> the overall hit rate (float), or per position (list of P, rounded to 4 decimals)."""
    return hits.mean(axis=0).round(4).tolist() if per_position else float(hits.mean())


def majority_accuracy(train_targets: np.ndarray, eval_targets: np.ndarray, per_position: bool = False):
    """Accuracy of predicting, at every target position, the most frequent training token of that position (per
    position with `per_position`). train_targets (N_train, P), eval_targets (N_eval, P), tokens of the block."""
    return _accuracy(eval_targets == majority_tokens(train_targets)[None, :], per_position)


def _target_block(config, target: str) -> tuple[int, int]:
    """(offset, size) of the targets' block in the vocabulary: the latent codes or the action bins."""
    if target == "latent":
        return config.latent_token_offset, config.num_latent_codes
    return config.action_token_offset, config.num_action_bins


@torch.no_grad()
def evaluate_vla(
    model, processor, frames, collate, train_targets: np.ndarray, *, target: str, dataset: str | None, device,
    max_frames: int, batch_size: int, seed: int,
) -> dict:
    """Held-out loss and teacher-forced token accuracy (each target a softmax over its own block), per position,
    against the majority baseline; for actions also the L1 error of the greedy decoded actions.

    Args:
        model: an unwrapped `LAPAForActionPrediction` (its base model under LoRA); put back in train mode after.
        processor: its `LAPAProcessor` (decodes action bins for the L1 errors).
        frames: held-out frames, a map-style dataset of VLA frame items (with `action` for action targets).
        collate: items -> model inputs (the training run's collator: the processor on images, text and targets).
        train_targets: (N_train, P) the training split's target tokens, within the block, for the baseline.
        target: "latent" or "action"; dataset: the dataset's name in the processor's action statistics.
        max_frames: evaluate a seeded random subset of at most this many frames; batch_size: frames per pass.
    Returns:
        {eval_frames, loss, token_accuracy, token_accuracy_per_position, majority_baseline_accuracy,
        majority_baseline_accuracy_per_position} and, for actions, action_l1_teacher_forced and
        majority_baseline_action_l1.
    """
    model.eval()
    count = min(len(frames), max_frames)
    order = np.random.default_rng(seed).permutation(len(frames))[:count]
    offset, size = _target_block(model.config, target)
    losses, correct, tokens, per_position, eval_targets, l1, true_actions = [], 0, 0, None, [], [], []
    for start in range(0, count, batch_size):
        items = [frames[int(i)] for i in order[start:start + batch_size]]
        inputs = {k: torch.as_tensor(v).to(device) for k, v in collate(items).items()}
        out = model(**inputs)
        losses.append(float(out.loss) * int(out.num_target_tokens))
        tokens += int(out.num_target_tokens)
        correct += round(float(out.target_accuracy) * int(out.num_target_tokens))
        # The targets are the last k labelled tokens; the logits one position earlier predict them.
        k = (inputs["labels"] != -100).sum(dim=1)[0].item()
        logits = out.logits[:, -k - 1:-1]
        target_ids = inputs["labels"][:, -k:]
        predicted = logits[..., offset:offset + size].argmax(-1)
        hits = (predicted == (target_ids - offset)).float().sum(0).cpu().numpy()
        per_position = hits if per_position is None else per_position + hits
        eval_targets.append((target_ids - offset).cpu().numpy())
        if target == "action":
            predicted_actions = processor.decode_actions((predicted + offset).cpu().numpy(), dataset=dataset)
            true_actions.append(np.stack([np.asarray(item["action"]) for item in items]))
            # (B, D), or (B, k, D) chunks: the mean over every action value of the example.
            l1.append(np.abs(predicted_actions - true_actions[-1]).reshape(len(items), -1).mean(axis=1))
    model.train()
    eval_targets = np.concatenate(eval_targets)
    # The majority baseline, computed once for the accuracies and the action L1.
    majority = majority_tokens(train_targets)
    majority_hits = eval_targets == majority[None, :]
    metrics = {
        "eval_frames": int(count),
        "loss": sum(losses) / max(tokens, 1),
        "token_accuracy": correct / max(tokens, 1),
        "token_accuracy_per_position": (per_position / count).round(4).tolist(),
        "majority_baseline_accuracy": _accuracy(majority_hits, per_position=False),
        "majority_baseline_accuracy_per_position": _accuracy(majority_hits, per_position=True),
    }
    if target == "action":
        majority_actions = processor.decode_actions((majority + model.config.action_token_offset)[None],
                                                    dataset=dataset)
        metrics["action_l1_teacher_forced"] = float(np.concatenate(l1).mean())
        metrics["majority_baseline_action_l1"] = float(np.abs(np.concatenate(true_actions) - majority_actions).mean())
    return metrics


__all__ = ["evaluate_vla", "majority_accuracy", "majority_tokens"]
