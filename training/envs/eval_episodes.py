"""Which episodes a closed-loop evaluation runs in Meta-World: initial-state seeds that no generated training episode
uses, and the episode length.

Light on purpose (no numpy, torch or simulator import): `training/evaluate.py` reads its defaults from here at import
time, and every simulator worker that "spawn" starts re-imports the evaluation script; importing `training.eval` or
`training.data` there would cost each worker about 2 s and 700 MB.
"""

from __future__ import annotations

#: The data generator's stride between run seeds (`training.envs.metaworld_data.EPISODE_SEED_STRIDE`, which imports
#: the data layer; tests/test_evaluate.py checks that the two agree).
EPISODE_SEED_STRIDE = 1_000_000

#: Evaluation seeds start here: run seed 1000 of the data generator (`seed * EPISODE_SEED_STRIDE`), far above the
#: run seeds datasets are generated with, and within what `metaworld.MT1(seed=s // 50)` accepts (below 2**32).
EVAL_SEED_BASE = 1000 * EPISODE_SEED_STRIDE

#: Default episode length. Measured: Meta-World's scripted expert, without rendering, from 20 initial states of each
#: MT10 task (200 episodes), succeeds in 197 within 500 steps, every one of them by step 139 (median 76, 95th
#: percentile 93); the 3 others (door-open once, peg-insert-side twice) fail at 500 too. 200 steps leaves a learned
#: policy ~45% more time than the expert's slowest success, while a failing episode costs 200 steps instead of 500.
DEFAULT_MAX_STEPS = 200

#: Built-in reference policies, by their `--policy` name: the scripted expert (the ceiling) and all-zero actions.
REFERENCE_POLICIES = ("expert", "zero")


def evaluation_seeds(seed: int, episodes_per_task: int) -> list[int]:
    """Initial-state seeds of a task's evaluation episodes 0..episodes_per_task-1 (the same for every task):
    `EVAL_SEED_BASE + seed * EPISODE_SEED_STRIDE + k`."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if episodes_per_task < 1:
        raise ValueError(f"episodes_per_task must be at least 1, got {episodes_per_task}")
    if episodes_per_task > EPISODE_SEED_STRIDE:
        raise ValueError(f"at most {EPISODE_SEED_STRIDE} episodes per task, got {episodes_per_task}")
    first = EVAL_SEED_BASE + seed * EPISODE_SEED_STRIDE
    if (first + episodes_per_task) // 50 >= 2**32:
        raise ValueError(f"seed {seed} is too large: Meta-World seeds its benchmarks with 32-bit integers")
    return [first + k for k in range(episodes_per_task)]


__all__ = ["DEFAULT_MAX_STEPS", "EPISODE_SEED_STRIDE", "EVAL_SEED_BASE", "REFERENCE_POLICIES", "evaluation_seeds"]
