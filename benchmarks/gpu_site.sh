#!/usr/bin/env bash
# Builds ./.gpu_site: the Python packages that the lent GPU machine's image lacks or has in other versions,
# as a plain site folder that benchmarks/gpu_check.sh puts first on PYTHONPATH. Run it here (PyPI reachable),
# from the repository root; the GPU machine reaches no network, so the folder travels with the command
# (the device tool's carry). Its python3 is 3.12; torch, triton and transformers are the image's own.
#     bash benchmarks/gpu_site.sh            # about 20 MB
set -euo pipefail
PYVER=${PYVER:-3.12}
WHL=$(mktemp -d)
rm -rf .gpu_site && mkdir -p .gpu_site
python -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHL" \
  bitsandbytes==0.50.2 peft==0.21.2 pydantic==2.13.4 pydantic_core==2.46.4 annotated-types==0.7.0 \
  typing-inspection==0.4.2 datasketch==2.0.0 liger-kernel==0.8.5
for w in "$WHL"/*.whl; do python -m zipfile -e "$w" .gpu_site; done
# bitsandbytes ships a library per CUDA / ROCm / XPU version (125 MB in all): keep CUDA 13's and the CPU one.
find .gpu_site/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*cuda13*' ! -name '*_cpu.so' -delete
rm -rf "$WHL"
du -sh .gpu_site
