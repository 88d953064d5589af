"""Training throughput of the GAN stage (images per second), three loops side by side in one run.

    python benchmarks/bench_throughput.py [--preset cpu|gpu] [--steps 20] [--json out.json]

1. **real**: the course's own loop, :func:`textimg.gan.train_gan`, exactly as notebook 04 and
   ``textimg train`` run it: rendered images from ShapesDataset's cache, captions encoded once by
   the frozen MiniLM and read back from the text cache, the preset's batch size, mixed precision on
   CUDA (bf16 where supported), DiffAugment, GAN-CLS mismatches and the attribute head.
2. **synthetic**: the same d_step / g_step calls on tensors that already sit on the device (random
   images, a random TextEncoding, fixed labels): no data path at all. real / synthetic is the
   share of the time the data path costs (1.0 = none).
3. **source**: the loop written as the source document writes it: a bert-base-sized encoder run on
   every step (BertModel with bert-base's configuration, 110M parameters, randomly initialised
   because there is no network: same cost as ``bert-base-uncased``), images produced item by item
   every step (ShapesDataset without its cache, the way a loader decodes files), float32, batch 64.
   The generator and discriminator are the preset's (with text_dim 768) and get the same
   d_step / g_step as the real loop, so the ratio measures the loop, not the models. It is run
   twice: **source** runs the encoder under ``torch.no_grad()`` (kind to it), **source_as_written**
   as the source's code does (no ``no_grad``, BERT's parameters requiring gradients, so G's loss
   backpropagates into BERT every step; wasted work, since no optimiser holds BERT). Both use the
   fast (Rust) tokenizer, where the source uses the slow Python one.

Each loop runs ``--warmup`` steps first (CUDA kernels, allocator, caches), then ``--steps`` timed ones.
The machine is printed first; quote it with the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stages import machine  # noqa: E402

from textimg.config import get_preset  # noqa: E402
from textimg.data import NUM_CLASSES, ShapesDataset  # noqa: E402
from textimg.discriminator import Discriminator, DiscriminatorConfig  # noqa: E402
from textimg.gan import GANTrainConfig, d_step, g_step, train_gan  # noqa: E402
from textimg.generator import Generator, GeneratorConfig  # noqa: E402
from textimg.text import TextEncoder, TextEncoding, masked_mean  # noqa: E402
from textimg.training import Engine, make_accelerator  # noqa: E402
from textimg.utils import seeded  # noqa: E402


def _precision(device: torch.device, amp: bool) -> str:
    """The precision train_gan's Accelerator uses on ``device``."""
    return make_accelerator(device, amp).mixed_precision



def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step, steps: int, warmup: int, device: torch.device, batch: int) -> dict:
    """Runs ``step(i)`` ``warmup`` times, then times ``steps`` more (synchronising CUDA around them)."""
    for i in range(warmup):
        step(i)
    _sync(device)
    start = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    _sync(device)
    seconds = time.perf_counter() - start
    return {"seconds_per_step": seconds / steps, "images_per_s": steps * batch / seconds}


def _models(preset: str, text_dim: int, device: torch.device):
    with seeded(0):
        g = Generator(GeneratorConfig.preset(preset, text_dim=text_dim)).to(device)
        d = Discriminator(DiscriminatorConfig.preset(preset, text_dim=text_dim, num_classes=NUM_CLASSES)).to(device)
    return g, d


def real_loop(preset: str, steps: int, warmup: int, device: torch.device, encoder: TextEncoder) -> dict:
    cfg = GANTrainConfig.preset(preset)
    data = ShapesDataset(max(4096, (steps + warmup) * cfg.batch_size), split="train", image_size=32).render_all()
    encoder.encode_dataset(data.captions())  # the text cache, filled once, as train_pipeline does
    g, d = _models(preset, encoder.dim, device)
    marks = {}

    def mark(step, stats):  # stats are Python floats: the step has finished on the device
        marks[step] = time.perf_counter()

    train_gan(g, d, encoder, data, cfg, steps=warmup + steps, progress=False, log_every=1, device=device,
              callback=mark)
    seconds = marks[warmup + steps - 1] - marks[warmup - 1]
    return {"batch": cfg.batch_size, "precision": _precision(device, cfg.amp),
            "seconds_per_step": seconds / steps, "images_per_s": steps * cfg.batch_size / seconds}


def synthetic_loop(preset: str, steps: int, warmup: int, device: torch.device, text_dim: int) -> dict:
    cfg = GANTrainConfig.preset(preset)
    B, T = cfg.batch_size, 12
    g, d = _models(preset, text_dim, device)
    accelerator = make_accelerator(device, cfg.amp)
    betas = (cfg.beta1, cfg.beta2)
    g, d, g_opt, d_opt = accelerator.prepare(g, d, torch.optim.Adam(g.parameters(), lr=cfg.lr_g, betas=betas),
                                             torch.optim.Adam(d.parameters(), lr=cfg.lr_d, betas=betas))
    rng = torch.Generator().manual_seed(0)
    engine = Engine(accelerator, rng)
    x_real = (torch.rand(B, 3, 32, 32, generator=rng) * 2 - 1).to(device)
    tokens = torch.randn(B, T, text_dim, generator=rng).to(device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    text = TextEncoding(tokens, mask, masked_mean(tokens, mask))
    wrong = text.pooled.roll(1, dims=0)
    labels = torch.stack([torch.randint(0, n, (B,), generator=rng) for n in NUM_CLASSES], dim=1).to(device)

    def step(i):
        engine.step = i
        z = torch.randn(B, engine.plain(g).cfg.z_dim, generator=rng).to(device)
        with torch.no_grad(), engine.autocast():
            x_fake = g(z, text, rng=rng)
        d_step(d, d_opt, x_real, x_fake, text, wrong, labels, cfg, engine)
        g_step(g, d, g_opt, z, text, labels, cfg, engine)

    return {"batch": B, "precision": _precision(device, cfg.amp), **_timed(step, steps, warmup, device, B)}


def source_loop(preset: str, steps: int, warmup: int, device: torch.device, tokenizer, batch: int = 64,
                as_written: bool = False) -> dict:
    """The source document's loop. ``as_written=False`` runs BERT under no_grad (kind to it);
    ``as_written=True`` runs it as the source's code does, outside no_grad with its parameters
    requiring gradients, so G's loss backpropagates into BERT every step (its discriminator never
    sees the text, so D's step gets the text detached)."""
    from transformers import BertConfig, BertModel

    cfg = GANTrainConfig.preset(preset)
    torch.manual_seed(0)
    bert = BertModel(BertConfig()).to(device).eval()  # bert-base: 12 layers, hidden 768, 110M parameters
    bert.requires_grad_(as_written)
    g, d = _models(preset, bert.config.hidden_size, device)
    g_opt = torch.optim.Adam(g.parameters(), lr=cfg.lr_g, betas=(cfg.beta1, cfg.beta2))
    d_opt = torch.optim.Adam(d.parameters(), lr=cfg.lr_d, betas=(cfg.beta1, cfg.beta2))
    data = ShapesDataset(100_000, split="train", image_size=32, cache=False)  # every item drawn anew
    order = np.random.default_rng(0)
    rng = torch.Generator().manual_seed(0)

    def step(i):
        items = [data[int(k)] for k in order.integers(0, len(data), batch)]
        x_real = torch.stack([it["image"] for it in items]).to(device)
        captions = [it["caption"] for it in items]
        inputs = tokenizer(captions, return_tensors="pt", padding=True).to(device)
        with torch.set_grad_enabled(as_written):
            hidden = bert(**inputs).last_hidden_state  # (B, T, 768)
        mask = inputs["attention_mask"].bool()
        text = TextEncoding(hidden, mask, masked_mean(hidden, mask))  # with as_written, G's step reaches BERT
        text_d = TextEncoding(hidden.detach(), mask, text.pooled.detach())
        labels = torch.tensor([[it["labels"][a] for a in ShapesDataset.ATTRIBUTES] for it in items], device=device)
        wrong = text_d.pooled.roll(1, dims=0)
        z = torch.randn(batch, g.cfg.z_dim, generator=rng).to(device)
        with torch.no_grad():
            x_fake = g(z, text_d, rng=rng)
        d_step(d, d_opt, x_real, x_fake, text_d, wrong, loss="bce", augment=cfg.augment, rng=rng, step=i,
               labels=labels, aux_weight=cfg.aux_weight)
        g_step(g, d, g_opt, z, text, loss="nonsaturating", kl_weight=cfg.kl_weight, augment=cfg.augment, rng=rng,
               step=i, labels=labels, aux_weight=cfg.aux_weight)
        bert.zero_grad(set_to_none=True)  # the source's optimizers do not hold BERT: its gradients are wasted work

    return {"batch": batch, "precision": "torch.float32", "bert_autograd": as_written,
            **_timed(step, steps, warmup, device, batch)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=("quick", "cpu", "gpu"), default=None,
                        help="default: gpu with CUDA, else cpu")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of the real and synthetic loops")
    parser.add_argument("--source-steps", type=int, default=None,
                        help="timed steps of the source loop (default: --steps)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = args.preset or get_preset()
    print(f"machine: {machine()}\npreset: {preset}, device: {device}", flush=True)
    encoder = TextEncoder("minilm", device=device)
    results = {"machine": machine(), "preset": preset, "device": str(device)}
    results["real"] = real_loop(preset, args.steps, args.warmup, device, encoder)
    print("real:", results["real"], flush=True)
    results["synthetic"] = synthetic_loop(preset, args.steps, args.warmup, device, encoder.dim)
    print("synthetic:", results["synthetic"], flush=True)
    source_steps = args.source_steps or args.steps
    results["source"] = source_loop(preset, source_steps, args.warmup, device, encoder.tokenizer)
    print("source:", results["source"], flush=True)
    results["source_as_written"] = source_loop(preset, source_steps, args.warmup, device, encoder.tokenizer,
                                               as_written=True)
    print("source_as_written:", results["source_as_written"], flush=True)
    real = results["real"]["images_per_s"]
    results["real_over_synthetic"] = real / results["synthetic"]["images_per_s"]
    results["real_over_source"] = real / results["source"]["images_per_s"]
    results["real_over_source_as_written"] = real / results["source_as_written"]["images_per_s"]
    print("\n| loop | batch | precision | ms/step | images/s |\n|---|---|---|---|---|")
    for name in ("real", "synthetic", "source", "source_as_written"):
        r = results[name]
        print(f"| {name} | {r['batch']} | {r['precision'].replace('torch.', '')} | "
              f"{1000 * r['seconds_per_step']:.1f} | {r['images_per_s']:.0f} |")
    print(f"\nreal / synthetic = {results['real_over_synthetic']:.2f} (target >= 0.8)")
    print(f"real / source    = {results['real_over_source']:.1f}x (target >= 10x; BERT under no_grad)")
    print(f"real / source as written = {results['real_over_source_as_written']:.1f}x "
          "(BERT with autograd, as the source's code)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
