#!/usr/bin/env bash
# The GPU checks of issues 5 and 6, prepared for the workplace's `device` tool (one H100/H200,
# no network, at most 64 MiB of working tree, about 15 minutes of device time per session).
#
# Prepare on the CPU machine (MiniLM's wheel is 83 MB; an fp16 copy is about 45 MB):
#     .venv/bin/python -c "from textimg.text import export_encoder; export_encoder('runs/device/minilm')"
# Then run it with the device tool, one part per call (each fits the 10-minute limit):
#     run(command="bash benchmarks/gpu_check.sh smoke",     carry=["runs/device/minilm"], timeout_s=120)
#     run(command="bash benchmarks/gpu_check.sh bench",     carry=["runs/device/minilm"], timeout_s=420)
#     run(command="bash benchmarks/gpu_check.sh notebooks", carry=["runs/device/minilm"], timeout_s=590)
# Results land in $OUT (the device tool's folder), else runs/device/out.
#
# smoke:     the carried encoder and the committed pipeline work on the device (run this first).
# bench:     machine facts, bench_throughput.py (real vs synthetic vs source loop) in the gpu preset,
#            and bench_stages.py (data, text, regression, VQ-VAE, refiner and GAN steps per preset).
# notebooks: every notebook in the gpu preset (textimg-course), each timed, executed copies kept.
# gan:       issue 5's run, `textimg train --preset gpu` (20,000 GAN steps; resumable, so repeated calls
#            continue it), then `textimg evaluate` on the result. Not timed yet: give it its own session.
set -uo pipefail
part="${1:-bench}"
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/device/out}"
mkdir -p "$OUT"
export TEXTIMG_MINILM_DIR="$PWD/runs/device/minilm" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TEXTIMG_PRESET=gpu
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package from this tree, whatever pip can install
[ -d "$TEXTIMG_MINILM_DIR" ] || { echo "no $TEXTIMG_MINILM_DIR: run the export step first (see the header)"; exit 2; }
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python - > "$OUT/modules.txt" 2>&1 <<'PY'
import importlib, sys
print(sys.version)
for m in ("torch", "torchvision", "transformers", "accelerate", "safetensors", "torchmetrics", "numpy", "PIL",
          "matplotlib", "tqdm", "nbclient", "nbformat", "ipykernel", "ipywidgets"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"))
    except ImportError as err:
        print(m, "MISSING", err)
PY
cat "$OUT/modules.txt"
case "$part" in
  smoke)  # a minute: the encoder from the carried copy, the committed pipeline on the device, one grid
    python - 2>&1 <<'PY' | tee "$OUT/smoke.txt"
import torch
from textimg.pipeline import TextToImagePipeline
from textimg.utils import get_device
device = get_device()
pipe = TextToImagePipeline.from_pretrained(device=device)
x = pipe.generate(["a small red circle at the top left", "a large blue star in the center"], seed=0)
print(device, torch.cuda.get_device_name(0) if device.type == "cuda" else "", tuple(x.shape), float(x.mean()))
PY
    ;;
  bench)
    timeout 240 python benchmarks/bench_throughput.py --preset gpu --steps 50 --json "$OUT/throughput_gpu.json" \
      2>&1 | tee "$OUT/throughput_gpu.txt"
    timeout 150 python benchmarks/bench_stages.py --json "$OUT/stages_gpu.json" 2>&1 | tail -30 > "$OUT/stages_gpu.txt"
    ;;
  notebooks)
    for nb in 00 01 02 03 04 05; do
      start=$(date +%s)
      timeout 170 python -m textimg.course --preset gpu --only "$nb" \
        > "$OUT/notebook_$nb.log" 2>&1
      echo "notebook $nb: exit $? in $(( $(date +%s) - start )) s" | tee -a "$OUT/notebook_times.txt"
    done
    mkdir -p "$OUT/executed" && cp runs/gpu/*.ipynb "$OUT/executed/" 2>/dev/null
    ;;
  gan)  # resumable: while the machine stays warm, call it again to continue where the timeout stopped it
    timeout 560 python -m textimg train --preset gpu --out runs/device/train_gpu --no-progress \
      >> "$OUT/train_gpu.log" 2>&1
    echo "exit $?" >> "$OUT/train_gpu.log"
    [ -d runs/device/train_gpu/pipeline ] && cp -r runs/device/train_gpu/pipeline runs/device/train_gpu/refiner \
      "$OUT/" 2>/dev/null
    [ -d runs/device/train_gpu/pipeline ] && timeout 120 python -m textimg evaluate \
      --model runs/device/train_gpu/pipeline --json "$OUT/metrics_gpu.json" --no-progress > "$OUT/evaluate_gpu.txt" 2>&1
    ;;
  *) echo "usage: $0 smoke|bench|notebooks|gan"; exit 2 ;;
esac
