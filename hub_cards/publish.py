"""Publish a LAPA quantizer, a LAPA VLA or a LeRobot dataset to the Hugging Face Hub, with its card.

    python -m hub_cards.publish outputs/quickstart/lapa_finetuned --repo-id me/lapa-mt10 --dry-run --output staged
    python -m hub_cards.publish outputs/quickstart/quantizer --repo-id me/lapa-laq-mt10 --private
    python -m hub_cards.publish outputs/quickstart/metaworld_latent --repo-id me/metaworld-latent --quantizer-id me/laq
    python -m hub_cards.publish lapa-7b --repo-id me/LAPA-7B-openx-pytorch

PATH is a model folder (`save_pretrained` output: `<run>/model`), a training run's folder (its `model/` is taken),
or a LeRobot dataset folder; what it is comes from `config.json`'s model_type (`lapa_quantizer`; `lapa`, whose
backbone family `lwm` marks the converted LAPA-7B) or `meta/info.json`. The card (README.md) is filled from the
folder's own records (see `hub_cards.model_cards`, `hub_cards.dataset_cards`); a closed-loop evaluation
(`training/evaluate.py`'s folder) is taken from --eval, or found beside the run when it names this model.

One folder is staged for the upload: the model's files (weights, config, remote code, processor, training_config.json)
or the dataset's (data/, meta/, videos/), the card, and the plots and GIFs it links under images/ (files are
hard-linked where possible, so staging a large dataset costs no space; an upload stages it in a temporary folder beside
PATH). --dry-run writes that folder to --output and
lists it; without it the folder is uploaded with `HfApi().create_repo(..., exist_ok=True)` and `upload_folder`,
after checking that a token is there (`hf auth login`, or HF_TOKEN) and that the Hub is not switched off
(HF_HUB_OFFLINE).

Errors (exit code 2, `publish: error: ...`): a folder that is none of the three kinds, a file or field the card
needs that the folder lacks (named), a repo id that is not `owner/name`, no token.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .common import (
    DATASET, DEFAULT_LICENSE, LAPA_7B, QUANTIZER, VLA, BuiltCard, CardError, detect_kind, looks_like_repo_id, resolve_folder,
)

# Never uploaded: hidden files and folders (.git, .cache, a labelling run's .labelling/ work dir) and an old card.
SKIPPED_NAMES = {"README.md"}


class PublishError(ValueError):
    """The command cannot go on: the message says why and what to do."""


def build_parser() -> argparse.ArgumentParser:
    parts = __doc__.split("\n\n", 1)
    parser = argparse.ArgumentParser(prog="publish", description=parts[0], epilog=parts[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="a LAPA model folder (or its training run's folder), or a LeRobot dataset folder")
    parser.add_argument("--repo-id", required=True, help="the Hub repository, owner/name")
    parser.add_argument("--private", action=argparse.BooleanOptionalAction, default=False,
                        help="create the repository private (default: public; an existing repository keeps its own)")
    parser.add_argument("--dry-run", action=argparse.BooleanOptionalAction, default=False,
                        help="write the folder that would be uploaded to --output and list it; upload nothing")
    parser.add_argument("--output", help="with --dry-run: where to write the folder (must be empty or absent)")
    parser.add_argument("--eval", help="a closed-loop evaluation folder (training/evaluate.py --output-dir) or its "
                                       "eval_info.json; default: the one beside the run that names this model")
    parser.add_argument("--rollout", help="an imagined rollout GIF for a model card (default: rollout.gif beside "
                                          "the runs, as the quickstart writes it)")
    parser.add_argument("--license", default=None,
                        help=f"license id (default: {DEFAULT_LICENSE}; LAPA-7B: the original repository's terms)")
    parser.add_argument("--base-model", help="the Hub id of the model this one was trained from (default: the "
                                             "training record's init_from or backbone, when a Hub id)")
    parser.add_argument("--dataset-id", action="append", default=None,
                        help="Hub id of a training dataset for the card's metadata (repeatable; default: the "
                             "training record's datasets that are Hub ids)")
    parser.add_argument("--quantizer-id", help="for a labelled dataset: the Hub id of the quantizer that made the labels")
    return parser


def check_repo_id(repo_id: str) -> str:
    if not looks_like_repo_id(repo_id):
        raise PublishError(f"--repo-id {repo_id!r} is not a Hub repository id: expected owner/name (letters, digits, "
                           "'-', '_', '.'; each part starting with a letter or digit)")
    return repo_id


def build_card(path: str | Path, repo_id: str, *, eval_path=None, rollout=None, license: str | None = None,
               base_model: str | None = None, datasets: list[str] | None = None,
               quantizer_id: str | None = None) -> BuiltCard:
    """The card of the folder at `path`, whatever its kind; PublishError for an option its kind does not take."""
    from .dataset_cards import dataset_card
    from .model_cards import lapa_7b_card, quantizer_card, vla_card

    folder = resolve_folder(path)
    kind = detect_kind(folder)
    given = {"--eval": eval_path, "--rollout": rollout, "--base-model": base_model, "--dataset-id": datasets,
             "--quantizer-id": quantizer_id}
    takes = {QUANTIZER: {"--eval", "--rollout", "--base-model", "--dataset-id"},
             VLA: {"--eval", "--rollout", "--base-model", "--dataset-id"}, LAPA_7B: set(), DATASET: {"--quantizer-id"}}
    refused = [name for name, value in given.items() if value is not None and name not in takes[kind]]
    if refused:
        raise PublishError(f"{folder} is a {kind}: {', '.join(refused)} does not apply to it")
    for name, value in (("--base-model", base_model), ("--quantizer-id", quantizer_id)):
        if value is not None and not looks_like_repo_id(value):
            raise PublishError(f"{name} {value!r} is not a Hub repository id (owner/name)")
    if kind == DATASET:
        return dataset_card(folder, repo_id, license=license or DEFAULT_LICENSE, quantizer_id=quantizer_id)
    if kind == LAPA_7B:
        return lapa_7b_card(folder, repo_id, license=license)
    builder = quantizer_card if kind == QUANTIZER else vla_card
    return builder(folder, repo_id, eval_path=eval_path, rollout=rollout, license=license or DEFAULT_LICENSE,
                   datasets=datasets, base_model=base_model)


def _place(source: Path, target: Path) -> None:
    """Hard link (no copy of a large file), else copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def files_to_upload(built: BuiltCard) -> list[tuple[str, Path]]:
    """(path in the repo, local file) of every file the repository gets, besides README.md."""
    files = []
    for path in sorted(built.source.rglob("*")):
        relative = path.relative_to(built.source)
        if not path.is_file() or any(part.startswith(".") for part in relative.parts) or \
                relative.as_posix() in SKIPPED_NAMES or relative.parts[0] == "__pycache__":
            continue
        files.append((relative.as_posix(), path))
    taken = {name for name, _ in files}
    for name, path in built.extra_files.items():
        if name in taken:
            raise PublishError(f"{built.source} already holds {name}; the card's image would replace it")
        files.append((name, Path(path)))
    return files


def stage(built: BuiltCard, output: str | Path) -> list[tuple[str, int]]:
    """Writes the repository's folder to `output` (absent or empty): the files, the card as README.md. Returns
    (path in the repo, size in bytes) of each file."""
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise PublishError(f"--output {output} exists and is not an empty folder; give a new one")
    if output.resolve() == built.source.resolve() or built.source.resolve() in output.resolve().parents:
        raise PublishError(f"--output {output} is inside the folder being published")
    output.mkdir(parents=True, exist_ok=True)
    for name, path in files_to_upload(built):
        _place(path, output / name)
    built.card.save(output / "README.md")
    return sorted((p.relative_to(output).as_posix(), p.stat().st_size) for p in output.rglob("*") if p.is_file())


def listing(files: list[tuple[str, int]]) -> str:
    def human(size: float) -> str:
        for unit in ("B", "KB", "MB", "GB"):
            if size < 1024 or unit == "GB":
                return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
            size /= 1024

    width = max((len(name) for name, _ in files), default=0)
    lines = [f"  {name:<{width}}  {human(size):>9}" for name, size in files]
    lines.append(f"  {len(files)} files, {human(sum(size for _, size in files))}")
    return "\n".join(lines)


def check_can_upload() -> str:
    """The token to upload with; PublishError when there is none or the Hub is switched off."""
    from huggingface_hub import constants, get_token

    token = get_token()
    if not token:
        raise PublishError("no Hugging Face token: log in with `hf auth login`, or set HF_TOKEN to a token with write "
                           "access (https://huggingface.co/settings/tokens); --dry-run --output DIR needs none")
    if constants.is_offline_mode():
        raise PublishError("HF_HUB_OFFLINE is set, so the Hub cannot be reached: unset it to upload, or use --dry-run "
                           "--output DIR")
    return token


def upload(folder: Path, repo_id: str, repo_type: str, *, private: bool, token: str | None = None, api=None) -> str:
    """Creates the repository if needed (an existing one is kept, with its visibility) and uploads `folder` in one
    commit; returns the repository's URL. `api`: an `HfApi` (default: a new one with `token`)."""
    from huggingface_hub import HfApi

    api = api or HfApi(token=token)
    url = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, repo_type=repo_type, folder_path=str(folder),
                      commit_message="Upload with lapa-publish (LAPA toolkit)")
    return str(url)


def _staging_dir(source: Path):
    """A temporary folder beside `source` (same filesystem: the files are hard-linked, a large dataset is not
    copied), else in the system's temporary directory."""
    try:
        return tempfile.TemporaryDirectory(prefix=".lapa-publish-", dir=source.resolve().parent)
    except OSError:
        return tempfile.TemporaryDirectory(prefix="lapa-publish-")


def publish(args: argparse.Namespace) -> int:
    repo_id = check_repo_id(args.repo_id)
    if args.dry_run and not args.output:
        raise PublishError("--dry-run needs --output DIR: the folder that would be uploaded is written there")
    if args.output and not args.dry_run:
        raise PublishError("--output is for --dry-run (an upload stages its folder in a temporary directory)")
    built = build_card(args.path, repo_id, eval_path=args.eval, rollout=args.rollout, license=args.license,
                       base_model=args.base_model, datasets=args.dataset_id, quantizer_id=args.quantizer_id)
    token = None if args.dry_run else check_can_upload()  # the folder is checked first, and nothing staged yet
    if args.dry_run:
        files = stage(built, args.output)
        print(f"{built.kind} {built.source} -> {args.output} (would be uploaded to the {built.repo_type} repository "
              f"{repo_id}{', private' if args.private else ''}):\n{listing(files)}")
        return 0
    with _staging_dir(built.source) as work:
        files = stage(built, Path(work) / "repo")
        print(f"uploading {built.kind} {built.source} to the {built.repo_type} repository {repo_id}:\n{listing(files)}")
        url = upload(Path(work) / "repo", repo_id, built.repo_type, private=args.private, token=token)
    print(f"published {url}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse printed `publish: error: ...` (or the help)
        return int(exit_.code or 0)
    try:
        return publish(args)
    except (PublishError, CardError, FileNotFoundError) as error:
        print(f"publish: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
