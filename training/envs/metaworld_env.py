"""One Meta-World task as a seeded, rendered environment, plus its scripted expert.

Used by the expert-data generator (:mod:`training.envs.metaworld_data`) and meant to be reused as is by
closed-loop evaluation: same initial states for the same seeds, same camera views, same state vector.

* **Seeded initial states.** Meta-World 3 draws initial object and goal positions when a benchmark is
  built: ``metaworld.MT1(task, seed=b)`` makes 50 "train tasks" (initial states), deterministic given ``b``,
  and ``env.set_task(task)`` + ``env.reset()`` puts the scene in one of them (nothing else in a reset is
  random). Episode seed ``s`` uses train task ``s % 50`` of ``MT1(task, seed=s // 50)``, so seeds
  0, 1, 2, ... give distinct initial states and the same seed always gives the same episode.
* **Upright images.** Some of the model's cameras (``corner``, ``corner2``, ``corner3``, ``corner4``) are
  defined with their image "up" axis pointing down in the world, so MuJoCo renders them upside down. We
  detect that from the camera's orientation (its up axis has a negative world-z component) and rotate
  those images by 180 degrees, which keeps left and right correct (a vertical flip would mirror them).
* **Fast offscreen rendering.** Shadows and reflections are turned off and multisampling is not used:
  on a CPU (Mesa llvmpipe) this is several times faster, and at 64-256 px they are barely visible.
  ``supersample=k`` renders at k times the size and averages k x k blocks (cheap antialiasing).

MuJoCo picks its OpenGL backend when it is first imported: this module sets ``MUJOCO_GL=egl`` (headless)
unless the variable is already set, so import it before anything else imports ``mujoco``.
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import functools  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import mujoco  # noqa: E402
import numpy as np  # noqa: E402

import metaworld  # noqa: E402
from metaworld.policies import ENV_POLICY_MAP  # noqa: E402

from .metaworld_tasks import canonical_task_name  # noqa: E402

#: Camera used when none is named: a fixed view from the front-left corner of the table that shows the
#: whole arm, the table and the task objects of every MT50 task.
DEFAULT_CAMERA = "corner"

#: Size of the 4-D end-effector state: hand position x, y, z (metres, world frame) and gripper opening
#: (distance between the fingers normalised to [0, 1]); the first four entries of Meta-World's observation.
STATE_NAMES: tuple[str, ...] = ("hand_x", "hand_y", "hand_z", "gripper_opening")

#: The 4-D action: hand displacement x, y, z (each in [-1, 1], scaled by the env to at most 1 cm per step)
#: and gripper effort (-1 open, +1 close).
ACTION_NAMES: tuple[str, ...] = ("delta_x", "delta_y", "delta_z", "gripper_effort")


@dataclass
class StepResult:
    """What one control step of :class:`MetaWorldTaskEnv` returns.

    Attributes:
        observation: Meta-World's full observation (39,) float64, what the expert policy reads.
        reward: Meta-World's dense reward.
        success: ``info["success"]`` after the step: the task is solved in this state.
        truncated: the episode reached the env's maximum path length.
        info: Meta-World's info dict.
    """

    observation: np.ndarray
    reward: float
    success: bool
    truncated: bool
    info: dict[str, Any]


@functools.lru_cache(maxsize=64)
def _initial_state_benchmark(task_name: str, benchmark_seed: int) -> metaworld.Benchmark:
    """``metaworld.MT1(task_name, seed=benchmark_seed)``, cached per process: building one runs 50 resets
    (about half a second), and its 50 train tasks are the initial states of seeds
    ``50 * benchmark_seed ... 50 * benchmark_seed + 49``."""
    return metaworld.MT1(task_name, seed=benchmark_seed)


class MetaWorldTaskEnv:
    """A Meta-World task with seeded initial states and upright offscreen camera rendering.

    Args:
        task_name: Meta-World task, e.g. ``"drawer-open-v3"`` (the ``-v3`` suffix is optional).
        cameras: names of the model cameras to render; each image is upright.
        image_size: height and width of the rendered images, in pixels.
        supersample: render at ``supersample * image_size`` and average down (antialiasing); 1 = off.
        max_path_length: episode length limit; default Meta-World's own (500 steps).
        render: build the renderer. ``False`` gives a state-only env (no OpenGL context), e.g. to find
            which seeds the expert solves before paying for rendering.
    """

    #: How many initial states one ``metaworld.MT1`` benchmark provides (its train tasks).
    initial_states_per_benchmark = 50

    def __init__(
        self,
        task_name: str,
        *,
        cameras: Sequence[str] = (DEFAULT_CAMERA,),
        image_size: int = 128,
        supersample: int = 1,
        max_path_length: int | None = None,
        render: bool = True,
    ) -> None:
        self.task_name = canonical_task_name(task_name)
        self.cameras = tuple(cameras)
        self.image_size = int(image_size)
        self.supersample = int(supersample)
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
        if self.supersample < 1:
            raise ValueError(f"supersample must be a positive integer, got {supersample}")
        if render and not self.cameras:
            raise ValueError("Give at least one camera to render (or render=False).")

        # The task's env class, as MT1 builds it; reset(seed) gives it its task (initial state) each time.
        self._env = metaworld.ALL_V3_ENVIRONMENTS[self.task_name]()
        if max_path_length is not None:
            if max_path_length < 1:
                raise ValueError(f"max_path_length must be positive, got {max_path_length}")
            # An instance attribute overrides the class default; Meta-World's step() reads it to truncate.
            self._env.max_path_length = int(max_path_length)
        self.max_path_length: int = int(self._env.max_path_length)
        #: Simulated seconds per control step (MuJoCo timestep x frame skip; 0.0125 s = 80 Hz).
        self.control_dt: float = float(self._env.dt)

        self._renderer: mujoco.Renderer | None = None
        self._upside_down: dict[str, bool] = {}
        if render:
            self._build_renderer()
        self._observation: np.ndarray | None = None

    # ------------------------------------------------------------------ initial states
    def reset(self, seed: int) -> np.ndarray:
        """Put the scene in the initial state of ``seed`` (>= 0) and return the first observation (39,)."""
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        block, index = divmod(int(seed), self.initial_states_per_benchmark)
        self._env.set_task(_initial_state_benchmark(self.task_name, block).train_tasks[index])
        self._env.seed(int(seed))  # Meta-World's reset ignores reset(seed=...); this seeds its spaces.
        observation, _ = self._env.reset()
        self._observation = observation
        return observation

    # ------------------------------------------------------------------ stepping
    def step(self, action: np.ndarray) -> StepResult:
        """Apply one 4-D action (clipped to [-1, 1]) for one control step."""
        if self._observation is None:
            raise RuntimeError("Call reset(seed) before step().")
        action = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        observation, reward, _, truncated, info = self._env.step(action)
        self._observation = observation
        return StepResult(observation, float(reward), bool(info["success"]), bool(truncated), info)

    @property
    def observation(self) -> np.ndarray:
        """The current full Meta-World observation (39,)."""
        if self._observation is None:
            raise RuntimeError("Call reset(seed) first.")
        return self._observation

    @property
    def state(self) -> np.ndarray:
        """The current end-effector state (4,) float32: hand x, y, z and gripper opening."""
        return self.observation[: len(STATE_NAMES)].astype(np.float32)

    # ------------------------------------------------------------------ rendering
    def _build_renderer(self) -> None:
        model = self._env.model
        available = [mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_CAMERA, i) for i in range(model.ncam)]
        unknown = [camera for camera in self.cameras if camera not in available]
        if unknown:
            raise ValueError(f"Unknown camera(s) {unknown} for {self.task_name}; available: {available}")
        render_size = self.image_size * self.supersample
        # Why: shadow maps dominate CPU rendering time (~5x); reflections cost another ~1.5x;
        # multisampling ~2.5x. None of them matters much at these image sizes.
        model.vis.quality.shadowsize = 0
        model.vis.quality.offsamples = 0
        model.vis.global_.offwidth = max(int(model.vis.global_.offwidth), render_size)
        model.vis.global_.offheight = max(int(model.vis.global_.offheight), render_size)
        try:
            self._renderer = mujoco.Renderer(model, height=render_size, width=render_size)
        except mujoco.FatalError as error:
            raise RuntimeError(
                f"MuJoCo could not create an OpenGL context ({error}). For headless rendering set "
                "MUJOCO_GL=egl before mujoco is first imported (this module does it when it is imported "
                f"first; MUJOCO_GL is now {os.environ.get('MUJOCO_GL')!r}) and install the EGL libraries "
                "(Debian: libegl1 libegl-mesa0 libgl1-mesa-dri)."
            ) from error
        self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        # Camera orientations are world-frame after a forward pass; decide the flip once per camera so a
        # video never flips midway (tracking cameras move with the arm).
        mujoco.mj_forward(model, self._env.data)
        for camera in self.cameras:
            camera_id = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
            image_up_axis = self._env.data.cam_xmat[camera_id].reshape(3, 3)[:, 1]
            self._upside_down[camera] = bool(image_up_axis[2] < 0.0)

    def render(self) -> dict[str, np.ndarray]:
        """Render every camera: ``{camera_name: uint8 (image_size, image_size, 3)}``, upright."""
        if self._renderer is None:
            raise RuntimeError("This env was built with render=False.")
        frames: dict[str, np.ndarray] = {}
        for camera in self.cameras:
            self._renderer.update_scene(self._env.data, camera=camera)
            image = self._renderer.render()
            if self._upside_down[camera]:
                image = image[::-1, ::-1]  # 180-degree rotation
            if self.supersample > 1:
                k, size = self.supersample, self.image_size
                blocks = image.reshape(size, k, size, k, 3).astype(np.float32)
                image = np.round(blocks.mean(axis=(1, 3))).astype(np.uint8)
            frames[camera] = np.ascontiguousarray(image)
        return frames

    def close(self) -> None:
        """Release the OpenGL context and the simulator."""
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        self._env.close()

    def __enter__(self) -> "MetaWorldTaskEnv":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ScriptedExpert:
    """Meta-World's own hand-written policy for a task (``metaworld.policies``), returning 4-D actions.

    The policies warn ("Constant(s) may be too high") whenever a proportional controller saturates,
    which they do by design every few steps; those warnings are silenced here.
    """

    def __init__(self, task_name: str) -> None:
        self.task_name = canonical_task_name(task_name)
        self._policy = ENV_POLICY_MAP[self.task_name]()

    def __call__(self, observation: np.ndarray) -> np.ndarray:
        """The expert's action (4,) float32 for a full Meta-World observation, clipped to [-1, 1]."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            # A copy: some policies edit the observation they are given in place (door-open shifts the
            # door position it reads), which would corrupt the caller's observation.
            action = self._policy.get_action(np.array(observation, dtype=np.float64, copy=True))
        return np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)
