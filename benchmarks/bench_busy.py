"""How torch's thread count behaves when another program keeps a core busy (textimg-course's choice).

    python benchmarks/bench_busy.py [--steps 30] [--json benchmarks/results/busy_cpu.json]

Times notebook 02's regression training step (the `cpu` preset's generator, batch 64, forward and
backward) with 1 thread and with as many threads as cores, first on a quiet machine, then while a
second process runs a one-thread matrix-multiply loop (the "other program"). The machine is
recorded with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
OTHER = ("import torch\ntorch.set_num_threads(1)\nx = torch.randn(384, 384)\n"
         "while True:\n    x = torch.tanh(x @ x)\n")


def step_ms(threads: int, steps: int) -> float:
    """Median ms per regression step (forward + backward + Adam) with ``threads`` torch threads."""
    from bench_stages import median_time, regression_step

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    step, _ = regression_step("cpu", batch=64)
    for _ in range(3):  # warm-up
        step()
    return 1000 * median_time(step, repeats=steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from bench_stages import machine

    cores = os.cpu_count() or 1
    results = {"machine": machine(), "step": "notebook 02's regression step, cpu preset, batch 64", "ms": {}}
    for load in ("quiet", "busy"):
        other = subprocess.Popen([sys.executable, "-c", OTHER]) if load == "busy" else None
        try:
            time.sleep(1.0 if other else 0)
            for threads in sorted({1, cores}):
                ms = step_ms(threads, args.steps)
                results["ms"][f"{load}_{threads}"] = round(ms, 1)
                print(f"{load:5s} {threads} thread(s): {ms:7.1f} ms/step", flush=True)
        finally:
            if other:
                other.kill()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
