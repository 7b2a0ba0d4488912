"""Makes a folder that deploys as the Hugging Face Space: this Space's files plus a copy of the toolkit's code.

    python spaces/lapa_world_model/vendor.py --output /tmp/lapa-space
    python spaces/lapa_world_model/vendor.py --output /tmp/lapa-space --with-models   # + the quickstart's models
    hf upload USER/lapa-world-model /tmp/lapa-space . --repo-type space

Why a copy of the code: the toolkit is not on PyPI, and a Space installs only what its requirements.txt names, so
the Space carries `modeling_lapa/`, `processing_lapa/` and `training/` next to app.py (Python finds them first, as
the script's folder leads sys.path). The copy is made at deploy time, from the checkout being deployed, so the Space
runs exactly the code its models were saved with; nothing of it is committed twice in this repository.

`--with-models` also copies the quickstart's VLA and quantizer (`outputs/quickstart/lapa/model`,
`outputs/quickstart/quantizer/model`, or `--vla` / `--quantizer`) to `models/vla` and `models/quantizer`, where the
app looks before the quickstart's folders; without it, set the Space variables `LAPA_VLA` / `LAPA_QUANTIZER` to Hub
model ids.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PACKAGES = ("modeling_lapa", "processing_lapa", "training")
SPACE_FILES = ("app.py", "README.md", "requirements.txt", "examples")
#: Caches and editor droppings that must not travel.
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "*.egg-info")


def vendor(output: Path, *, vla: Path | None = None, quantizer: Path | None = None) -> Path:
    """Writes the deployable Space into `output` (emptied first when it holds an earlier copy); returns it."""
    output = output.resolve()
    if output == HERE or HERE in output.parents:
        raise ValueError(f"--output {output}: choose a folder outside {HERE} (the copy would copy itself)")
    if output.exists() and any(output.iterdir()):
        if not (output / "app.py").is_file():
            raise ValueError(f"--output {output}: not empty and not an earlier Space copy (no app.py); refusing to "
                             "overwrite it")
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    for name in SPACE_FILES:
        source = HERE / name
        if source.is_dir():
            shutil.copytree(source, output / name, ignore=IGNORED)
        elif source.is_file():
            shutil.copy2(source, output / name)
    for package in PACKAGES:
        shutil.copytree(REPO / package, output / package, ignore=IGNORED)
    for name, folder in (("vla", vla), ("quantizer", quantizer)):
        if folder is None:
            continue
        if not folder.is_dir():
            raise FileNotFoundError(f"--{name} {folder}: no such folder (run python -m training.quickstart first)")
        shutil.copytree(folder, output / "models" / name, ignore=IGNORED)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="folder to write the deployable Space into")
    parser.add_argument("--with-models", action="store_true", help="copy the VLA and the quantizer into models/")
    parser.add_argument("--vla", default=str(REPO / "outputs/quickstart/lapa/model"))
    parser.add_argument("--quantizer", default=str(REPO / "outputs/quickstart/quantizer/model"))
    args = parser.parse_args(argv)
    try:
        output = vendor(Path(args.output), vla=Path(args.vla) if args.with_models else None,
                        quantizer=Path(args.quantizer) if args.with_models else None)
    except (ValueError, FileNotFoundError) as error:
        print(f"vendor: error: {error}", file=sys.stderr)
        return 2
    print(f"vendor: wrote the Space to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
