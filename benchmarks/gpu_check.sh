#!/usr/bin/env bash
# The one command a session with a GPU runs (about 3 minutes on an H200; installs nothing, needs no network):
#     bash benchmarks/gpu_check.sh            # from the repository root; results in $OUT (default ./gpu_out)
# 1. what is installed (torch + CUDA, triton, bitsandbytes, peft, transformers) and the card;
# 2. benchmarks/gpu.py --profile on the Llama-3-8B shape   (table: $OUT/gpu_bench.log, JSON: $OUT/gpu_bench.json)
# 3. the tests marked cuda (log: $OUT/pytest_cuda.log)
# Packages the machine lacks (bitsandbytes, the pinned peft, pydantic, ...) may sit in ./.gpu_site (a plain
# site folder, prepended to PYTHONPATH when present; docs/gpu.md says how it is made).
# Each phase has its own time limit and a failure in one does not stop the next; gpu.py rewrites its JSON
# after every stack, so a run cut short keeps what it measured. Without CUDA it runs gpu.py --tiny instead.
set -u
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
[ -d .gpu_site ] && export PYTHONPATH="$PWD/.gpu_site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTEST_LIMIT=${PYTEST_LIMIT:-150}  # seconds
BENCH_LIMIT=${BENCH_LIMIT:-330}
BENCH_ARGS=${BENCH_ARGS:-}
PY=$(command -v python3 || command -v python)  # the CUDA image's python3 holds torch
CUDA_TESTS=(tests/quant/test_quant.py tests/quant/test_quant_linear.py tests/accel/test_quant_triton.py tests/train/test_train_device.py
            tests/accel/test_models_triton_fused.py)

{
  date -u
  "$PY" -c 'import torch,sys;print(torch.__version__, torch.version.cuda, torch.cuda.is_available())'
  "$PY" -m pip list 2>/dev/null | grep -iE '^(torch|triton|bitsandbytes|peft|transformers|accelerate) ' \
    || echo "pip list failed"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1 | head -3
  "$PY" - <<'EOF'
import importlib
for name in ("triton", "bitsandbytes", "peft", "transformers", "pydantic", "datasketch"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '?')} imports")
    except Exception as e:  # a package missing or broken here: the rows that need it report the error
        print(f"{name} does not import: {type(e).__name__}: {e}")
EOF
} 2>&1 | tee "$OUT/env.txt"

CUDA=$("$PY" -c 'import torch;print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)

if [ "$CUDA" = "1" ]; then
  ARGS=(--profile --out "$OUT/gpu_bench.json")
else
  echo "no CUDA device: running the tiny CPU benchmark instead"
  ARGS=(--tiny --profile --out "$OUT/gpu_bench.json")
fi
echo "== benchmarks/gpu.py ${ARGS[*]} $BENCH_ARGS (limit ${BENCH_LIMIT}s)"
# shellcheck disable=SC2086
timeout "$BENCH_LIMIT" "$PY" benchmarks/gpu.py "${ARGS[@]}" $BENCH_ARGS 2>&1 | grep -v Warning | tee "$OUT/gpu_bench.log"
echo "gpu.py exit: ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_bench.log"

echo "== pytest -m cuda (limit ${PYTEST_LIMIT}s)"
timeout "$PYTEST_LIMIT" "$PY" -m pytest -q -m cuda "${CUDA_TESTS[@]}" --continue-on-collection-errors -p no:cacheprovider \
  -W ignore::FutureWarning -rfEs \
  2>&1 | tail -60 | tee "$OUT/pytest_cuda.log"
echo "pytest exit: ${PIPESTATUS[0]}" | tee -a "$OUT/pytest_cuda.log"
date -u | tee -a "$OUT/env.txt"
