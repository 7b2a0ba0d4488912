"""Model cards for the three kinds of model folder: a trained latent action quantizer, a trained LAPA VLA, and the
converted LAPA-7B.

    from hub_cards.model_cards import quantizer_card, vla_card, lapa_7b_card

    built = vla_card("outputs/quickstart/lapa_finetuned/model", "me/lapa-mt10")   # eval found beside the run
    built.card.save("README.md")            # built.extra_files: the plots and GIF the card links under images/

The trained models' cards are filled from the run's own records: `training_config.json` beside the weights (the
settings and the training data), the held-out evaluation beside the run (`<run>/eval/final_metrics.json` for the
quantizer, `<run>/eval_metrics.json` for the VLA) and, when given or found, the closed-loop evaluation
(`eval_info.json` of `training/evaluate.py`) as `model-index`. Each card's usage snippet is written for the repo it
is published to and runs as written (the tests run it against the dry-run folder).
"""

from __future__ import annotations

import sys
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from .common import (
    CITATION, DEFAULT_LICENSE, LAPA_7B, MODEL_TAGS, PAPER_URL, QUANTIZER, VLA, BuiltCard, CardError, card_text,
    check_model_files, closed_loop_eval_results, closed_loop_section, collapsed_json, eval_names, find_eval_info,
    fmt, image, is_repo_id, parameter_count, read_eval_info, read_json, settings_table, table, world_model_section,
)

LAPA_7B_REPO = "latent-action-pretraining/LAPA-7B-openx"
LAPA_7B_ORIGINAL = f"https://huggingface.co/{LAPA_7B_REPO}"
QUANTIZER_SETTINGS = ["preset", "model_preset", "model", "init_from", "dataset", "video_folder", "gap_seconds",
                      "holdout_episodes", "max_steps", "batch_size", "effective_batch_size", "world_size",
                      "learning_rate", "adam_betas", "max_grad_norm", "mixed_precision", "replacement_cooldown_steps",
                      "seed"]
VLA_SETTINGS = ["stage", "preset", "target", "backbone", "init_from", "dataset", "train_episodes_per_task",
                "holdout_episodes", "gripper_dims", "num_action_bins", "freeze_vision_encoder", "lora",
                "max_steps", "batch_size", "effective_batch_size", "world_size", "learning_rate", "lr_schedule",
                "warmup_steps", "mixed_precision", "seed"]


def _training_record(folder: Path, what: str) -> dict:
    path = folder / "training_config.json"
    if not path.is_file():
        raise CardError(f"{folder} has no training_config.json (the training stage writes it beside the weights): the "
                        f"card needs it for {what}")
    return read_json(path, what)


def _hub_ids(values) -> list[str]:
    """The entries of a recorded list (or value) that are Hub repo ids: local folders cannot go into the metadata."""
    values = values if isinstance(values, list) else [values]
    return [v for v in values if is_repo_id(v)]


def _card_data(*, license: str, datasets: list[str], base_model: str | None, extra_tags: list[str],
               eval_results=None, model_name: str | None = None, **extra) -> ModelCardData:
    return ModelCardData(
        library_name="transformers", pipeline_tag="robotics", license=license, tags=MODEL_TAGS + extra_tags,
        datasets=datasets or None, base_model=base_model, eval_results=eval_results or None,
        model_name=model_name if eval_results else None, **extra,
    )


def _closed_loop(folder: Path, eval_path, role: str) -> tuple[dict, Path] | None:
    """The evaluation given with --eval (checked to be one), else the one found beside the run that names this
    folder in `role`; None when neither."""
    if eval_path is not None:
        return read_eval_info(eval_path)
    return find_eval_info(folder, role)


# ----------------------------------------------------------------------------------------------- quantizer
def quantizer_usage(repo_id: str, config: dict) -> str:
    gap = config.get("gap_seconds") or 0.6
    s, size = config.get("code_seq_len"), config.get("codebook_size")
    return f'''```python
import torch
from transformers import AutoModel

quantizer = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True).eval()
size = quantizer.config.image_size
pairs = torch.rand(2, 2, 3, size, size)  # (batch, [frame t, frame t+{gap:g}s], RGB, H, W), values in [0, 1]
with torch.no_grad():
    codes = quantizer.encode(pairs).codes              # (2, {s}) latent actions, codes in [0, {size})
    next_frame = quantizer.decode(pairs[:, 0], codes)  # (2, 3, H, W): the world model's frame t+{gap:g}s
print(codes.tolist(), tuple(next_frame.shape))
```'''


def _quantizer_metrics(metrics: dict) -> str:
    """Held-out reconstruction, codebook health and action probes of one source's final evaluation."""
    rec, codebook, probes = metrics["reconstruction"], metrics["codebook"], metrics.get("probes") or {}
    rows = [
        ["next-frame PSNR (dB), decoder", rec["prediction_psnr_of_mean_mse"]],
        ["next-frame PSNR (dB), copying frame t (baseline)", rec["copy_psnr_of_mean_mse"]],
        ["pairs predicted better than the copy", rec["fraction_pairs_better_than_copy"]],
        ["codebook perplexity (pooled, of |C|)", f"{codebook['perplexity']:.2f} of {codebook['max_perplexity']:g}"],
        ["perplexity per slot", codebook["perplexity_per_slot"]],
        ["smallest share of a code in a slot", codebook["min_code_fraction"]],
        ["distinct latent actions", codebook["num_distinct_latent_actions"]],
    ]
    text = [f"On {metrics.get('num_pairs', '?')} frame pairs of {metrics.get('num_episodes', '?')} episodes kept out "
            f"of training (step {metrics.get('step', '?')}):", "", table(["metric", "value"], rows)]
    if probes.get("available"):
        names = probes["action_names"]
        probe_rows = [[name, probes["best_latent_r2"].get(name), probes["best_leakage_r2"].get(name)]
                      for name in names]
        text += ["", "Action probes (R^2 on held-out pairs, best of a linear and an MLP probe): from the latent "
                 "action, and from frame t alone (the leakage baseline a latent action has to beat).", "",
                 table(["action dimension", "from the latent action", "from frame t alone"], probe_rows)]
    elif probes.get("note"):
        text += ["", f"Action probes: {probes['note']}."]
    return "\n".join(text)


def _find_plot(recorded: str, run_dir: Path, step) -> Path | None:
    """A plot path recorded by the evaluation (relative to where training ran), else the same file in the run's
    `eval/step-N/` folder."""
    path = Path(recorded)
    if path.is_file():
        return path
    fallback = run_dir / "eval" / (f"step-{int(step):07d}" if isinstance(step, int) else "") / path.name
    return fallback if fallback.is_file() else None


def _quantizer_evaluation(run_dir: Path, extra_files: dict) -> str:
    metrics_path = run_dir / "eval" / "final_metrics.json"
    final = read_json(metrics_path, "the held-out metrics (written at the end of training/train_quantizer.py)")
    sources = final["sources"] if "sources" in final else {"": final}
    text = ["## Held-out evaluation", ""]
    for index, (name, metrics) in enumerate(sources.items()):
        if name:
            text += [f"### {name}", ""]
        text += [_quantizer_metrics(metrics), ""]
        for plot, recorded in (metrics.get("plots") or {}).items():
            found = _find_plot(recorded, run_dir, metrics.get("step"))
            if found is not None:
                text.append(image(extra_files, found, f"{plot}{'-' + str(index) if name else ''}.png",
                                  plot.replace("_", " ")) + "\n")
    return "\n".join(text)


def quantizer_card(folder: str | Path, repo_id: str, *, eval_path=None, rollout: str | Path | None = None,
                   license: str = DEFAULT_LICENSE, datasets: list[str] | None = None,
                   base_model: str | None = None) -> BuiltCard:
    """The card of a trained quantizer folder (`<run>/model`): usage, architecture, training settings, held-out
    metrics and plots, and the world model's closed-loop rollouts when an evaluation names this quantizer."""
    folder = Path(folder)
    check_model_files(folder, QUANTIZER)
    config = read_json(folder / "config.json", "the architecture")
    record = _training_record(folder, "the training settings and data")
    extra_files: dict[str, Path] = {}
    evaluation = _quantizer_evaluation(folder.parent, extra_files)
    closed = _closed_loop(folder, eval_path, "quantizer")
    if closed is not None and eval_path is not None and not eval_names(closed[0], folder, "quantizer"):
        raise CardError(f"--eval {eval_path}: that evaluation did not run this quantizer as its world model "
                        "(evaluate.py --quantizer); a quantizer's card shows only its world model's rollouts")
    rollout = Path(rollout) if rollout else (folder.parent.parent / "rollout.gif")
    params = parameter_count(folder)
    architecture = table(["", ""], [
        ["frames", f"{config.get('image_size')} px, patches of {config.get('patch_size')}"],
        ["latent action", f"{config.get('code_seq_len')} codes from a codebook of {config.get('codebook_size')}"
                          + (" per slot" if config.get("codebook_per_slot") else " (shared by the slots)")],
        ["frame gap", f"{config.get('gap_seconds')} s"],
        ["width / depths", f"{config.get('hidden_size')} / {config.get('spatial_depth')} spatial, "
                           f"{config.get('temporal_depth')} temporal"],
        ["parameters", f"{params / 1e6:.2f}M" if params else ""],
    ])
    body = [
        f"# LAPA latent action quantizer: {repo_id.split('/')[-1]}", "",
        f"A latent action quantizer of [LAPA]({PAPER_URL}) (Latent Action Pretraining from Videos), trained with the "
        "LAPA toolkit. Its encoder (inverse dynamics) labels a frame pair (x_t, x_t+H) with a latent action, a few "
        "discrete codes; its decoder (world model) predicts x_t+H from x_t and the codes. Labelling videos with it "
        "gives a latent VLA its pretraining targets.", "",
        architecture, "", "## Usage", "", quantizer_usage(repo_id, config), "",
        "## Training", "", "Data: " + fmt(record.get("dataset", []) + record.get("video_folder", [])) + ".", "",
        settings_table(record, QUANTIZER_SETTINGS), "", collapsed_json("every setting (training_config.json)", record),
        "", evaluation,
    ]
    if rollout.is_file():
        body += ["## Imagined rollout", "", "A VLA's latent actions decoded by this quantizer, one gap at a time from "
                 "a real first frame (`training/imagine.py`): imagination by neural inference alone.", "",
                 image(extra_files, rollout, "rollout.gif", "imagined rollout"), ""]
    if closed is not None and (section := world_model_section(closed[0])):
        body += [section, ""]
    body += ["## Citation", "", CITATION]
    data = _card_data(license=license, datasets=datasets if datasets is not None else _hub_ids(record.get("dataset")),
                      base_model=base_model or (record.get("init_from") if is_repo_id(record.get("init_from")) else
                                                None), extra_tags=["latent-action-quantizer", "world-model"])
    return BuiltCard(ModelCard(card_text(data, "\n".join(body))), QUANTIZER, "model", folder, extra_files)


# ----------------------------------------------------------------------------------------------------- VLA
def vla_usage(repo_id: str, target: str, datasets: list[str]) -> str:
    dataset = f', dataset="{datasets[0]}"' if len(datasets) > 1 else ""
    lines = [
        "import numpy as np", "from transformers import AutoModel", "",
        f'vla = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True).eval()  # its processor comes with it',
        "images = np.random.default_rng(0).integers(0, 256, size=(1, 128, 128, 3), dtype=np.uint8)  # (B, H, W, 3) RGB",
        'codes = vla.predict_latent_actions(images, ["open the drawer"])  # (1, s) latent action codes',
        "print(codes.tolist())",
    ]
    if target == "action":
        lines += [f'actions = vla.predict_action(images, ["open the drawer"]{dataset})  # (1, D) float32 robot actions',
                  "print(actions)"]
    return "```python\n" + "\n".join(lines) + "\n```"


def _vla_evaluation(run_dir: Path, target: str, extra_files: dict) -> str:
    final = read_json(run_dir / "eval_metrics.json", "the held-out metrics (written at the end of training)")["final"]
    if not final:
        raise CardError(f"{run_dir / 'eval_metrics.json'} has no final evaluation (a run with no held-out frames?)")
    rows = [["token accuracy", final.get("token_accuracy"), final.get("majority_baseline_accuracy")],
            ["token accuracy per position", final.get("token_accuracy_per_position"),
             final.get("majority_baseline_accuracy_per_position")],
            ["loss", final.get("loss"), None]]
    if "action_l1_teacher_forced" in final:
        rows.append(["decoded action L1 (teacher-forced)", final["action_l1_teacher_forced"],
                     final.get("majority_baseline_action_l1")])
    text = ["## Held-out evaluation", "",
            f"Teacher-forced on {final.get('eval_frames', '?')} frames of episodes kept out of training ({target} "
            "targets, each a softmax over its own token block), beside the majority baseline (the most frequent "
            "training token of each position).", "",
            table(["metric", "this model", "majority baseline"], rows)]
    curves = run_dir / "training_curves.png"
    if curves.is_file():
        text += ["", image(extra_files, curves, "training_curves.png", "training curves")]
    return "\n".join(text)


def _vla_base_model(record: dict) -> str | None:
    for candidate in (record.get("init_from"), record.get("backbone")):
        if is_repo_id(candidate):
            return candidate
    return None


def vla_card(folder: str | Path, repo_id: str, *, eval_path=None, rollout: str | Path | None = None,
             license: str = DEFAULT_LICENSE, datasets: list[str] | None = None,
             base_model: str | None = None) -> BuiltCard:
    """The card of a trained VLA folder (`<run>/model` with its processor): usage, training settings, held-out
    metrics and curves, and the closed-loop success rates as `model-index` when an evaluation is given or found."""
    folder = Path(folder)
    check_model_files(folder, VLA)
    record = _training_record(folder, "the training data, target and backbone")
    missing = [key for key in ("dataset", "target", "backbone") if key not in record]
    if missing:
        raise CardError(f"{folder / 'training_config.json'} has no {', '.join(missing)}: the card needs them")
    target = record["target"]
    extra_files: dict[str, Path] = {}
    evaluation = _vla_evaluation(folder.parent, target, extra_files)
    closed = _closed_loop(folder, eval_path, "policy")
    world = find_eval_info(folder, "vla") if eval_path is None else None
    if closed is not None and eval_path is not None and not eval_names(closed[0], folder, "policy"):
        print(f"publish: warning: --eval {eval_path} evaluated {closed[0].get('policy', {}).get('name')!r}, not "
              f"{folder}; its results go into this card as given", file=sys.stderr)
    action_datasets = sorted(read_json(folder / "action_tokenizer.json", "the action datasets").get("datasets", {})) \
        if (folder / "action_tokenizer.json").is_file() else []
    rollout = Path(rollout) if rollout else (folder.parent.parent / "rollout.gif" if target == "latent" else None)
    stage = "latent pretraining" if target == "latent" else "action finetuning"
    body = [
        f"# LAPA vision-language-action model: {repo_id.split('/')[-1]}", "",
        f"A [LAPA]({PAPER_URL}) VLA ({stage} stage), trained with the LAPA toolkit on a `{record['backbone']}` "
        "backbone. Given a camera image and an instruction it predicts a latent action (codes of the LAPA quantizer"
        + (") and, finetuned on robot data, the robot's action (per-dimension bins decoded to floats)." if
           target == "action" else ")."), "",
        "## Usage", "", vla_usage(repo_id, target, action_datasets), "",
        "## Training", "", f"Data: {fmt(record['dataset'])}"
        + (f"; initialised from `{record['init_from']}`" if record.get("init_from") else "") + ".", "",
        settings_table(record, VLA_SETTINGS), "", collapsed_json("every setting (training_config.json)", record), "",
        evaluation, "",
    ]
    if closed is not None:
        body += [closed_loop_section(*closed, extra_files), ""]
    # The world model's rollouts belong on the card of the VLA that drove them (the latent-pretrained one).
    driven = next((x[0] for x in (closed, world) if x is not None and eval_names(x[0], folder, "vla")), None)
    if driven is not None and (section := world_model_section(driven)):
        body += [section, ""]
    if rollout is not None and rollout.is_file():
        body += ["## Imagined rollout", "", "This model's latent actions decoded by the quantizer, one gap at a time "
                 "(`training/imagine.py`).", "", image(extra_files, rollout, "rollout.gif", "imagined rollout"), ""]
    body += ["## Citation", "", CITATION]
    data = _card_data(
        license=license, datasets=datasets if datasets is not None else _hub_ids(record["dataset"]),
        base_model=base_model or _vla_base_model(record), extra_tags=["vision-language-action"],
        eval_results=closed_loop_eval_results(closed[0]) if closed is not None else None,
        model_name=repo_id.split("/")[-1])
    return BuiltCard(ModelCard(card_text(data, "\n".join(body))), VLA, "model", folder, extra_files)


# ------------------------------------------------------------------------------------------------ LAPA-7B
LAPA_7B_CHECKS = """- The backbone family `lwm`: LLaMA-2-7B (RoPE theta 5e7) whose one input table and one output matrix
  hold the authors' separate text (32000), vision (8448) and latent (8) tables and heads as row blocks; Meta's
  interleaved RoPE pairs are permuted into transformers' half-split layout at conversion (attention scores
  unchanged). LWM's VQGAN runs inside the model in fp32 (256 px -> 16 x 16 codes), with the authors' preprocessing
  (their OpenCV resize reproduced exactly) and prompt.
- Checked against golden outputs of the authors' code at a tiny size: the logits of every head at every unpadded
  position agree to 3e-5, the VQGAN gives exactly their codes (also for a non-square image), and
  `predict_latent_actions` returns the raw argmax ids [3, 2, 2, 0] where the authors' sampler returns the
  end-of-sequence-truncated [3, 2, 0, 0].
- The 7B parameter trees map onto the 7B model with no missing or unexpected key. The real 13.6 GB checkpoint was
  not run end to end against the authors' code: compare a few predictions with theirs before relying on it."""


def lapa_7b_usage(repo_id: str) -> str:
    return f'''```python
import numpy as np
import torch
from transformers import AutoModel

vla = AutoModel.from_pretrained("{repo_id}", dtype=torch.bfloat16, trust_remote_code=True).eval()
image = np.random.default_rng(0).integers(0, 256, size=(256, 256, 3), dtype=np.uint8)  # an RGB camera image
codes = vla.predict_latent_actions(image, "pick up the spoon")  # (1, s) latent action ids (raw argmax)
print(codes.tolist())
```'''


def lapa_7b_card(folder: str | Path, repo_id: str, *, license: str | None = None) -> BuiltCard:
    """The card of the converted LAPA-7B folder (`python -m modeling_lapa.convert_lapa_jax`): the original model as
    its base, its license deferred to the original repository (the paper states none), what was checked."""
    folder = Path(folder)
    check_model_files(folder, LAPA_7B)
    config = read_json(folder / "config.json", "the latent action layout")
    layout = f"{config.get('latent_sequence_length')} codes of {config.get('num_latent_codes')}"
    license_fields = ({"license": license} if license else
                      {"license": "other", "license_name": "lapa-7b-openx", "license_link": LAPA_7B_ORIGINAL})
    body = [
        f"# LAPA-7B (PyTorch / transformers): {repo_id.split('/')[-1]}", "",
        f"The authors' released [LAPA-7B]({LAPA_7B_ORIGINAL}) vision-language-action model ([paper]({PAPER_URL})), "
        "converted from its JAX files to a transformers `LAPAForActionPrediction` with the LAPA toolkit "
        "(`python -m modeling_lapa.convert_lapa_jax`): sharded safetensors, the model and processor code "
        "(`trust_remote_code=True`), and the processor (LLaMA-2 tokenizer, the authors' prompt and image "
        f"preprocessing). It predicts latent actions ({layout}) from an image and an instruction; finetune it on "
        "robot actions to act.", "",
        "## License", "",
        ("The weights are the authors'. The paper states no license: the terms are those of the original repository, "
         f"[{LAPA_7B_REPO}]({LAPA_7B_ORIGINAL}), which this card does not restate. The backbone derives from "
         "LLaMA-2 (through LWM), whose own license terms may also apply." if not license else
         f"`{license}` (set by the publisher). The weights are the authors' ([{LAPA_7B_REPO}]({LAPA_7B_ORIGINAL}))."),
        "", "## Usage", "", lapa_7b_usage(repo_id), "",
        "## What was checked against the authors' code", "", LAPA_7B_CHECKS, "",
        "## Citation", "", CITATION,
    ]
    data = ModelCardData(library_name="transformers", pipeline_tag="robotics", base_model=LAPA_7B_REPO,
                         tags=MODEL_TAGS + ["vision-language-action", "lwm"], **license_fields)
    return BuiltCard(ModelCard(card_text(data, "\n".join(body))), LAPA_7B, "model", folder, {})
