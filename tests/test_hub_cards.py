"""`hub_cards`: model and dataset cards filled from real run outputs, and `python -m hub_cards.publish`.

One workspace in the quickstart's layout, made by the real stages at tiny sizes (a few seconds in all): a LeRobot
dataset written by our writer, a quantizer trained 2 steps with its held-out evaluation and plots, the dataset
labelled with it, a VLA latent-pretrained and one action-finetuned 2 steps each, and a real closed-loop evaluation
(the scripted expert on reach-v3, 1 episode). The converted LAPA-7B is the authors' tiny checkpoint converted with the
CLI (as in test_lapa_7b_folder.py).

The Hub is not reachable here: the upload is tested up to `HfApi` (the token and offline checks with the real
environment; the calls themselves with a recording stand-in for `HfApi`), everything before it for real.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import DatasetCard, ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from transformers import AutoModel, AutoProcessor

import modeling_lapa  # noqa: F401  (registers the Auto classes)
import processing_lapa  # noqa: F401
from data_fixtures import write_with_writer
from support import run_without_the_project

from hub_cards.common import LAPA_7B, QUANTIZER, VLA, CardError, detect_kind, resolve_folder
from hub_cards.model_cards import LAPA_7B_REPO
from hub_cards.publish import build_card, build_parser, main, upload

TINY_QUANTIZER = {"hidden_size": 32, "quant_dim": 8, "codebook_size": 8, "code_seq_len": 4, "image_size": 32,
                  "patch_size": 4, "spatial_depth": 1, "temporal_depth": 1, "num_heads": 2, "head_dim": 16}
TINY_VLA = {"image_size": 32, "patch_size": 8, "hidden_size": 64, "num_layers": 2}
SHORT_RUN = dict(max_steps=2, eval_every=2, save_every=2, batch_size=4, holdout_episodes=1, report_to="none",
                 log_every=1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _train_runs(root: Path) -> None:
    from training import train_quantizer, vla_training
    from training.label_latents import LabellingConfig, label_latents

    train_quantizer.train(train_quantizer.config_from_preset(
        "tiny", dataset=[str(root / "metaworld")], output_dir=str(root / "quantizer"), model=TINY_QUANTIZER,
        eval_max_pairs=64, probe_train_pairs=64, **SHORT_RUN))
    label_latents(LabellingConfig(dataset=str(root / "metaworld"), quantizer=str(root / "quantizer/model"),
                                  output=str(root / "metaworld_latent"), num_workers=0, batch_size=16))
    vla_training.train(vla_training.config_from_preset(
        "pretrain", "tiny", dataset=[str(root / "metaworld_latent")], output_dir=str(root / "lapa"), tiny=TINY_VLA,
        num_action_bins=16, eval_max_frames=16, warmup_steps=0, **SHORT_RUN))
    vla_training.train(vla_training.config_from_preset(
        "finetune", "tiny", dataset=[str(root / "metaworld")], init_from=str(root / "lapa/model"),
        output_dir=str(root / "lapa_finetuned"), tiny=TINY_VLA, num_action_bins=16, eval_max_frames=16,
        warmup_steps=0, **SHORT_RUN))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The quickstart's layout (<root>/metaworld, quantizer, metaworld_latent, lapa, lapa_finetuned, eval,
    rollout.gif) made by the real stages; `real_eval/` is the untouched closed-loop evaluation of the expert."""
    from PIL import Image

    from training.evaluate import EvaluationConfig, evaluate

    root = tmp_path_factory.mktemp("hub_cards")
    write_with_writer(root / "metaworld", lengths=(12, 9, 15, 10), fps=10)
    _train_runs(root)
    evaluate(EvaluationConfig(policy="expert", tasks="reach-v3", episodes_per_task=1, max_steps=60,
                              output_dir=str(root / "real_eval"), progress=False, batch_size=1, num_workers=1))
    # The quickstart's evaluation names its models by the paths given then (relative to where it ran): the real
    # evaluation's results, as if run on the finetuned VLA with the world model of the latent VLA and quantizer.
    info = json.loads((root / "real_eval/eval_info.json").read_text())
    info["policy"]["name"] = "outputs/quickstart/lapa_finetuned/model"
    info["world_model"] = {"vla": "outputs/quickstart/lapa/model", "quantizer": "outputs/quickstart/quantizer/model",
                           "gap_seconds": 0.6, "gap_control_steps": 6}
    info["overall"]["imagined_psnr_per_step"] = [21.5, 19.25]
    info["overall"]["held_still_psnr_per_step"] = [18.0, 16.5]
    (root / "eval").mkdir()
    (root / "eval/eval_info.json").write_text(json.dumps(info))
    shutil.copy(root / "real_eval/success_per_task.png", root / "eval/success_per_task.png")
    frames = [Image.fromarray(np.full((16, 16, 3), 40 * k, np.uint8)) for k in range(3)]
    frames[0].save(root / "rollout.gif", save_all=True, append_images=frames[1:], duration=200)
    return root


def _dry_run(path: Path, repo_id: str, output: Path, *extra: str) -> Path:
    assert main([str(path), "--repo-id", repo_id, "--dry-run", "--output", str(output), *extra]) == 0
    return output


def _front_matter(readme: Path) -> dict:
    return yaml.safe_load(readme.read_text().split("---\n")[1])


def _linked_files_exist(card_text: str, folder: Path) -> list[str]:
    links = re.findall(r"\]\((images/[^)]+)\)", card_text)
    assert all((folder / link).is_file() for link in links), links
    return links


def _usage_snippet(card, repo_id: str, folder: Path) -> str:
    code = re.search(r"```python\n(.*?)```", card.text, re.S).group(1)
    assert f'"{repo_id}"' in code
    return code.replace(f'"{repo_id}"', repr(str(folder)))


def _weights_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def quantizer_repo(workspace, tmp_path_factory):
    return _dry_run(workspace / "quantizer", "me/laq-tiny", tmp_path_factory.mktemp("q") / "repo")


@pytest.fixture(scope="module")
def vla_repo(workspace, tmp_path_factory):
    return _dry_run(workspace / "lapa_finetuned/model", "me/lapa-tiny", tmp_path_factory.mktemp("v") / "repo")


@pytest.fixture(scope="module")
def latent_vla_repo(workspace, tmp_path_factory):
    return _dry_run(workspace / "lapa", "me/lapa-latent-tiny", tmp_path_factory.mktemp("l") / "repo",
                    "--dataset-id", "me/mw-latent", "--base-model", "HuggingFaceTB/SmolVLM-256M-Instruct")


def test_quantizer_card_holds_the_runs_records_and_its_folder_loads(workspace, quantizer_repo):
    card = ModelCard.load(quantizer_repo / "README.md")
    data = card.data
    assert (data.library_name, data.pipeline_tag, data.license) == ("transformers", "robotics", "apache-2.0")
    assert {"lapa", "robotics", "latent-actions"} <= set(data.tags)
    assert data.datasets is None  # the training data is a local folder: not a Hub id to put in the metadata
    final = json.loads((workspace / "quantizer/eval/final_metrics.json").read_text())
    assert f"{final['reconstruction']['prediction_psnr_of_mean_mse']:.3f}" in card.text
    assert "from frame t alone" in card.text and "<details>" in card.text and "`gap_seconds`" in card.text
    links = _linked_files_exist(card.text, quantizer_repo)
    assert {"images/codebook_usage.png", "images/reconstructions.png", "images/rollout.gif"} <= set(links)
    assert "## World model in closed loop" in card.text and "21.500" in card.text  # the evaluation naming it
    assert "## Closed-loop evaluation" not in card.text and data.eval_results is None  # success is the policy's
    assert {"config.json", "model.safetensors", "modeling_lapa_quantizer.py", "training_config.json"} <= {
        p.name for p in quantizer_repo.iterdir()}
    loaded = AutoModel.from_pretrained(quantizer_repo)
    assert _weights_equal(loaded, AutoModel.from_pretrained(workspace / "quantizer/model"))


def test_vla_card_model_index_parses_back_with_huggingface_hubs_readers(workspace, tmp_path, capsys):
    repo = _dry_run(workspace / "lapa_finetuned", "me/lapa-tiny", tmp_path / "repo", "--eval",
                    str(workspace / "real_eval"))
    assert "evaluated 'expert'" in capsys.readouterr().err  # given explicitly: used, with a warning
    card = ModelCard.load(repo / "README.md")
    results = card.data.eval_results
    assert card.data.model_name == "lapa-tiny" and len(results) == 1  # one task: the overall result only
    result = results[0]
    assert (result.task_type, result.dataset_name, result.metric_type) == ("robotics", "Meta-World reach-v3",
                                                                           "pc_success")
    info = json.loads((workspace / "real_eval/eval_info.json").read_text())
    assert result.metric_value == pytest.approx(info["overall"]["pc_success"])
    assert "1 episode" in result.metric_name and result.metric_args["n_episodes"] == 1
    assert result.metric_args["ci95"] == pytest.approx(info["overall"]["pc_success_ci95"], abs=0.01)
    name, parsed = model_index_to_eval_results(_front_matter(repo / "README.md")["model-index"])
    assert name == "lapa-tiny" and parsed == results


def test_vla_card_fields_images_and_folder(workspace, vla_repo):
    card = ModelCard.load(vla_repo / "README.md")
    assert (card.data.pipeline_tag, card.data.library_name) == ("robotics", "transformers")
    assert "token accuracy" in card.text and "decoded action L1" in card.text and "`target` | action" in card.text
    assert card.data.eval_results and card.data.eval_results[0].dataset_name == "Meta-World reach-v3"  # found
    links = _linked_files_exist(card.text, vla_repo)
    assert {"images/training_curves.png", "images/success_per_task.png"} <= set(links)
    assert "## World model in closed loop" not in card.text  # its rollouts were driven by the latent VLA
    assert {"processor_config.json", "action_tokenizer.json", "modeling_lapa.py", "training_config.json"} <= {
        p.name for p in vla_repo.iterdir()}
    model = AutoModel.from_pretrained(vla_repo)
    assert _weights_equal(model, AutoModel.from_pretrained(workspace / "lapa_finetuned/model"))
    processor = AutoProcessor.from_pretrained(vla_repo)
    assert processor.action_tokenizer == model.processor.action_tokenizer


def test_latent_vla_card_has_the_world_model_and_the_rollout(latent_vla_repo):
    card = ModelCard.load(latent_vla_repo / "README.md")
    assert card.data.eval_results is None  # it was not the evaluated policy
    assert card.data.datasets == ["me/mw-latent"] and card.data.base_model == "HuggingFaceTB/SmolVLM-256M-Instruct"
    assert "## World model in closed loop" in card.text and "images/rollout.gif" in card.text
    assert "predict_action" not in card.text  # a latent-pretrained model has no action tokens to use
    _linked_files_exist(card.text, latent_vla_repo)


def test_usage_snippets_run_as_written_without_the_project(quantizer_repo, vla_repo, latent_vla_repo, tmp_path):
    snippets = []
    for repo, repo_id in ((quantizer_repo, "me/laq-tiny"), (vla_repo, "me/lapa-tiny"),
                          (latent_vla_repo, "me/lapa-latent-tiny")):
        snippets.append(_usage_snippet(ModelCard.load(repo / "README.md"), repo_id, repo))
    script = "\n".join(f"exec({code!r}, {{}})\nprint('snippet {i} ran')" for i, code in enumerate(snippets))
    done = run_without_the_project(script, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(f"snippet {i} ran" in done.stdout for i in range(3)), done.stdout


# -------------------------------------------------------------------------------------------------- LAPA-7B
@pytest.fixture(scope="module")
def lapa_7b_folder(tmp_path_factory):
    """The authors' tiny params + VQGAN + a tiny tokenizer.model converted with the CLI (test_lapa_7b_folder.py)."""
    pytest.importorskip("sentencepiece")
    from test_lapa_7b_folder import HERE, tiny_lwm_config, train_tiny_sentencepiece

    from modeling_lapa.convert_lapa_jax import main as convert

    work = tmp_path_factory.mktemp("lapa_7b")
    train_tiny_sentencepiece(work / "tokenizer.model")
    (work / "lwm.json").write_text(json.dumps(tiny_lwm_config()))
    assert convert(["--params", str(HERE / "tiny_delta_params"), "--vqgan", str(HERE / "tiny_vqgan.pkl"),
                    "--tokenizer", str(work / "tokenizer.model"), "--config", str(work / "lwm.json"),
                    "--dtype", "float32", "--output", str(work / "lapa-7b")]) == 0
    return work / "lapa-7b"


def test_lapa_7b_card_defers_to_the_original_and_its_snippet_runs(lapa_7b_folder, tmp_path):
    assert detect_kind(lapa_7b_folder) == LAPA_7B
    repo = _dry_run(lapa_7b_folder, "me/LAPA-7B-pytorch", tmp_path / "repo")
    card = ModelCard.load(repo / "README.md")
    assert card.data.base_model == LAPA_7B_REPO and card.data.pipeline_tag == "robotics"
    assert card.data.license == "other" and card.data.license_link.endswith(LAPA_7B_REPO)
    assert "paper states no license" in card.text and "3e-5" in card.text and "[3, 2, 2, 0]" in card.text
    assert "AutoModel.from_pretrained" in card.text
    code = _usage_snippet(card, "me/LAPA-7B-pytorch", repo)
    done = run_without_the_project(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"\[\[\d+, \d+, \d+, \d+\]\]", done.stdout), done.stdout


# ------------------------------------------------------------------------------------------------- datasets
def test_labelled_dataset_card_follows_lerobot_and_describes_the_labels(workspace, tmp_path):
    from training.data import LatentLabelLayout, load_lerobot_dataset

    repo = _dry_run(workspace / "metaworld_latent", "me/mw-latent", tmp_path / "repo", "--quantizer-id", "me/laq")
    card = DatasetCard.load(repo / "README.md")
    assert "LeRobot" in card.data.tags and card.data.task_categories == ["robotics"]
    assert card.data.configs == [{"config_name": "default", "data_files": "data/*/*.parquet"}]
    assert card.data.license == "apache-2.0" and "codebase version v3.0" in card.text
    layout = LatentLabelLayout.read(load_lerobot_dataset(workspace / "metaworld_latent"))
    for text in ("## Latent actions", f"| codebook size, \\|C\\| | {layout.codebook_size} |",
                 f"| codes per frame, s | {layout.code_seq_len} |", "0.6 s = 6 frames at 10 fps",
                 "[me/laq](https://huggingface.co/me/laq)"):
        assert text in card.text, text
    copied = load_lerobot_dataset(repo)
    assert len(copied) == 46 and LatentLabelLayout.read(copied) == layout
    assert copied[5]["latent_action"].tolist() == load_lerobot_dataset(workspace / "metaworld_latent")[5][
        "latent_action"].tolist()
    assert not (repo / ".labelling").exists()


def test_plain_dataset_card_has_no_latent_section_and_its_configs_load(workspace, tmp_path):
    import datasets

    repo = _dry_run(workspace / "metaworld", "me/mw", tmp_path / "repo")
    card = DatasetCard.load(repo / "README.md")
    assert card.data.tags == ["LeRobot"] and "## Latent actions" not in card.text
    assert "[meta/info.json](meta/info.json)" in card.text
    frames = datasets.load_dataset(str(repo), split="train")  # through the card's `configs`
    assert len(frames) == 46 and "action" in frames.column_names


# --------------------------------------------------------------------------------------------------- errors
def _error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("publish: error: ") or "publish: error: " in err, err
    return err


def _copy_model(source: Path, target: Path, without: str) -> Path:
    shutil.copytree(source, target)
    (target / "model" / without).unlink()
    return target


@pytest.mark.parametrize("repo_id", ["lapa", "me/lapa/x", "-me/lapa", "me/la pa", "me/..lapa", ""])
def test_a_repo_id_that_is_not_owner_name_is_refused(workspace, repo_id, tmp_path, capsys):
    err = _error([str(workspace / "quantizer"), f"--repo-id={repo_id}", "--dry-run", "--output",
                  str(tmp_path / "o")], capsys)
    assert "owner/name" in err and not (tmp_path / "o").exists()


def test_folders_that_are_none_of_the_three_kinds(workspace, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = _error([str(tmp_path / "empty"), "--repo-id", "me/x", "--dry-run", "--output", str(tmp_path / "o")], capsys)
    assert "not a LAPA quantizer, a LAPA VLA or a LeRobot dataset" in err
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert/config.json").write_text(json.dumps({"model_type": "bert"}))
    assert "model_type 'bert'" in _error([str(tmp_path / "bert"), "--repo-id", "me/x", "--dry-run", "--output",
                                          str(tmp_path / "o")], capsys)
    assert "is not a folder" in _error([str(tmp_path / "missing"), "--repo-id", "me/x", "--dry-run", "--output",
                                        str(tmp_path / "o")], capsys)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter/adapter_config.json").write_text("{}")
    assert "training.merge_lora" in _error([str(tmp_path / "adapter"), "--repo-id", "me/x", "--dry-run",
                                            "--output", str(tmp_path / "o")], capsys)


def test_a_missing_card_field_is_named(workspace, tmp_path, capsys):
    vla = _copy_model(workspace / "lapa_finetuned", tmp_path / "vla", "training_config.json")
    err = _error([str(vla), "--repo-id", "me/x", "--dry-run", "--output", str(tmp_path / "o1")], capsys)
    assert "no training_config.json" in err and "training data, target and backbone" in err
    vla = _copy_model(workspace / "lapa_finetuned", tmp_path / "vla2", "processor_config.json")
    assert "processor_config.json" in _error([str(vla), "--repo-id", "me/x", "--dry-run", "--output",
                                              str(tmp_path / "o2")], capsys)
    quantizer = shutil.copytree(workspace / "quantizer", tmp_path / "q")
    (quantizer / "eval/final_metrics.json").unlink()
    err = _error([str(quantizer), "--repo-id", "me/x", "--dry-run", "--output", str(tmp_path / "o3")], capsys)
    assert "final_metrics.json not found" in err and "held-out metrics" in err
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3"))


def test_options_that_do_not_fit(workspace, tmp_path, capsys):
    base = [str(workspace / "quantizer"), "--repo-id", "me/x"]
    assert "--dry-run needs --output" in _error(base + ["--dry-run"], capsys)
    (tmp_path / "full").mkdir()
    (tmp_path / "full/file").write_text("x")
    assert "not an empty folder" in _error(base + ["--dry-run", "--output", str(tmp_path / "full")], capsys)
    assert "--quantizer-id does not apply" in _error(base + ["--dry-run", "--output", str(tmp_path / "o"),
                                                             "--quantizer-id", "me/q"], capsys)
    assert "--eval does not apply" in _error([str(workspace / "metaworld"), "--repo-id", "me/x", "--dry-run",
                                              "--output", str(tmp_path / "o"), "--eval", str(workspace / "eval")],
                                             capsys)
    assert "did not run this quantizer" in _error(base + ["--dry-run", "--output", str(tmp_path / "o"), "--eval",
                                                          str(workspace / "real_eval")], capsys)
    assert "is not a Hub repository id" in _error(base + ["--dry-run", "--output", str(tmp_path / "o"),
                                                          "--base-model", "not a model"], capsys)
    assert main(base[:1] + ["--dry-run"]) == 2  # argparse: --repo-id is required
    assert "publish: error:" in capsys.readouterr().err


def test_no_token_is_an_error_before_anything_is_staged(workspace, monkeypatch, tmp_path, capsys):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    err = _error([str(workspace / "quantizer"), "--repo-id", "me/x"], capsys)
    assert "hf auth login" in err and "HF_TOKEN" in err
    # With a token, the tests' HF_HUB_OFFLINE=1 is the next thing that stops the upload, and says so.
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE is set" in _error([str(workspace / "quantizer"), "--repo-id", "me/x"], capsys)


class RecordingHub:
    """Stands in for `HfApi` (the Hub is not reachable here): records the calls `upload` makes."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", sorted(p.name for p in Path(kwargs["folder_path"]).iterdir()), kwargs))


def test_upload_creates_the_repo_then_uploads_the_staged_folder(quantizer_repo):
    hub = RecordingHub()
    url = upload(quantizer_repo, "me/laq-tiny", "model", private=True, api=hub)
    assert url == "https://huggingface.co/me/laq-tiny"
    (name, repo_id, kwargs), (name2, files, kwargs2) = hub.calls
    assert (name, repo_id, kwargs) == ("create_repo", "me/laq-tiny", {"repo_type": "model", "private": True,
                                                                      "exist_ok": True})
    assert name2 == "upload_folder" and kwargs2["repo_id"] == "me/laq-tiny" and kwargs2["repo_type"] == "model"
    assert {"README.md", "config.json", "model.safetensors", "images"} <= set(files)


def test_publish_without_dry_run_stages_uploads_and_cleans_up(workspace, monkeypatch, capsys):
    """The whole command up to the Hub: the token is read, the Hub is taken as reachable, `HfApi` records."""
    import huggingface_hub
    from huggingface_hub import constants

    hubs = []

    def make_hub(token=None):
        hubs.append(RecordingHub())
        hubs[-1].token = token
        return hubs[-1]

    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", make_hub)
    assert main([str(workspace / "metaworld_latent"), "--repo-id", "me/mw-latent", "--private"]) == 0
    (hub,) = hubs
    assert hub.token == "hf_not_a_real_token"
    (_, repo_id, kwargs), (_, files, upload_kwargs) = hub.calls
    assert repo_id == "me/mw-latent" and kwargs == {"repo_type": "dataset", "private": True, "exist_ok": True}
    assert set(files) == {"README.md", "data", "meta", "videos"} and upload_kwargs["repo_type"] == "dataset"
    assert "published https://huggingface.co/me/mw-latent" in capsys.readouterr().out
    assert not list(workspace.glob(".lapa-publish-*"))  # the staging folder beside the dataset is gone


def test_build_card_and_parser_are_usable_from_code(workspace):
    built = build_card(workspace / "quantizer", "me/laq")
    assert built.kind == QUANTIZER and built.repo_type == "model" and built.source == workspace / "quantizer/model"
    assert resolve_folder(workspace / "lapa_finetuned") == workspace / "lapa_finetuned/model"
    assert detect_kind(workspace / "lapa_finetuned/model") == VLA
    args = build_parser().parse_args([str(workspace), "--repo-id", "me/x", "--private", "--dry-run", "--output", "o"])
    assert args.private and args.dry_run and args.output == "o"
    with pytest.raises(CardError, match="not a LAPA quantizer"):
        detect_kind(workspace / "metaworld/meta")  # no info.json there, no config.json
