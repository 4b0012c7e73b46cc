#!/usr/bin/env bash
# GPU check for one lent GPU, offline, in under 8 minutes: benchmarks/gpu_mfu.py on 1.3b in bf16 through the
# production path (polyko.train.loop.train_loop with DeepSpeed bf16 + ZeRO-1 + activation checkpointing, in a
# one-process torch.distributed world), a resume from its own checkpoint, an HF export loaded back, and a bare
# PyTorch eager loop of the same shape as the baseline. Prints ONE JSON line (gpu_mfu.py's).
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine (torch + transformers preinstalled)
#   bash benchmarks/gpu_check.sh --dry-run   # tiny model, fp32, gloo, on a CPU: proves the path works
#
# The GPU machine has no network and no DeepSpeed/Ray: DeepSpeed and its small dependencies travel as wheels
# in .whl/ (ignored by git, ~14 MB), installed with pip --no-index; Ray is not needed (LocalContext). Rebuild:
#   mkdir -p .whl && cd .whl && pip wheel --no-deps --no-build-isolation deepspeed==0.19.8 -w . &&
#   pip download --no-deps --only-binary=:all: -d . hjson py-cpuinfo einops ninja psutil pydantic \
#       annotated-types typing-inspection typing-extensions &&
#   for v in 3.10 3.11 3.12 3.13; do pip download --no-deps --only-binary=:all: --python-version $v \
#       --platform manylinux2014_x86_64 -d . msgpack pydantic-core==<pydantic's>; done
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; fi
PY="${PYTHON:-python3}"
if [[ $DRY == 1 && -z "${PYTHON:-}" && -x .venv/bin/python ]]; then PY=.venv/bin/python; fi
export PYTHONPATH="$PWD/platform${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if ! "$PY" -c "import deepspeed" >/dev/null 2>&1; then
    # pip resolves DeepSpeed's requirements against what is installed (torch, numpy, tqdm, packaging stay)
    # and takes the rest from .whl/ only.
    "$PY" -m pip install -q --no-index --find-links .whl deepspeed==0.19.8 >&2 ||
        "$PY" -m pip install -q --no-index --find-links .whl --break-system-packages deepspeed==0.19.8 >&2
fi

if [[ $DRY == 1 ]]; then
    export DS_ACCELERATOR=cpu
    exec "$PY" benchmarks/gpu_mfu.py --dry-run --device cpu --groups eager,production --budget-s 400
fi
# Budget: eager 2 configs (~1 min), production: build + 8 steps + checkpoint (~19 GB) + resume + export (~4 min).
exec timeout 455 "$PY" benchmarks/gpu_mfu.py --size 1.3b --groups eager,production --micro-batches 8 \
    --steps 6 --warmup 2 --budget-s 440
