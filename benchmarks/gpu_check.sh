#!/usr/bin/env bash
# The GPU check: one prepared script for a CUDA machine (no network needed), <= 8 minutes on one H100.
#
#   bash benchmarks/gpu_check.sh             # writes benchmarks/results/gpu_check.{json,md}
#   bash benchmarks/gpu_check.sh --dry-run   # the same code paths on the CPU, tiny model, a temp dir
#
# 1. the gpu test tier (tests/test_gpu.py: every stage on CUDA in bf16 and fp32, PPO with vLLM,
#    2-GPU DDP PPO), its JUnit XML kept for the result;
# 2. benchmarks/gpu_check.py: PPO at TRL's settings (against TRL where it is installed), the
#    rollout benchmark (engine, transformers, vLLM where it is installed), one result pair.
# Whatever is missing (CUDA, vLLM, TRL, the embedded model, shared/ data) is skipped with a line
# saying what. PYTHON picks the interpreter (default: .venv/bin/python if there, else python3).
# The script's exit code is the tier's: the benchmarks never fail it.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export OMP_WAIT_POLICY=PASSIVE TOKENIZERS_PARALLELISM=false
WORK=$(mktemp -d -t gpu-check-XXXXXX)
trap 'rm -rf "$WORK"' EXIT
if [ "$DRY" = 1 ]; then
  OUT=${GPU_CHECK_OUT:-$WORK/results}   # never benchmarks/results
  export RLHFKIT_GPU_DRY_RUN=1 CUDA_VISIBLE_DEVICES=""
  SELECT=(-k "not bf16 or sft")         # fp32 for every stage, bf16 once: seconds, not minutes, on a CPU
  TIER_TIMEOUT=150
else
  OUT=benchmarks/results
  SELECT=()
  TIER_TIMEOUT=300
fi
mkdir -p "$OUT"
say() { echo "gpu_check: $*"; }
if ! "$PYTHON" -c "import torch, transformers, accelerate, rlhfkit" 2>"$WORK/import.err"; then
  say "cannot run: $PYTHON lacks torch/transformers/accelerate/rlhfkit ($(tail -1 "$WORK/import.err"))"
  exit 3
fi
"$PYTHON" -c "import torch; print('gpu_check: torch', torch.__version__, 'cuda available:', torch.cuda.is_available(), 'GPUs:', torch.cuda.device_count())"
"$PYTHON" -c "import vllm" 2>/dev/null || say "vLLM not importable: its tier test and rollout column are skipped"

say "1/2 the gpu tier (timeout ${TIER_TIMEOUT} s)"
t0=$SECONDS
timeout "$TIER_TIMEOUT" "$PYTHON" -m pytest -p no:cacheprovider -q -m gpu tests/test_gpu.py -rs \
  --junitxml="$WORK/tier.xml" ${SELECT[@]+"${SELECT[@]}"}
TIER_RC=$?
say "gpu tier exit code $TIER_RC in $((SECONDS - t0)) s"

say "2/2 benchmarks (PPO at TRL's settings, rollout)"
DRY_FLAG=()
[ "$DRY" = 1 ] && DRY_FLAG=(--dry-run)
timeout 300 "$PYTHON" benchmarks/gpu_check.py --out "$OUT" --tier-junit "$WORK/tier.xml" --tier-rc "$TIER_RC" \
  ${DRY_FLAG[@]+"${DRY_FLAG[@]}"} || say "benchmarks exit code $? (see above)"
if [ -f "$OUT/gpu_check.md" ]; then cat "$OUT/gpu_check.md"; fi
say "done in $SECONDS s; results in $OUT"
exit "$TIER_RC"
