#!/usr/bin/env bash
# Every number of docs/quantization.md's engine section and its two "Measured on" tables, re-measured in one go, one
# after the other (run it on an otherwise idle machine: the rows share the cores they measure). Needs `make setup`
# (OpenVINO and nncf come with the test extra), ONNX Runtime for step 1 only (`pip install 'tinygptv[engine-choice]'`),
# about 18 GB of free memory for the full-size rows (the stock fp32 reference holds 16 GB), and about 45 minutes on
# 2 cores (step 1 alone: 20 more).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
OUT=${OUT:-runs/engine}
mkdir -p "$OUT"
{ date -u; lscpu | grep "Model name"; nproc; uptime; free -g | head -2; } | tee "$OUT/machine.txt"

# 1. which engine: PyTorch int4, OpenVINO int4 (four CPU settings), ONNX Runtime int4, 8 full-width Phi-2 layers
if python -c "import onnxruntime" 2>/dev/null; then
  python benchmarks/engine_choice.py --layers 8 --threads 2 --out "$OUT/engine_choice.json"
fi

# 2. TinyGPT-V-nano: what each mode costs in answers, and easy-VQA's first 1,000 test questions (whole command timed)
for mode in torch:bf16 torch:int8 torch:int4 torch:int8-dynamic openvino:int8 openvino:int4; do
  backend=${mode%%:*} quant=${mode#*:}
  tinygptv quantize tinygptv-nano --quant "$quant" --backend "$backend" --report-only --json > "$OUT/quantize-$backend-$quant.json"
done
for mode in torch:none torch:bf16 torch:int8 torch:int4 torch:int8-dynamic openvino:int8 openvino:int4; do
  backend=${mode%%:*} quant=${mode#*:}
  /usr/bin/time -f "%e s" -o "$OUT/eval-$backend-$quant.time" tinygptv eval --benchmark easyvqa --backend "$backend" \
    --quant "$quant" --limit 1000 --batch-size 32 --out "$OUT/eval-$backend-$quant" > "$OUT/eval-$backend-$quant.log" 2>&1
done

# 3. full-size TinyGPT-V (stage-3 preset, 224 px, 96-token prompt, 20 new tokens), one run: PyTorch's CPU modes, the
#    engine's int8 and int4 (their first load converts, once) and the stock fp32 reference
tinygptv bench --preset tinygptv-stage3 --backend torch,openvino --prompt-tokens 96 --new-tokens 20 --threads 2 \
  --out "$OUT/stage3.json" | tee "$OUT/stage3.txt"

# 4. cold start of the bundled nano model: `ask` in fresh processes, then its phases and warm answers
python benchmarks/cold_start.py --runs 5 | tee "$OUT/cold-start.txt"
