#!/usr/bin/env bash
# The one command a session with a GPU runs (about 8 minutes on an H100; installs nothing, needs no network):
#     bash benchmarks/gpu_check.sh            # from the repository root; results in $OUT (default ./gpu_out)
# 1. what is installed (torch + CUDA, triton, bitsandbytes, peft, transformers) and the card;
# 2. the CUDA tests: python -m pytest -q -m cuda tests/   (log: $OUT/pytest_cuda.log)
# 3. benchmarks/gpu.py on the Llama-3-8B shape             (table: $OUT/gpu_bench.log, JSON: $OUT/gpu_bench.json)
# Each phase has its own time limit and a failure in one does not stop the next; gpu.py rewrites its JSON
# after every stack, so a run cut short keeps what it measured. Without CUDA it runs gpu.py --tiny instead.
set -u
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
PYTEST_LIMIT=${PYTEST_LIMIT:-150}  # seconds
BENCH_LIMIT=${BENCH_LIMIT:-330}

{
  date -u
  python -c 'import torch,sys;print(torch.__version__, torch.cuda.is_available())'
  python -m pip list 2>/dev/null | grep -iE '^(torch|triton|bitsandbytes|peft|transformers|accelerate) ' \
    || echo "pip list failed"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1 | head -3
  python - <<'EOF'
import importlib
for name in ("triton", "bitsandbytes", "peft", "transformers"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '?')} imports")
    except Exception as e:  # a package missing or broken here: the rows that need it report the error
        print(f"{name} does not import: {type(e).__name__}: {e}")
EOF
} 2>&1 | tee "$OUT/env.txt"

CUDA=$(python -c 'import torch;print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)

echo "== pytest -m cuda (limit ${PYTEST_LIMIT}s)"
timeout "$PYTEST_LIMIT" python -m pytest -q -m cuda tests/ -p no:cacheprovider -W ignore::FutureWarning \
  2>&1 | tail -60 | tee "$OUT/pytest_cuda.log"
echo "pytest exit: ${PIPESTATUS[0]}" | tee -a "$OUT/pytest_cuda.log"

if [ "$CUDA" = "1" ]; then
  ARGS=(--out "$OUT/gpu_bench.json")
else
  echo "no CUDA device: running the tiny CPU benchmark instead"
  ARGS=(--tiny --out "$OUT/gpu_bench.json")
fi
echo "== benchmarks/gpu.py ${ARGS[*]} (limit ${BENCH_LIMIT}s)"
timeout "$BENCH_LIMIT" python benchmarks/gpu.py "${ARGS[@]}" 2>&1 | tee "$OUT/gpu_bench.log" | grep -v Warning
echo "gpu.py exit: ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_bench.log"
date -u | tee -a "$OUT/env.txt"
