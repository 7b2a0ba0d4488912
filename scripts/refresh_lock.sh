#!/usr/bin/env bash
# Check this project against the package registry's releases in a throwaway virtual environment, and move the lock.
#
#   bash scripts/refresh_lock.sh            # the newest releases pyproject.toml's ranges admit; on a green test run,
#                                           # rewrite requirements/lock.txt with exactly what was installed
#   bash scripts/refresh_lock.sh --oldest   # every direct dependency at the lower bound of its range (the other
#                                           # end of what pyproject.toml promises); reports, never writes the lock
#
# Environment: VENV (default: a fresh folder under /tmp, removed at the end unless KEEP_VENV=1),
#              PYTEST_ARGS (default: -q), EXTRAS (default: sim,dev,convert).
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-newest}"
case "$mode" in newest|--newest) mode=newest ;; --oldest) mode=oldest ;;
  *) echo "usage: bash scripts/refresh_lock.sh [--oldest]" >&2; exit 2 ;; esac
extras="${EXTRAS:-sim,dev,convert}"
venv="${VENV:-$(mktemp -d /tmp/lapa-lock-XXXXXX)}"
cleanup() { [ "${KEEP_VENV:-0}" = "1" ] || rm -rf "$venv"; }
trap cleanup EXIT

python -m venv "$venv"
py="$venv/bin/python"
pip_q=("$py" -m pip install --quiet --disable-pip-version-check)
torch_pin="torch==2.13.0"             # the CPU build on disk; nothing below may replace it
"${pip_q[@]}" "$torch_pin"
# `--upgrade --upgrade-strategy eager` would otherwise move torch too (to the newest release pip may take: a CUDA
# build of several GB here), so torch is held by a constraint in both modes.
echo "$torch_pin" > "$venv/torch-constraint.txt"
if [ "$mode" = oldest ]; then
  constraints="$venv/oldest-constraints.txt"
  "$py" scripts/lower_bounds.py --extras "$extras" > "$constraints"
  echo "refresh_lock: lower bounds:"; sed 's/^/  /' "$constraints"
  "${pip_q[@]}" -c "$constraints" -c "$venv/torch-constraint.txt" -e ".[${extras}]"
else
  "${pip_q[@]}" -c "$venv/torch-constraint.txt" --upgrade --upgrade-strategy eager -e ".[${extras}]"
fi
"$py" -c "import torch, sys; v = torch.__version__.split('+')[0]; sys.exit(0 if v == '${torch_pin#torch==}' else
  f'refresh_lock: torch {torch.__version__} was installed instead of ${torch_pin#torch==}')"

echo "refresh_lock: installed ($mode):"
"$py" -m pip freeze --exclude-editable | grep -iE '^(torch|transformers|accelerate|datasets|huggingface.hub|peft|safetensors|metaworld|mujoco|gymnasium|numpy|av|pyarrow)==' | sed 's/^/  /'

# The tests run from the checkout with the venv's packages (a fresh modules cache for remote code).
(export HF_MODULES_CACHE="$venv/hf_modules"; cd "$PWD" && "$py" -m pytest ${PYTEST_ARGS:--q} -p no:cacheprovider)

if [ "$mode" = newest ]; then
  mkdir -p requirements
  {
    echo "# The exact set the tests passed on: written by scripts/refresh_lock.sh on $(date -u +%Y-%m-%d)"
    echo "# (extras: ${extras}; Python $("$py" -c 'import platform; print(platform.python_version())')). scripts/setup.sh installs through it"
    echo "# with \`pip install -c requirements/lock.txt\`; pyproject.toml keeps the compatible ranges."
    "$py" -m pip freeze --exclude-editable | grep -v '^-e ' | sed 's/+cpu$//'
  } > requirements/lock.txt
  echo "refresh_lock: tests passed; requirements/lock.txt rewritten ($(grep -vc '^#' requirements/lock.txt) packages)"
else
  echo "refresh_lock: tests passed at the lower bounds"
fi
