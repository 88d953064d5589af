"""An estimate, not a measurement: how long each notebook's training takes on a Colab T4 in the `gpu` preset.

    python benchmarks/estimate_gpu.py [--json benchmarks/results/gpu_estimate.json]

Until a GPU run replaces it (benchmarks/gpu_check.sh notebooks), the `gpu` preset's promise of
"≤ 10 minutes per notebook on a T4" rests on this. For every training loop a notebook runs in
the `gpu` preset, one step is executed here on the CPU at the `gpu` sizes, and two things are
counted (torch.utils.flop_counter and a dispatch counter):

- its floating-point operations, divided by a T4's **measured** sustained training rate on a
  convolutional network at 32×32 (below): the time if the GPU were busy all the time;
- its kernel launches (aten operations), times 15 µs each: the time if every kernel were tiny and
  only PyTorch's per-operation overhead on Colab's CPU counted (the usual floor for small models).

A step costs the larger of the two; a loop costs steps × that. The T4 rate comes from a public
measurement (ceshine, "Mixed Precision Training on Tesla T4 and P100", 2019): WideResNet-28-10 on
CIFAR-10, batch 128, 10 epochs on a Colab T4 took 57 min 17 s in float32 (and 31 min 14 s with
mixed precision). This script counts WRN-28-10's training FLOPs per image the same way, so the
rate is FLOPs × 500,000 images / 3,437 s in float32 and / 1,874 s in mixed precision, which
the GAN loops use on CUDA (``GANTrainConfig.amp``); every other loop is counted in float32.
Not counted: the notebooks' other cells (rendering data, encoding captions, evaluating), and
Colab's set-up cell (cloning the repository and installing the package).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stages import machine, random_text, regression_step  # noqa: E402

from textimg.data import NUM_CLASSES  # noqa: E402
from textimg.discriminator import Discriminator, DiscriminatorConfig  # noqa: E402
from textimg.gan import GANTrainConfig, d_step, g_step  # noqa: E402
from textimg.generator import Generator, GeneratorConfig  # noqa: E402
from textimg.refiner import Refiner, RefinerConfig  # noqa: E402
from textimg.vqvae import VQVAE, VQVAEConfig  # noqa: E402

LAUNCH_S = 15e-6  # PyTorch's per-operation overhead on Colab's CPU (an assumption, stated in BENCHMARKS.md)
T4_WRN_IMAGES = 10 * 50_000  # the measured runs quoted above: 10 epochs of CIFAR-10
T4_WRN_SECONDS = {"float32": 57 * 60 + 17, "mixed": 31 * 60 + 14}
BUDGET_S = 600


class _Ops(TorchDispatchMode):
    """Counts aten operations (one GPU kernel each, roughly)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count(step) -> tuple[float, int]:
    """(FLOPs, aten operations) of one call of ``step``."""
    step()  # warm-up: lazy initialisations are not per-step work
    flops = FlopCounterMode(display=False)
    with flops:
        step()
    ops = _Ops()
    with ops:
        step()
    return float(flops.get_total_flops()), ops.count


def _fit(model: nn.Module, loss_of) -> callable:
    opt = torch.optim.Adam(model.parameters(), 1e-4, foreach=True)

    def step():
        loss = loss_of()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def generator_step():
    return regression_step("gpu", batch=64, foreach=True, text_dim=384)[0]


def vqvae_step(**overrides):
    model = VQVAE(VQVAEConfig.preset("gpu", **overrides))
    x = torch.rand(64, 3, 64, 64) * 2 - 1

    def loss():
        x_rec, out = model(x)
        return F.mse_loss(x_rec, x) + out.loss
    return _fit(model, loss)


def refiner_step():
    model = Refiner(RefinerConfig.preset("gpu", text_dim=384))
    x32, x64, text = torch.rand(64, 3, 32, 32) * 2 - 1, torch.rand(64, 3, 64, 64) * 2 - 1, random_text(64, 384)

    def loss():
        x_rec, out = model(x32, text)
        return F.mse_loss(x_rec, x64) + out.loss
    return _fit(model, loss)


def gan_step(d_steps: int = 1, **train_overrides):
    cfg = GANTrainConfig.preset("gpu", **train_overrides)
    G = Generator(GeneratorConfig.preset("gpu", text_dim=384))
    D = Discriminator(DiscriminatorConfig.preset("gpu", text_dim=384, num_classes=NUM_CLASSES))
    g_opt, d_opt = (torch.optim.Adam(m.parameters(), 2e-4, foreach=True) for m in (G, D))
    b = cfg.batch_size
    real, text, wrong = torch.rand(b, 3, 32, 32) * 2 - 1, random_text(b, 384), random_text(b, 384)
    labels = torch.stack([torch.randint(n, (b,)) for n in NUM_CLASSES], 1)

    def step():
        for _ in range(d_steps):
            with torch.no_grad():
                fake = G(torch.randn(b, G.cfg.z_dim), text)
            d_step(D, d_opt, real, fake, text, wrong, labels, cfg)
        g_step(G, D, g_opt, torch.randn(b, G.cfg.z_dim), text, labels, cfg)
    return step


def wrn_28_10_step(batch: int = 16):
    """WideResNet-28-10 for CIFAR-10 (Zagoruyko & Komodakis 2016): the reference model of the T4 rate."""
    def block(cin, cout, stride):
        return nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, 3, stride, 1),
                             nn.BatchNorm2d(cout), nn.ReLU(), nn.Conv2d(cout, cout, 3, 1, 1))

    class WRN(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, 1, 1)
            self.blocks, self.shortcuts = nn.ModuleList(), nn.ModuleList()
            cin = 16
            for width, stride in ((160, 1), (320, 2), (640, 2)):
                for i in range(4):
                    self.blocks.append(block(cin, width, stride if i == 0 else 1))
                    self.shortcuts.append(nn.Conv2d(cin, width, 1, stride) if i == 0 else nn.Identity())
                    cin = width
            self.head = nn.Linear(640, 10)

        def forward(self, x):
            x = self.stem(x)
            for blk, short in zip(self.blocks, self.shortcuts):
                x = blk(x) + short(x)
            return self.head(F.adaptive_avg_pool2d(F.relu(x), 1).flatten(1))

    model, x, y = WRN(), torch.randn(batch, 3, 32, 32), torch.randint(10, (batch,))
    return _fit(model, lambda: F.cross_entropy(model(x), y)), batch


# each notebook's training loops in the gpu preset: (what, steps, step factory, precision), from its parameters cell
NOTEBOOKS = {
    "02_generation": [("regression, 4,000 steps (STEPS)", 4000, generator_step, "float32"),
                      ("attention switches: 4 variants x 1,500 steps (SWITCH_STEPS)", 4 * 1500, generator_step,
                       "float32")],
    "03_vqvae_refinement": [("codebook variants: 4 x 1,000 steps (COLLAPSE_STEPS)", 4000, vqvae_step, "float32"),
                            ("refiner, 2,000 steps (STEPS)", 2000, refiner_step, "float32")],
    "04_adversarial_training": [("GAN, 4,000 steps (STEPS)", 4000, gan_step, "mixed"),
                                ("failure modes and fixes: 6 variants x 600 steps (VARIANT_STEPS)", 3600, gan_step,
                                 "mixed"),
                                ("collapse: 300 G steps against a frozen D", 300, gan_step, "mixed"),
                                ("refiner fine-tuning, 600 steps (counted as refiner steps x 2)", 1200,
                                 refiner_step, "float32")],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    wrn, batch = wrn_28_10_step()
    wrn_flops, _ = count(wrn)
    rates = {k: wrn_flops / batch * T4_WRN_IMAGES / s for k, s in T4_WRN_SECONDS.items()}  # FLOP/s on a T4
    print(f"T4 sustained rate, from the WRN-28-10 runs ({wrn_flops / batch / 1e9:.1f} GFLOP per training image): "
          + ", ".join(f"{k} {r / 1e12:.2f} TFLOP/s" for k, r in rates.items()))
    results = {"machine": machine(), "t4_rate_tflops": {k: round(r / 1e12, 2) for k, r in rates.items()},
               "launch_us": LAUNCH_S * 1e6, "notebooks": {}}
    cache = {}
    for notebook, loops in NOTEBOOKS.items():
        total, rows = 0.0, []
        for what, steps, factory, precision in loops:
            if factory not in cache:
                cache[factory] = count(factory())
            flops, ops = cache[factory]
            rate = rates[precision]
            step_s = max(flops / rate, ops * LAUNCH_S)
            total += steps * step_s
            rows.append({"loop": what, "steps": steps, "precision": precision,
                         "gflop_per_step": round(flops / 1e9, 2), "ops_per_step": ops,
                         "ms_per_step": round(1000 * step_s, 2), "bound": "flops" if flops / rate > ops * LAUNCH_S
                         else "launches", "minutes": round(steps * step_s / 60, 2)})
            print(f"  {notebook:24s} {what:70s} {flops / 1e9:8.2f} GFLOP {ops:5d} ops -> "
                  f"{1000 * step_s:6.2f} ms/step, {steps * step_s / 60:5.1f} min")
        results["notebooks"][notebook] = {"loops": rows, "training_minutes": round(total / 60, 1),
                                          "within_budget": total < BUDGET_S}
        print(f"{notebook}: training about {total / 60:.1f} min on a T4 (estimate)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
