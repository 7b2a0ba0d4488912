"""The paper's experiment (Table 1) on Meta-World: SCRATCH, VPT, LAPA and ACTIONVLA with the same backbone, finetuned
on the same few labelled episodes per MT10 task, evaluated in closed loop on MT10 from initial states nothing trained
on, in two settings:

    in-domain    pretraining videos of the MT10 tasks themselves
    cross-task   pretraining videos of the other 40 MT50 tasks only

    python -m benchmarks.paper_experiment --preset smoke             # all four methods at micro size (minutes; CI)
    python -m benchmarks.paper_experiment --preset full              # >= 3 finetuning seeds per method and setting
    python -m benchmarks.paper_experiment --preset full --split validation   # where choices are made
    python -m benchmarks.paper_experiment --preset long              # `full` grown until ACTIONVLA works (hours)

The methods (pretraining, then action finetuning of the pretrained VLA on `finetune_episodes` labelled episodes of
each MT10 task):

    SCRATCH     no pretraining: finetuning starts from the untrained backbone (the same run in both settings)
    VPT         an inverse dynamics model (ResNet-18 layout, Adam 1e-4, on frame pairs of the labelled episodes)
                pseudo-labels every pretraining video with actions; the VLA pretrains on them
    LAPA        the latent action quantizer trained on the pretraining videos labels them with latent actions; the VLA
                pretrains on those (latent pretraining)
    ACTIONVLA   the VLA pretrains on the same videos with their true actions (the upper bound)

Model selection without peeking: every choice (steps, learning rate, chunk size, preset sizes) is made with
`--split validation`, whose closed-loop episodes start from the seeds 10**9 + (100 + s) * 10**6 + k; the table reports
`--split test` (seeds from 10**9 + (200 + s) * 10**6), disjoint from those and from every training episode (the
evaluator checks the datasets' recorded seeds). Finetuning seed s is evaluated on seed block 100 + s or 200 + s, the
same block for every method (paired episodes).

Every stage writes under `--output-dir` and is skipped when its output exists; an interrupted training stage resumes
from its last checkpoint. Outputs: `results_<split>.md` (the table), `results_<split>.json`, `success_<split>.png`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from training import train_quantizer, vla_training
from training.envs.metaworld_data import GenerationConfig, generate_dataset
from training.envs.metaworld_tasks import MT10_TASKS, TASK_INSTRUCTIONS
from training.eval.intervals import wilson_interval
from training.evaluate import EvaluationConfig, evaluate
from training.inverse_dynamics import IDMTrainingConfig, pseudo_label_dataset, train_idm
from training.label_latents import LabellingConfig, label_latents

METHODS = ("scratch", "vpt", "lapa", "actionvla")
METHOD_NAMES = {"scratch": "SCRATCH", "vpt": "VPT", "lapa": "LAPA", "actionvla": "ACTIONVLA"}
SETTINGS = ("in_domain", "cross_task")
SETTING_NAMES = {"in_domain": "in-domain", "cross_task": "cross-task"}
CROSS_TASKS = tuple(t for t in TASK_INSTRUCTIONS if t not in MT10_TASKS)  # the other 40 MT50 tasks
SPLIT_SEED_BLOCK = {"validation": 100, "test": 200}
GRIPPER_DIMS = [3]


def method_name(method: str) -> str:
    """"lapa" -> "LAPA"; "lapa_c4" (the codebook-size sweep) -> "LAPA |C|=4"."""
    if method.startswith("lapa_c"):
        return f"LAPA |C|={method[len('lapa_c'):]}"
    return METHOD_NAMES[method]  # Meta-World's 4th action dimension opens and closes the gripper


@dataclass
class ExperimentConfig:
    """Every setting of the experiment; a preset fills them, flags override (`--finetune-steps 800`)."""

    preset: str = "full"
    output_dir: str = "outputs/paper_experiment"
    split: str = "test"  # "validation" (choices are made here) or "test" (the table)
    settings: list = field(default_factory=lambda: list(SETTINGS))
    methods: list = field(default_factory=lambda: list(METHODS))
    seeds: list = field(default_factory=lambda: [0, 1, 2])  # finetuning (and evaluation block) seeds
    tasks: list = field(default_factory=lambda: list(MT10_TASKS))  # finetuning and evaluation tasks
    cross_tasks: list = field(default_factory=lambda: list(CROSS_TASKS))  # cross-task pretraining videos
    image_size: int = 64
    # how the generated datasets store frames. yuv444p at crf 0 keeps what the policy sees in closed loop (a fresh
    # render) up to rounding, where yuv420p at crf 23 smears Meta-World's single-pixel goal markers at 64 px; on
    # validation seeds it made no difference to ACTIONVLA (40% vs 42%, MT10 x 5), so the table's setting stays
    video_pix_fmt: str = "yuv420p"
    video_crf: int = 23
    episodes_per_task: int = 30  # MT10 expert videos per task (in-domain pretraining); `finetune_episodes` are labelled
    cross_episodes_per_task: int = 8  # videos of each cross-task task (40 x 8 = 320 episodes, about the in-domain 300)
    finetune_episodes: int = 5
    codebook_size: int = 8  # |C| of the quantizer
    quantizer_steps: int = 1000
    quantizer_mixed_precision: str = "no"  # "bf16": autocast on AMX, ~2.5x faster (issue 15: PSNR within 0.03 dB)
    idm_steps: int = 1500
    idm_width: int = 32
    pretrain_steps: int = 2000
    finetune_steps: int = 400
    stop_at_train_accuracy: float | None = 0.95  # the paper's finetuning rule (capped by finetune_steps)
    codebook_sweep: list = field(default_factory=list)  # more |C| for LAPA in-domain (the paper: 2, 4, 8)
    action_chunk_size: int = 1
    n_action_steps: int | None = None  # chunks: actions run open loop per call (default: all k)
    # the paper freezes a *pretrained* vision encoder; the tiny backbone's is random, so it trains (validation: 16% vs
    # 12% for ACTIONVLA pretrained 1,000 steps; 54% unfrozen with 30 episodes per task and 3,000 steps)
    freeze_vision_encoder: bool = False
    tiny: dict = field(default_factory=dict)  # tiny backbone sizes (hidden_size, num_layers, ...)
    learning_rate: float = 1e-3
    finetune_learning_rate: float | None = None  # finetuning's peak learning rate (None: learning_rate)
    eval_episodes: int = 5  # per task and seed
    eval_max_steps: int = 200
    num_workers: int | None = None


PRESETS: dict[str, dict] = {
    # A micro run of every stage of all four methods in both settings: checks the machinery, measures nothing.
    "smoke": dict(settings=list(SETTINGS), seeds=[0], tasks=["reach-v3", "drawer-close-v3"],
                  cross_tasks=["reach-wall-v3", "door-close-v3"], episodes_per_task=3, cross_episodes_per_task=3,
                  finetune_episodes=2,
                  codebook_sweep=[4], quantizer_steps=12, idm_steps=10, idm_width=8, pretrain_steps=10, finetune_steps=10,
                  stop_at_train_accuracy=None, tiny=dict(hidden_size=32, num_layers=1), eval_episodes=1,
                  eval_max_steps=12),
    "full": dict(),
    # `full` grown until ACTIONVLA works (validation seeds, MT10 x 5: 42% at `full`, 58% at 8,000 and 68% at 16,000
    # pretraining steps; more videos, lossless frames, a wider vision encoder or 128 px did not help by themselves):
    # 100 lossless videos per MT10 task, 25 per cross-task task (40 x 25, as many), 16,000 pretraining steps; the
    # quantizer 4,000 steps in bf16 (at 1,000 its codes probed no better than frame t alone, see README); finetuning
    # capped at 1,600 steps (validation: as good or better than 400 for every method, see README).
    # About 55 min per pretraining on 2 idle cores, six of them: a run over several sittings (every stage resumes).
    "long": dict(episodes_per_task=100, cross_episodes_per_task=25, video_pix_fmt="yuv444p", video_crf=0,
                 pretrain_steps=16000, quantizer_steps=4000, quantizer_mixed_precision="bf16",
                 finetune_steps=1600),
}


def resolve_config(argv: list[str] | None = None) -> ExperimentConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = dict(PRESETS[args.preset])
    for f in dataclasses.fields(ExperimentConfig):
        value = getattr(args, f.name, None)
        if value is not None and f.name != "preset":
            settings[f.name] = value
    config = ExperimentConfig(preset=args.preset, **settings)
    _validate(config)
    return config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--output-dir")
    parser.add_argument("--split", choices=sorted(SPLIT_SEED_BLOCK))
    lists = {"settings": "comma-separated: in_domain,cross_task", "methods": "comma-separated: " + ",".join(METHODS),
             "seeds": "comma-separated finetuning seeds, e.g. 0,1,2", "tasks": "comma-separated Meta-World tasks",
             "cross_tasks": "comma-separated Meta-World tasks",
             "codebook_sweep": "comma-separated codebook sizes |C| for LAPA in-domain besides --codebook-size, e.g. 2,4"}
    for name, help_text in lists.items():
        integers = name in ("seeds", "codebook_sweep")
        kind = (lambda text: [int(x) for x in text.split(",")]) if integers else (lambda text: text.split(","))
        parser.add_argument("--" + name.replace("_", "-"), type=kind, help=help_text)
    for f in dataclasses.fields(ExperimentConfig):
        if f.name in lists or f.name in ("preset", "output_dir", "split", "tiny"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=None, help=f"(preset's value; full: {f.default})")
    parser.add_argument("--tiny", type=lambda t: dict(_key_value(item) for item in t.split(",")),
                        help="tiny backbone sizes, e.g. hidden_size=256,num_layers=6")
    return parser


def _key_value(item: str) -> tuple[str, int]:
    key, _, value = item.partition("=")
    if not value:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
    return key.strip(), int(value)


def _validate(c: ExperimentConfig) -> None:
    for name, allowed in (("settings", SETTINGS), ("methods", METHODS)):
        unknown = sorted(set(getattr(c, name)) - set(allowed))
        if unknown:
            raise ValueError(f"unknown {name} {unknown}; choose from {list(allowed)}")
    unknown = sorted((set(c.tasks) | set(c.cross_tasks)) - set(TASK_INSTRUCTIONS))
    if unknown:
        raise ValueError(f"unknown Meta-World tasks {unknown}")
    if set(c.tasks) & set(c.cross_tasks):
        raise ValueError(f"cross-task pretraining must not see the evaluated tasks: {sorted(set(c.tasks) & set(c.cross_tasks))}")
    if any(size < 2 for size in [c.codebook_size, *c.codebook_sweep]):
        raise ValueError(f"codebook sizes must be >= 2, got {[c.codebook_size, *c.codebook_sweep]}")
    if c.quantizer_mixed_precision not in ("no", "bf16"):
        raise ValueError(f"quantizer_mixed_precision must be 'no' or 'bf16', got {c.quantizer_mixed_precision!r}")
    if not 0 < c.finetune_episodes < c.episodes_per_task:
        raise ValueError(f"finetune_episodes must be in [1, episodes_per_task), got {c.finetune_episodes}")


# ------------------------------------------------------------------------------------------------------ stages
def _check_cached_data(folder: Path, config: GenerationConfig) -> None:
    """A cached dataset must be the one these settings would generate: an --output-dir made with other settings
    (episodes, size, video format) would otherwise be reused silently."""
    info = json.loads((folder / "meta" / "info.json").read_text())
    camera = info["features"].get(f"observation.images.{config.cameras[0]}", {})
    video = camera.get("info", {})
    found = {"episodes": info["total_episodes"], "tasks": info["total_tasks"],
             "image_size": (camera.get("shape") or [None])[0], "pix_fmt": video.get("video.pix_fmt"),
             "crf": video.get("video.crf")}
    wanted = {"episodes": config.episodes_per_task * len(config.tasks), "tasks": len(config.tasks),
              "image_size": config.image_size, "pix_fmt": config.pix_fmt, "crf": config.crf}
    different = {k: (found[k], wanted[k]) for k in wanted if found[k] != wanted[k]}
    if different:
        listed = ", ".join(f"{k}: {a} there, {b} here" for k, (a, b) in different.items())
        raise ValueError(f"{folder} was generated with other settings ({listed}); use another --output-dir or delete it")


# what a cached training run must share with the settings asked for (paths compared once resolved)
_RUN_KEYS = ("stage", "target", "tiny", "model", "init_from", "dataset", "train_episodes_per_task", "gripper_dims",
             "action_chunk_size", "freeze_vision_encoder", "learning_rate", "max_steps", "stop_at_train_accuracy",
             "mixed_precision", "seed")


def _comparable(key: str, value):
    if key in ("dataset", "init_from") and value is not None:
        return [str(Path(v).resolve()) for v in value] if isinstance(value, list) else str(Path(value).resolve())
    return value


def _check_cached_run(run_dir: Path, config) -> None:
    """A finished run under `run_dir` is reused only if it was trained with these settings: an --output-dir from a
    run with other steps, learning rate or data would otherwise be reused silently (e.g. `--finetune-steps 1600`
    after a 400-step run). Raises naming every setting that differs."""
    record_path = run_dir / "training_config.json"
    if not record_path.is_file():
        return  # made before runs recorded their settings; nothing to compare
    record, wanted = json.loads(record_path.read_text()), dataclasses.asdict(config)
    different = {k: (record[k], wanted[k]) for k in _RUN_KEYS if k in record and k in wanted
                 and _comparable(k, record[k]) != _comparable(k, wanted[k])}
    if different:
        listed = ", ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in different.items())
        raise ValueError(f"{run_dir} holds a finished run with other settings ({listed}); use another --output-dir or "
                         f"delete {run_dir}")


class Experiment:
    """The stages, each cached under `root`; `timings` records the seconds each one took in this process."""

    def __init__(self, c: ExperimentConfig):
        self.c, self.root = c, Path(c.output_dir)
        self.workers = c.num_workers or os.cpu_count() or 1
        self.timings: dict[str, float] = {}

    def _timed(self, name: str, done: bool, run):
        if done:
            return
        print(f"\n=== {name} ===", flush=True)
        start = time.perf_counter()
        run()
        self.timings[name] = time.perf_counter() - start

    # data ------------------------------------------------------------------------------------------------------
    def data(self, which: str) -> Path:
        """'finetune': the MT10 experts (labelled finetuning episodes and the in-domain videos); 'cross': the others."""
        c = self.c
        folder = self.root / "data" / ("mt10" if which == "finetune" else "cross_tasks")
        tasks = c.tasks if which == "finetune" else c.cross_tasks
        # different generation seeds: no initial state is shared between the two datasets
        episodes = c.episodes_per_task if which == "finetune" else c.cross_episodes_per_task
        config = GenerationConfig(tasks=tuple(tasks), episodes_per_task=episodes, image_size=c.image_size,
                                  num_workers=self.workers, seed=0 if which == "finetune" else 1,
                                  pix_fmt=c.video_pix_fmt, crf=c.video_crf)
        cached = (folder / "meta" / "info.json").is_file()
        if cached:
            _check_cached_data(folder, config)
        self._timed(f"data: {folder.name}", cached, lambda: print(generate_dataset(config, folder, overwrite=True).table()))
        return folder

    def videos(self, setting: str) -> Path:
        """The setting's pretraining videos (their actions are used by ACTIONVLA only)."""
        return self.data("finetune" if setting == "in_domain" else "cross")

    # LAPA: quantizer -> latent labels ----------------------------------------------------------------------------
    def codebook(self, method: str) -> tuple[int, str]:
        """|C| of a LAPA method ("lapa": the config's; "lapa_c4": 4) and its folders' suffix."""
        if method.startswith("lapa_c"):
            return int(method[len("lapa_c"):]), method[len("lapa"):]
        return self.c.codebook_size, ""

    def quantizer(self, setting: str, method: str = "lapa") -> Path:
        c, (size, suffix) = self.c, self.codebook(method)
        run_dir = self.root / setting / f"quantizer{suffix}"
        steps = c.quantizer_steps
        config = train_quantizer.config_from_preset(
            "tiny", dataset=[str(self.videos(setting))], output_dir=str(run_dir), max_steps=steps, eval_every=steps,
            save_every=max(steps // 4, 1), replacement_cooldown_steps=steps // 6, model={"codebook_size": size},
            mixed_precision=c.quantizer_mixed_precision, resume=(run_dir / "checkpoints").is_dir(), report_to="none")
        done = (run_dir / "model" / "model.safetensors").is_file()
        if done:
            _check_cached_run(run_dir, config)
        self._timed(f"{setting}: quantizer{suffix}", done, lambda: train_quantizer.train(config))
        return run_dir

    def latent_labels(self, setting: str, method: str = "lapa") -> Path:
        suffix = self.codebook(method)[1]
        out = self.root / setting / f"videos_latent{suffix}"
        quantizer = self.quantizer(setting, method) / "model"
        done = (out / "meta" / "info.json").is_file() and not (out / ".labelling").exists()
        self._timed(f"{setting}: latent labels{suffix}", done, lambda: label_latents(LabellingConfig(
            dataset=str(self.videos(setting)), quantizer=str(quantizer), output=str(out))))
        return out

    # VPT: IDM on the labelled episodes -> pseudo-actions --------------------------------------------------------
    def idm(self):
        c, data, run_dir = self.c, self.data("finetune"), self.root / "idm"
        labelled, heldout = self._finetune_split(data)
        config = IDMTrainingConfig(dataset=str(data), episodes=labelled, heldout_episodes=heldout,
                                   output_dir=str(run_dir), width=c.idm_width, image_size=c.image_size,
                                   max_steps=c.idm_steps)
        model = None

        def run():
            nonlocal model
            model = train_idm(config)
        self._timed("VPT: inverse dynamics model", (run_dir / "model" / "model.safetensors").is_file(), run)
        return model or train_idm(config)

    def _finetune_split(self, data: Path) -> tuple[list[int], list[int]]:
        """The labelled episodes every method finetunes on, and the held-out ones: the same rule as the finetuning
        runs (`vla_training.split_dataset_episodes` with their settings)."""
        from training.data import load_lerobot_dataset

        probe = vla_training.config_from_preset("finetune", "tiny", dataset=[str(data)],
                                                train_episodes_per_task=self.c.finetune_episodes)
        return vla_training.split_dataset_episodes(load_lerobot_dataset(str(data)), probe, 0)

    def pseudo_labels(self, setting: str) -> Path:
        out = self.root / setting / "videos_vpt"
        done = (out / "meta" / "info.json").is_file() and "pseudo_actions" in json.loads(
            (out / "meta" / "info.json").read_text())
        self._timed(f"{setting}: VPT pseudo-labels", done, lambda: pseudo_label_dataset(
            self.idm(), self.videos(setting), out, record={"setting": setting}))
        return out

    # VLA pretraining and finetuning -----------------------------------------------------------------------------
    def _vla(self, stage: str, run_dir: Path, label: str, **settings) -> Path:
        c = self.c
        steps = settings.pop("max_steps")
        learning_rate = settings.pop("learning_rate", c.learning_rate)
        config = vla_training.config_from_preset(
            stage, "tiny", output_dir=str(run_dir), max_steps=steps, eval_every=steps, save_every=max(steps // 4, 1),
            eval_max_frames=1000, learning_rate=learning_rate, tiny=dict(c.tiny),
            freeze_vision_encoder=c.freeze_vision_encoder, resume=(run_dir / "checkpoints").is_dir(),
            report_to="none", **settings)
        done = (run_dir / "model" / "model.safetensors").is_file()
        if done:
            _check_cached_run(run_dir, config)
        self._timed(label, done, lambda: vla_training.train(config))
        return run_dir / "model"

    def pretrained(self, method: str, setting: str) -> Path | None:
        c = self.c
        if method == "scratch":
            return None
        if method.startswith("lapa"):
            dataset, target = self.latent_labels(setting, method), "latent"
        else:
            dataset, target = (self.pseudo_labels(setting) if method == "vpt" else self.videos(setting)), "action"
        extra = dict(gripper_dims=GRIPPER_DIMS, action_chunk_size=c.action_chunk_size) if target == "action" else {}
        return self._vla("pretrain", self.root / setting / f"pretrain_{method}",
                         f"{setting}: {method_name(method)} pretraining", dataset=[str(dataset)], target=target,
                         max_steps=c.pretrain_steps, **extra)

    def finetuned(self, method: str, setting: str, seed: int) -> Path:
        c = self.c
        where = "scratch" if method == "scratch" else f"{setting}/{method}"
        init = self.pretrained(method, setting)
        return self._vla("finetune", self.root / "finetune" / where.replace("/", "_") / f"seed{seed}",
                         f"{method_name(method)} {'' if method == 'scratch' else setting + ' '}finetuning, seed {seed}",
                         dataset=[str(self.data("finetune"))], init_from=str(init) if init else None,
                         train_episodes_per_task=c.finetune_episodes, gripper_dims=GRIPPER_DIMS,
                         action_chunk_size=c.action_chunk_size, max_steps=c.finetune_steps, seed=seed,
                         stop_at_train_accuracy=c.stop_at_train_accuracy,
                         learning_rate=c.finetune_learning_rate or c.learning_rate)

    def evaluation(self, method: str, setting: str, seed: int) -> dict:
        c = self.c
        policy = self.finetuned(method, setting, seed)
        name = "scratch" if method == "scratch" else f"{setting}_{method}"
        out = self.root / "eval" / c.split / name / f"seed{seed}"
        config = EvaluationConfig(policy=str(policy), tasks=",".join(c.tasks), episodes_per_task=c.eval_episodes,
                                  max_steps=c.eval_max_steps, seed=SPLIT_SEED_BLOCK[c.split] + seed,
                                  output_dir=str(out), num_workers=self.workers, overwrite=True, videos_per_task=1,
                                  n_action_steps=c.n_action_steps)
        self._timed(f"closed loop ({c.split}): {name}, seed {seed}", (out / "eval_info.json").is_file(),
                    lambda: evaluate(config))
        return json.loads((out / "eval_info.json").read_text())


# ------------------------------------------------------------------------------------------------------ results
def aggregate(evals: dict[tuple[str, str], list[dict]]) -> dict:
    """{(method, setting): [eval_info per seed]} -> per row: success % over every episode of every seed with its 95%
    Wilson interval, the per-seed %, per task %; and per setting the share of the SCRATCH-to-ACTIONVLA gap each
    method recovers, (method - SCRATCH) / (ACTIONVLA - SCRATCH)."""
    rows = {}
    for (method, setting), infos in evals.items():
        successes = [s for info in infos for task in info["per_task"] for s in task["metrics"]["successes"]]
        per_task: dict[str, list[bool]] = {}
        for info in infos:
            for task in info["per_task"]:
                per_task.setdefault(task["task"], []).extend(task["metrics"]["successes"])
        low, high = wilson_interval(sum(successes), len(successes))
        rows[f"{method}/{setting}"] = {
            "method": method, "setting": setting, "n_episodes": len(successes),
            "pc_success": 100.0 * sum(successes) / len(successes), "pc_success_ci95": [100 * low, 100 * high],
            "pc_success_per_seed": [info["overall"]["pc_success"] for info in infos],
            "pc_success_per_task": {t: 100.0 * sum(v) / len(v) for t, v in per_task.items()},
        }
    for row in rows.values():
        scratch, upper = rows.get("scratch/in_domain"), rows.get(f"actionvla/{row['setting']}")
        gap = None if scratch is None or upper is None else upper["pc_success"] - scratch["pc_success"]
        row["gap_recovered"] = None if not gap or row["method"] == "scratch" else \
            (row["pc_success"] - scratch["pc_success"]) / gap
    return rows


def _cell(row: dict | None) -> str:
    if row is None:
        return "-"
    low, high = row["pc_success_ci95"]
    text = f"{row['pc_success']:.1f} [{low:.0f}, {high:.0f}]"
    if row.get("gap_recovered") is not None:
        text += f" ({100 * row['gap_recovered']:.0f}% of gap)"
    return text


def _task_set(c: ExperimentConfig) -> str:
    return "MT10" if list(c.tasks) == list(MT10_TASKS) else f"{len(c.tasks)} tasks"


def markdown_table(rows: dict, c: ExperimentConfig) -> str:
    """Table 1's layout: a row per method, a column per setting (SCRATCH is one run, shown in both)."""
    settings = [s for s in SETTINGS if s in c.settings]
    lines = ["| method | " + " | ".join(SETTING_NAMES[s] for s in settings) + " |",
             "|---|" + "---|" * len(settings)]
    for method in METHODS:
        if method not in c.methods:
            continue
        key = (lambda s: "scratch/in_domain") if method == "scratch" else (lambda s: f"{method}/{s}")
        lines.append(f"| {METHOD_NAMES[method]} | " + " | ".join(_cell(rows.get(key(s))) for s in settings) + " |")
    sweep = sorted((r for r in rows.values() if r["method"].startswith("lapa") and r["setting"] == "in_domain"),
                   key=lambda r: Experiment(c).codebook(r["method"])[0])
    if len(sweep) > 1:
        lines += ["", "| LAPA in-domain, codebook size |C| | success % |", "|---|---|"]
        lines += [f"| {Experiment(c).codebook(r['method'])[0]} | {_cell(r)} |" for r in sweep]
    n = {r["n_episodes"] for r in rows.values()}
    lines.append("")
    lines.append(f"Success % on {_task_set(c)} ({c.split} seeds) with 95% Wilson intervals over {'/'.join(map(str, sorted(n)))} "
                 f"episodes per cell ({len(c.seeds)} finetuning seeds x {len(c.tasks)} tasks x {c.eval_episodes} "
                 f"episodes); in brackets after it, the share of the SCRATCH-to-ACTIONVLA gap recovered.")
    return "\n".join(lines)


def success_chart(rows: dict, c: ExperimentConfig, path: Path) -> None:
    """Grouped bars: success % per method in each setting, with the 95% intervals and the per-seed points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s in SETTINGS if s in c.settings]
    methods = [m for m in METHODS if m in c.methods]
    fig, axis = plt.subplots(figsize=(2.2 + 2.4 * len(settings), 3.6))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        for j, setting in enumerate(settings):
            row = rows.get("scratch/in_domain" if method == "scratch" else f"{method}/{setting}")
            if row is None:
                continue
            x = j + (i - (len(methods) - 1) / 2) * width
            low, high = row["pc_success_ci95"]
            axis.bar(x, row["pc_success"], width * 0.9, color=f"C{i}", label=METHOD_NAMES[method] if j == 0 else None)
            axis.errorbar([x], [row["pc_success"]], yerr=[[row["pc_success"] - low], [high - row["pc_success"]]],
                          color="black", capsize=3, linewidth=1)
            axis.plot([x] * len(row["pc_success_per_seed"]), row["pc_success_per_seed"], "k.", markersize=4)
    axis.set_xticks(range(len(settings)), [SETTING_NAMES[s] for s in settings])
    axis.set(ylabel=f"{_task_set(c)} success % ({c.split} seeds)", ylim=(0, 100))
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8, ncols=len(methods), loc="upper center", bbox_to_anchor=(0.5, 1.16), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def diagnostics(root: Path, c: ExperimentConfig) -> dict:
    """Why it works or not: each setting's quantizer (held-out next-frame PSNR vs copying, code usage, probes vs
    leakage) and the IDM (held-out L1, pseudo-label L1 to the true actions)."""
    out: dict = {}
    for setting in c.settings:
        path = root / setting / "quantizer" / "eval" / "final_metrics.json"
        if path.is_file():
            m = json.loads(path.read_text())
            rec, book = m["reconstruction"], m["codebook"]
            out[f"quantizer/{setting}"] = {
                "psnr_db": rec["prediction_psnr_of_mean_mse"], "copy_psnr_db": rec["copy_psnr_of_mean_mse"],
                "pairs_better_than_copy": rec["fraction_pairs_better_than_copy"],
                "min_code_share": book["min_code_fraction"], "distinct_latent_actions": book["num_distinct_latent_actions"],
                "probes": m.get("probes"),
            }
        info = root / setting / "videos_vpt" / "meta" / "info.json"
        if info.is_file():
            out[f"vpt_pseudo_labels/{setting}"] = json.loads(info.read_text())["pseudo_actions"]["l1_to_true_actions_per_dim"]
    idm = root / "idm" / "idm_metrics.json"
    if idm.is_file():
        out["idm"] = json.loads(idm.read_text())
    return out


def run(c: ExperimentConfig) -> dict:
    experiment, root = Experiment(c), Path(c.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / f"config_{c.split}.json").write_text(json.dumps(dataclasses.asdict(c), indent=2))
    start = time.perf_counter()
    evals: dict[tuple[str, str], list[dict]] = {}
    for setting in c.settings:
        for method in c.methods:
            if method == "scratch" and setting != c.settings[0]:
                continue  # SCRATCH has no pretraining: one run serves both settings
            key = (method, "in_domain" if method == "scratch" else setting)
            evals[key] = [experiment.evaluation(method, key[1], seed) for seed in c.seeds]
    if "in_domain" in c.settings:
        for size in sorted(set(c.codebook_sweep) - {c.codebook_size}):
            evals[(f"lapa_c{size}", "in_domain")] = [experiment.evaluation(f"lapa_c{size}", "in_domain", seed)
                                                     for seed in c.seeds]
    rows = aggregate(evals)
    result = {"config": dataclasses.asdict(c), "rows": rows, "diagnostics": diagnostics(root, c),
              "seconds_this_run": time.perf_counter() - start, "stage_seconds_this_run": experiment.timings}
    table = markdown_table(rows, c)
    (root / f"results_{c.split}.json").write_text(json.dumps(result, indent=2))
    (root / f"results_{c.split}.md").write_text(table + "\n")
    success_chart(rows, c, root / f"success_{c.split}.png")
    print("\n" + table)
    print(f"\nwritten: {root / f'results_{c.split}.md'}, {root / f'results_{c.split}.json'}, "
          f"{root / f'success_{c.split}.png'} ({result['seconds_this_run'] / 60:.1f} min this run)")
    return result


def main(argv: list[str] | None = None) -> int:
    try:
        config = resolve_config(argv)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    run(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
