#!/usr/bin/env bash
# Every number of docs/quantization.md's "The OpenVINO engine" section, re-measured in one go (a quiet machine gives
# the fair ones: our shared 2-core machines ran them at a load average of 5-10). Needs `pip install
# 'tinygptv[engine-choice]'` (OpenVINO, nncf and, for the engine choice only, ONNX Runtime), about 18 GB of free
# memory for the full-size rows (the stock fp32 reference holds 16 GB), and about 1.5 h on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/engine}
mkdir -p "$OUT"
{ date -u; lscpu | grep "Model name"; uptime; free -g | head -2; } | tee "$OUT/machine.txt"

# 1. which engine: PyTorch int4, OpenVINO int4 (four CPU settings), ONNX Runtime int4, 8 full-width Phi-2 layers
"$PY" benchmarks/engine_choice.py --layers 8 --threads 2 --out "$OUT/engine_choice.json"

# 2. answers: the engine's compressed modes against the PyTorch model, beside PyTorch's own (TinyGPT-V-nano)
for backend in openvino torch; do
  for quant in int8 int4; do
    "$PY" -m tinygptv.cli quantize tinygptv-nano --quant "$quant" --backend "$backend" --report-only --json \
      > "$OUT/quantize-nano-$backend-$quant.json"
  done
done

# 3. speed and memory of full-size TinyGPT-V (stage-3 preset, 224 px, 96-token prompt, 20 new tokens), one run:
#    PyTorch's modes, the engine's modes (their first load converts, once) and the stock fp32 reference
"$PY" -m tinygptv.cli bench --preset tinygptv-stage3 --quant int4,int8-dynamic,int8 --backend torch,openvino \
  --prompt-tokens 96 --new-tokens 20 --threads 2 --out "$OUT/stage3-engine.json" | tee "$OUT/stage3-engine.txt"

# 4. cold start of the bundled nano model: `ask` in fresh processes (conversions cached by the runs above)
"$PY" benchmarks/cold_start.py --runs 5 | tee "$OUT/cold-start.txt"
"$PY" benchmarks/cold_start.py --runs 5 --backend openvino --quant int8 | tee -a "$OUT/cold-start.txt"
