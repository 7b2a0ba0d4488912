"""What the model and dataset cards share: the folder kinds, reading the run's JSON, Markdown pieces, and the
closed-loop results as `EvalResult`s.

A card is built from files a run already wrote (`training_config.json`, `final_metrics.json`, `eval_metrics.json`,
`eval_info.json`, `meta/info.json`), never from memory: what the card says is what the folder holds. A field the
card needs and the folder lacks is a `CardError` that names the file and why it is needed, not a card with a hole.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import EvalResult

QUANTIZER, VLA, LAPA_7B, DATASET = "quantizer", "vla", "lapa-7b", "dataset"
KINDS = (QUANTIZER, VLA, LAPA_7B, DATASET)
IMAGES_DIR = "images"  # where a card's plots and GIFs go inside the uploaded folder (linked by relative path)
DEFAULT_LICENSE = "apache-2.0"
MODEL_TAGS = ["lapa", "robotics", "latent-actions"]
PAPER_URL = "https://arxiv.org/abs/2410.11758"
CITATION = """```bibtex
@article{ye2024lapa,
  title   = {Latent Action Pretraining from Videos},
  author  = {Ye, Seonghyeon and Jang, Joel and Jeon, Byeongguk and Joo, Sejune and Yang, Jianwei and Peng, Baolin and
             Mandlekar, Ajay and Tan, Reuben and Chao, Yu-Wei and Lin, Bill Yuchen and Liden, Lars and Lee, Kimin and
             Gao, Jianfeng and Zettlemoyer, Luke and Fox, Dieter and Seo, Minjoon},
  journal = {arXiv preprint arXiv:2410.11758},
  year    = {2024}
}
```"""
# A Hub repo id: owner/name, each part starting with a letter or digit (the Hub's own rule, stricter than a path).
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


class CardError(ValueError):
    """A card cannot be built from a folder: the message says which file or field is missing and what needs it."""


@dataclass
class BuiltCard:
    """A filled card and what goes into the uploaded folder with it.

    Attributes:
        card: the `ModelCard` / `DatasetCard` (its text is the folder's README.md).
        kind: one of `KINDS`; repo_type: "model" or "dataset".
        source: the folder whose files are uploaded (the model folder, or the dataset root).
        extra_files: {path in the repo: local file} added beside them (plots, GIFs under `images/`).
    """

    card: object
    kind: str
    repo_type: str
    source: Path
    extra_files: dict[str, Path] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ folders
def looks_like_repo_id(value) -> bool:
    """Whether `value` has the shape of a Hub repo id, `owner/name`."""
    return isinstance(value, str) and bool(_REPO_ID.fullmatch(value)) and ".." not in value and "--" not in value


def is_repo_id(value) -> bool:
    """Whether a path recorded by a training run is a Hub repo id: shaped like one and not a local folder (a
    recorded `outputs/data` is a folder here, not a repository)."""
    return looks_like_repo_id(value) and not Path(value).expanduser().exists()


def read_json(path: Path, what: str) -> dict:
    """A JSON file's content; CardError naming the file and `what` needs it when it is missing or unreadable."""
    if not path.is_file():
        raise CardError(f"{path} not found: the card needs it for {what}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CardError(f"{path}: unreadable JSON ({error}); the card needs it for {what}") from error


def resolve_folder(path: str | Path) -> Path:
    """The folder to publish: `path` itself, or `path/model` for a training run's folder (whose `model/` holds the
    save_pretrained output and whose evaluation lies beside it)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CardError(f"{path} is not a folder (expected a LAPA model folder, a training run or a LeRobot dataset)")
    if not (path / "config.json").is_file() and not (path / "meta" / "info.json").is_file() \
            and (path / "model" / "config.json").is_file():
        return path / "model"
    return path


def detect_kind(folder: Path) -> str:
    """QUANTIZER, VLA, LAPA_7B (a converted LAPA-7B: backbone family "lwm") or DATASET (meta/info.json); CardError
    for anything else, saying what each kind is recognised by."""
    if (folder / "meta" / "info.json").is_file():
        return DATASET
    config_path = folder / "config.json"
    if config_path.is_file():
        config = read_json(config_path, "the model type")
        model_type = config.get("model_type")
        if model_type == "lapa_quantizer":
            return QUANTIZER
        if model_type == "lapa":
            backbone = (config.get("backbone_config") or {}).get("model_type")
            return LAPA_7B if backbone == "lwm" else VLA
        raise CardError(f"{folder}: config.json has model_type {model_type!r}; only LAPA models ('lapa_quantizer', "
                        "'lapa') and LeRobot datasets can be published with this command")
    if (folder / "adapter_config.json").is_file():
        raise CardError(f"{folder} is a LoRA adapter: merge it into a plain model first (python -m training.merge_lora "
                        "--adapter DIR --output DIR) and publish that")
    raise CardError(f"{folder} is not a LAPA quantizer, a LAPA VLA or a LeRobot dataset: it holds no config.json "
                    "(a save_pretrained model folder) and no meta/info.json (a LeRobot dataset)")


def check_model_files(folder: Path, kind: str) -> None:
    """The files a model repo needs to load with `AutoModel.from_pretrained(repo, trust_remote_code=True)`: weights,
    the remote code named by `auto_map`, and for a VLA its processor; CardError naming the first missing one."""
    if not (list(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file()):
        raise CardError(f"{folder}: no weights (*.safetensors) beside config.json")
    config = read_json(folder / "config.json", "the model type")
    auto_map = config.get("auto_map") or {}
    if "AutoModel" not in auto_map:
        raise CardError(f"{folder}: config.json has no auto_map['AutoModel'], so the repository would not load with "
                        "trust_remote_code=True; re-save the model with this project's modeling_lapa imported")
    references = [r for value in auto_map.values() for r in (value if isinstance(value, list) else [value]) if r]
    for reference in set(references):
        module = str(reference).split("--")[-1].rsplit(".", 1)[0]
        if not (folder / f"{module}.py").is_file():
            raise CardError(f"{folder}: the remote code {module}.py named by config.json's auto_map is missing")
    if kind in (VLA, LAPA_7B) and not (folder / "processor_config.json").is_file():
        raise CardError(f"{folder}: no processor_config.json: a VLA is published with its processor (save it next to "
                        "the model with processor.save_pretrained)")


def parameter_count(folder: Path) -> int | None:
    """Number of parameters in the folder's safetensors files, read from their headers (no tensor is loaded)."""
    from safetensors import safe_open

    total = 0
    files = sorted(folder.glob("*.safetensors"))
    for path in files:
        with safe_open(str(path), framework="numpy") as handle:
            for name in handle.keys():
                count = 1
                for size in handle.get_slice(name).get_shape():
                    count *= size
                total += count
    return total if files else None


# ------------------------------------------------------------------------------------------------ markdown
def fmt(value, digits: int = 3) -> str:
    """A table cell: floats to `digits` significant decimals, lists joined, None as an empty cell."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v, digits) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def settings_table(record: dict, keys: list[str]) -> str:
    """The named settings of a training record (those it has), as a two-column table."""
    rows = [[f"`{key}`", record[key]] for key in keys if record.get(key) not in (None, [], {}, "")]
    return table(["setting", "value"], rows)


def collapsed_json(summary: str, value: dict) -> str:
    """A JSON block folded under `summary` (the full record, readable but out of the way)."""
    return f"<details>\n<summary>{summary}</summary>\n\n```json\n{json.dumps(value, indent=2)}\n```\n\n</details>"


def image(extra_files: dict[str, Path], source: Path, name: str, alt: str) -> str:
    """Registers `source` to be copied to `images/<name>` and returns its Markdown link (relative, so the card shows
    it on the Hub and in the dry-run folder alike)."""
    extra_files[f"{IMAGES_DIR}/{name}"] = source
    return f"![{alt}]({IMAGES_DIR}/{name})"


def card_text(card_data, body: str) -> str:
    return f"---\n{card_data.to_yaml()}\n---\n\n{body.strip()}\n"


# ------------------------------------------------------------------------------------------------ evaluation
def read_eval_info(path: str | Path) -> tuple[dict, Path]:
    """(eval_info.json's content, its folder) from the folder `training/evaluate.py` wrote, or the file itself."""
    path = Path(path).expanduser()
    file = path / "eval_info.json" if path.is_dir() else path
    info = read_json(file, "the closed-loop results (--eval)")
    if not isinstance(info.get("per_task"), list) or not isinstance(info.get("overall"), dict):
        raise CardError(f"{file}: not an evaluation written by training/evaluate.py (no per_task / overall)")
    return info, file.parent


def names_folder(name, folder: Path) -> bool:
    """Whether a path recorded by another run (relative to where that run started) names `folder`: the same
    resolved path, or the same last two parts (`<run>/model`) when it was recorded from another directory."""
    if not name:
        return False
    recorded = Path(str(name)).expanduser()
    if recorded.resolve() == folder.resolve():
        return True
    return len(recorded.parts) >= 2 and recorded.parts[-2:] == folder.resolve().parts[-2:]


def find_eval_info(folder: Path, role: str) -> tuple[dict, Path] | None:
    """The evaluation that names `folder` in `role` ("policy", "vla" or "quantizer" of the world model), looked for
    where the quickstart writes it (`<root>/eval/` beside `<root>/<run>/model`); None when there is none."""
    for candidate in (folder.parent.parent / "eval" / "eval_info.json", folder.parent / "eval" / "eval_info.json"):
        if not candidate.is_file():
            continue
        try:
            info, where = read_eval_info(candidate)
        except CardError:
            continue
        if eval_names(info, folder, role):
            return info, where
    return None


def eval_names(info: dict, folder: Path, role: str) -> bool:
    """Whether the evaluation `info` ran `folder` as its policy (role "policy") or in its world model."""
    if role == "policy":
        return names_folder((info.get("policy") or {}).get("name"), folder)
    return names_folder((info.get("world_model") or {}).get(role), folder)


def task_set_name(info: dict) -> str:
    """"Meta-World MT10" / "Meta-World MT50", or the tasks themselves for a custom set."""
    group = (info.get("settings") or {}).get("task_group") or (info["per_task"][0].get("task_group") if
                                                                  info["per_task"] else "custom")
    if group and group != "custom":
        return f"Meta-World {group.upper()}"
    tasks = [entry["task"] for entry in info["per_task"]]
    shown = ", ".join(tasks[:4]) + (f" and {len(tasks) - 4} more" if len(tasks) > 4 else "")
    return f"Meta-World {shown}"


def closed_loop_eval_results(info: dict) -> list[EvalResult]:
    """The success rate over all tasks and per task, as model-index entries: task type "robotics", dataset
    "Meta-World <task set>" (the task as its config), metric `pc_success` with the episode count in its name and the
    95% Wilson interval and episode count in its args."""
    dataset_name = task_set_name(info)
    config = info.get("config") or {}
    group = (info.get("settings") or {}).get("task_group") or "custom"

    def result(entry: dict, dataset_config: str) -> EvalResult:
        n = int(entry["n_episodes"])
        return EvalResult(
            task_type="robotics", task_name="Closed-loop robot manipulation", dataset_type="metaworld",
            dataset_name=dataset_name, dataset_config=dataset_config, metric_type="pc_success",
            metric_name=f"success rate (%, {n} episode{'s' if n != 1 else ''})",
            metric_value=round(float(entry["pc_success"]), 2),
            metric_args={"n_episodes": n, "ci95": [round(float(v), 2) for v in entry.get("pc_success_ci95", [])],
                         "max_steps": config.get("max_steps"), "seed": config.get("seed")},
        )

    results = [result(info["overall"], group)]
    if len(info["per_task"]) > 1:  # one task: its result is the overall one
        results += [result(entry, entry["task"]) for entry in info["per_task"]]
    return results


def closed_loop_section(info: dict, where: Path, extra_files: dict[str, Path]) -> str:
    """The card's closed-loop results: per-task success with intervals, the overall rate, the chart."""
    rows = [[entry["task"], f"{entry['pc_success']:.1f}", _interval(entry), entry["n_episodes"]]
            for entry in info["per_task"]]
    overall = info["overall"]
    rows.append(["**overall**", f"{overall['pc_success']:.1f}", _interval(overall), overall["n_episodes"]])
    config = info.get("config") or {}
    text = [
        "## Closed-loop evaluation", "",
        f"In the Meta-World simulator ({task_set_name(info)}), from initial states no training episode used "
        f"(evaluation seed {config.get('seed', '?')}), at most {config.get('max_steps', '?')} control steps per "
        "episode; success as Meta-World defines it, with 95% Wilson intervals (`training/evaluate.py`, LeRobot's "
        "`eval_info.json` layout).", "",
        table(["task", "success (%)", "95% CI (%)", "episodes"], rows),
    ]
    chart = where / "success_per_task.png"
    if chart.is_file():
        text += ["", image(extra_files, chart, "success_per_task.png", "success rate per task")]
    return "\n".join(text)


def world_model_section(info: dict) -> str | None:
    """The imagined rollouts' PSNR per step against the real episode (and the held-still baseline), if any."""
    overall = info.get("overall") or {}
    imagined, still = overall.get("imagined_psnr_per_step"), overall.get("held_still_psnr_per_step")
    if not imagined:
        return None
    world = info.get("world_model") or {}
    rows = [[k + 1, value, still[k] if still and k < len(still) else None] for k, value in enumerate(imagined)]
    return "\n".join([
        "## World model in closed loop", "",
        f"The first episode of each task imagined from its first frame, one {world.get('gap_seconds', '?')} s gap at "
        "a time (the VLA's latent actions decoded by the quantizer), against the real episode: PSNR (dB) per step, "
        "mean over tasks, beside holding the first frame still.", "",
        table(["step", "imagined PSNR", "held-still PSNR"], rows),
    ])


def _interval(entry: dict) -> str:
    low, high = entry.get("pc_success_ci95") or (None, None)
    return "" if low is None else f"[{low:.1f}, {high:.1f}]"
