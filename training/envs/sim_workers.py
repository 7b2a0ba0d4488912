"""Meta-World environments in worker processes, stepped together by the closed-loop evaluation.

    with SimWorkers(num_workers=2, num_slots=10, camera="corner", image_size=64, max_steps=200) as sims:
        results = sims.run({0: ("reset", "reach-v3", seed, True), 1: ("step", action, False), ...})

A *slot* is one place of the policy's batch; slot i lives in worker i % num_workers. Each call of `run` sends every
worker one message with the operations of its slots (reset a slot into an episode, or apply one action) and waits
for all the answers, so the workers step their environments in parallel while the policy waits, and the policy runs
while the workers wait. The two never compete for the cores, hence one thread per worker (OpenMP and Mesa's
llvmpipe rasteriser) and every core for the policy in the main process.

Why small Pipe-based workers rather than gymnasium's vector envs: `AsyncVectorEnv` runs one environment per process
with a fixed task each and resets them all through one autoreset rule; here ten slots share two cores (several
environments per process), a slot changes task and initial-state seed from one episode to the next, and only the
slots that need images should render. One message per worker per control step does all of this with no wrapper.

The module lives in `training.envs`, not `training.eval`, because a spawned worker imports the package of its
target function: `training.eval` pulls in torch and scipy (about 2 s per worker), `training.envs` nothing (spawn
also re-imports the main module of a script, which the script decides).

Workers are started with "spawn" (fork would copy the parent's threads and any OpenGL state) and keep the
environments they built: a worker reuses an idle environment of the same task (building one, with its initial-state
benchmark and OpenGL context, takes about a second, longer than an episode).
"""

from __future__ import annotations

import multiprocessing
import os
import traceback
from contextlib import contextmanager
from typing import Any

#: Environments a worker keeps when they are idle (several tasks' worth; each holds an OpenGL context).
MAX_IDLE_ENVS_PER_WORKER = 12

#: Environment variables of the worker processes: one thread each (OpenMP, MKL, Mesa llvmpipe). They must be set
#: before the worker first imports numpy or creates an OpenGL context, so they are given to the process at start.
WORKER_ENVIRONMENT = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                      "LP_NUM_THREADS": "1"}


class SimWorkerError(RuntimeError):
    """A worker process failed (its traceback is in the message) or died."""


class _WorkerState:
    """The environments of one worker: the one each of its slots runs, and idle ones kept for reuse."""

    def __init__(self, camera: str, image_size: int, max_steps: int):
        self.camera, self.image_size, self.max_steps = camera, image_size, max_steps
        self.active: dict[int, Any] = {}  # slot -> env
        self.idle: list[Any] = []  # least recently used first

    def _env_for(self, task: str):
        from .metaworld_env import MetaWorldTaskEnv

        for position, env in enumerate(self.idle):
            if env.task_name == task:
                return self.idle.pop(position)
        return MetaWorldTaskEnv(task, cameras=(self.camera,), image_size=self.image_size,
                                max_path_length=self.max_steps, render=True)

    def _release(self, slot: int) -> None:
        env = self.active.pop(slot, None)
        if env is not None:
            self.idle.append(env)
        while len(self.idle) > MAX_IDLE_ENVS_PER_WORKER:
            self.idle.pop(0).close()

    def _image(self, env, render: bool):
        return env.render()[self.camera] if render else None

    def apply(self, slot: int, operation: tuple) -> dict:
        """One operation of a slot: ("reset", task, seed, render), ("step", action, render) or ("release",)."""
        kind = operation[0]
        if kind == "reset":
            _, task, seed, render = operation
            self._release(slot)
            env = self.active[slot] = self._env_for(task)
            observation = env.reset(int(seed))
            return {"observation": observation, "image": self._image(env, render)}
        if kind == "step":
            _, action, render = operation
            env = self.active[slot]
            result = env.step(action)
            return {"observation": result.observation, "image": self._image(env, render), "reward": result.reward,
                    "success": result.success}
        if kind == "release":
            self._release(slot)
            return {}
        raise ValueError(f"unknown worker operation {kind!r}")

    def close(self) -> None:
        for env in list(self.active.values()) + self.idle:
            env.close()
        self.active.clear()
        self.idle.clear()


def _worker_main(connection, camera: str, image_size: int, max_steps: int) -> None:
    """A worker's loop: {slot: operation} in, {slot: result} out, until None. An exception is sent back as
    ("error", traceback) and ends the worker."""
    state = _WorkerState(camera, image_size, max_steps)
    try:
        while True:
            message = connection.recv()
            if message is None:
                break
            try:
                connection.send(("ok", {slot: state.apply(slot, op) for slot, op in message.items()}))
            except Exception:  # noqa: BLE001  (reported to the parent, which raises it)
                connection.send(("error", traceback.format_exc()))
                break
    except (EOFError, KeyboardInterrupt):
        pass  # the parent went away
    finally:
        state.close()
        connection.close()


@contextmanager
def _environment(values: dict[str, str]):
    """`os.environ` with `values` for the duration (a spawned child copies the environment when it starts)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class SimWorkers:
    """`num_slots` environment slots spread over `num_workers` spawned processes (see the module docstring).

    Args:
        num_workers: worker processes (at most `num_slots`).
        num_slots: environments stepped together (the policy's batch).
        camera, image_size: the camera rendered, and its square image size in pixels.
        max_steps: the environments' path length (Meta-World truncates there).
    """

    def __init__(self, num_workers: int, num_slots: int, *, camera: str, image_size: int, max_steps: int):
        if num_slots < 1 or num_workers < 1:
            raise ValueError(f"need at least one slot and one worker, got {num_slots} and {num_workers}")
        self.num_workers = min(num_workers, num_slots)
        self.num_slots = num_slots
        context = multiprocessing.get_context("spawn")
        self._connections, self._processes = [], []
        # MUJOCO_GL must reach the workers too: they import mujoco before metaworld_env could set it.
        environment = {**WORKER_ENVIRONMENT, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
        with _environment(environment):
            for _ in range(self.num_workers):
                parent, child = context.Pipe()
                process = context.Process(target=_worker_main, args=(child, camera, image_size, max_steps),
                                          daemon=True)
                process.start()
                child.close()
                self._connections.append(parent)
                self._processes.append(process)

    def worker_of(self, slot: int) -> int:
        return slot % self.num_workers

    def run(self, operations: dict[int, tuple]) -> dict[int, dict]:
        """Applies {slot: operation} (see `_WorkerState.apply`) in the workers, in parallel; {slot: result}."""
        messages: list[dict] = [{} for _ in range(self.num_workers)]
        for slot, operation in operations.items():
            if not 0 <= slot < self.num_slots:
                raise ValueError(f"slot {slot} outside [0, {self.num_slots})")
            messages[self.worker_of(slot)][slot] = operation
        busy = [w for w, message in enumerate(messages) if message]
        for w in busy:
            self._connections[w].send(messages[w])
        results: dict[int, dict] = {}
        for w in busy:
            try:
                status, payload = self._connections[w].recv()
            except EOFError:
                raise SimWorkerError(f"simulator worker {w} died (exit code {self._processes[w].exitcode})") from None
            if status != "ok":
                raise SimWorkerError(f"simulator worker {w} failed:\n{payload}")
            results.update(payload)
        return results

    def close(self) -> None:
        """Stops the workers (they close their environments); kills any that do not stop within 10 s."""
        for connection in self._connections:
            try:
                connection.send(None)
            except (BrokenPipeError, OSError):
                pass
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
        for connection in self._connections:
            connection.close()
        self._connections, self._processes = [], []

    def __enter__(self) -> SimWorkers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["MAX_IDLE_ENVS_PER_WORKER", "SimWorkerError", "SimWorkers", "WORKER_ENVIRONMENT"]
