#!/usr/bin/env bash
# Set up a fresh machine for this project:
#   1. system libraries for offscreen MuJoCo rendering (EGL) when they are missing (Debian/Ubuntu, as root), and
#      with the dev extra Debian's chromium (the Space's screenshot test);
#   2. PyTorch 2.13.0 first (the CPU build on CPU machines), so that no dependency pulls another torch;
#   3. this project, editable, with the extras given as the first argument (default: sim), every package at the
#      exact version the tests passed on (requirements/lock.txt, written by scripts/refresh_lock.sh).
#
#   bash scripts/setup.sh                  # project + Meta-World simulator
#   bash scripts/setup.sh sim,dev          # + test tools
#   LAPA_LOCK=0 bash scripts/setup.sh      # the newest releases pyproject.toml's ranges admit instead of the lock
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-sim}"

need_apt=()
for lib in libEGL.so.1 libGL.so.1 libOpenGL.so.0; do
  ldconfig -p 2>/dev/null | grep -q "$lib" || need_apt+=("$lib")
done
if [ "${#need_apt[@]}" -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    echo "setup: installing EGL/OpenGL libraries for offscreen rendering (missing: ${need_apt[*]})"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libegl1 libgl1 libopengl0 libegl-mesa0 libgl1-mesa-dri >/dev/null
  else
    echo "setup: warning: missing ${need_apt[*]}; install libegl1 libgl1 libopengl0 libegl-mesa0 for Meta-World rendering" >&2
  fi
fi

# The Space's screenshot test (tests/test_space.py) drives a headless Chromium: Debian's package, with the dev extra.
if [[ ",${extras}," == *",dev,"* ]] && ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    echo "setup: installing chromium (headless screenshots of the Space in tests/test_space.py)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
  else
    echo "setup: warning: chromium is missing; install it (Debian: apt-get install chromium) for tests/test_space.py" >&2
  fi
fi

python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
lock=()
if [ "${LAPA_LOCK:-1}" != "0" ]; then
  lock=(-c requirements/lock.txt)
  echo "setup: installing the tested set (requirements/lock.txt)"
fi
python -m pip install --quiet --disable-pip-version-check "${lock[@]}" -e ".[${extras}]"
python -c "import torch, transformers, modeling_lapa; print(f'setup: torch {torch.__version__}, transformers {transformers.__version__}: ok')"
