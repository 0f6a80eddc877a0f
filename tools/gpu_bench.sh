#!/usr/bin/env bash
# The GPU figures of reports/benchmarks.md in one run on a lent GPU machine (../.library/device/README.md), e.g.
#   run(command="bash tools/gpu_bench.sh", carry=[".whl"], timeout_s=560)
# then copy $OUT/benchmarks.md's new sections into reports/benchmarks.md.
# The machine's image has torch with CUDA, numpy, opencv, pyyaml and tqdm; cityscapesscripts (whose label table
# the package reads; that file has no dependencies) travels as a wheel:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl cityscapesscripts==2.3.0
set -uo pipefail
OUT=${OUT:-/tmp/plca-gpu-bench}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "error: could not install the carried wheels in .whl/"; exit 2; }
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
cp reports/benchmarks.md "$OUT/benchmarks.md"
python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" 2>&1 | tee "$OUT/torch.txt"
# the engine on CUDA: every family trains, fp32 = CPU, bf16/fp16 close, the switches, compile, resume
timeout ${CUDA_TESTS_S:-150} python3 -m pytest -q -s -rfE -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.log"
[ -n "${ONLY_TESTS:-}" ] && exit 0
# the paper's step (DeepLab-v2 ResNet-101, 730x730, 8 + 8 images): fp32, TF32, bf16, bf16 + TF32, with the kernels
# training takes (`impl: auto`, dense there); on an H200 three rows took 36 s, the fp32 row 43 s
timeout 200 python3 -m plca.bench step --preset gta5 --device cuda --steps 5 --warmup 2 \
  --output "$OUT/benchmarks.md" 2>&1 | tee "$OUT/step.log"
# the association alone, block-wise vs dense: 163 s on an H200 with 2 repeats (3 ran past 200 s)
timeout 200 python3 -m plca.bench association --device cuda --sizes 92 64 --repeats 2 \
  --output "$OUT/benchmarks.md" 2>&1 | tee "$OUT/association.log"
