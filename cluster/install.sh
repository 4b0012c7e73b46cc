#!/usr/bin/env bash
# Install polyko into a virtual environment, in the only order that works for DeepSpeed:
#   1. torch        (CPU build by default; --gpu keeps/installs a CUDA build instead)
#   2. deepspeed    with --no-build-isolation, so its sdist build sees *this* torch instead of
#                   pulling a CUDA torch (several GB) into an isolated build environment
#   3. polyko       editable, with the extras you ask for (dev = tests and benchmarks)
#
# Usage:  bash cluster/install.sh [--venv DIR] [--gpu] [--dev]
#   --venv DIR  where the environment goes (default: .venv in the repository root; "system" = no venv)
#   --gpu       GPU node: install torch from PyPI's default (CUDA) build unless one is present,
#               and do not apply constraints-cpu.txt
#   --dev       also install test/benchmark dependencies
# Used by the README quickstart, .ci/run, the Ray cluster launcher (setup_commands) and the
# KubeRay image (cluster/Dockerfile).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"; gpu=0; extras=""
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) venv="$2"; shift 2;;
    --gpu) gpu=1; shift;;
    --dev) extras="[dev]"; shift;;
    *) echo "install.sh: unknown option $1" >&2; exit 2;;
  esac
done
py="${PYTHON:-python3}"
if [ "$venv" != "system" ]; then
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  py="$venv/bin/python"
fi
pip=("$py" -m pip install --disable-pip-version-check)
"${pip[@]}" -q --upgrade pip wheel setuptools
if [ "$gpu" = 1 ]; then
  "$py" -c "import torch" 2>/dev/null || "${pip[@]}" "torch>=2.4"
  cons=()
else
  cons=(-c "$root/constraints-cpu.txt")
  "${pip[@]}" "${cons[@]}" torch
fi
# DeepSpeed's setup.py imports torch: without --no-build-isolation pip builds it against a fresh
# (CUDA) torch. DS_BUILD_OPS=0: no CUDA/C++ ops at install time; they JIT on first use if needed.
"$py" -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 "${pip[@]}" "${cons[@]}" --no-build-isolation "deepspeed>=0.19.8"
"${pip[@]}" "${cons[@]}" -e "$root$extras"
"$py" -c "import polyko, torch, deepspeed, ray; print('polyko installed: torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'ray', ray.__version__)"
