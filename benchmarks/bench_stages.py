"""Measures the throughput figures the README and BENCHMARKS.md quote, on this machine.

    python benchmarks/bench_stages.py [--json out.json]

Figures: dataset rendering (images/s, first pass and cached), text encoding with MiniLM (captions/s,
without and with the cache), and one regression training step of the generator per preset
(forward + backward + Adam, batch 64), and one training step of the stage-3 VQ-VAE and refiner per
preset (batch 32, the package's own `train_vqvae` loop), and one `train_gan` step per preset (its
own batch size). Each figure is the median of several repeats. The machine
is printed first; quote it with the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def machine() -> str:
    from textimg.training import describe_machine

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{describe_machine()}, torch {torch.__version__} ({torch.get_num_threads()} threads), {gpu}"


def median_time(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_data(n: int = 5_000) -> dict:
    from textimg.data import ShapesDataset

    def first_pass(size):
        ds = ShapesDataset(n, seed=1, image_size=size)
        for i in range(n):
            ds[i]
        return ds

    out = {f"render {s}x{s}, first pass (images/s)": n / median_time(lambda: first_pass(s)) for s in (64, 32)}
    ds = first_pass(64)
    out["64x64 from the cache (images/s)"] = n / median_time(lambda: [ds[i] for i in range(n)])
    return out


def bench_text(n: int = 2_000) -> dict:
    from textimg.data import ShapesDataset
    from textimg.text import TextEncoder

    captions = ShapesDataset(n, seed=2).captions()
    enc = TextEncoder("minilm")
    uncached = TextEncoder("minilm", cache=False)

    def cold():
        for i in range(0, n, 256):
            uncached.encode(captions[i:i + 256])

    def warm():
        for i in range(0, n, 64):
            enc.encode(captions[i:i + 64])

    enc.encode_dataset(captions)
    return {"MiniLM, no cache, batches of 256 (captions/s)": n / median_time(cold, 2),
            "MiniLM, from the cache, batches of 64 (captions/s)": n / median_time(warm)}


def random_text(batch: int, dim: int, tokens: int = 12, device="cpu"):
    """A random TextEncoding (B, T, D) with every token real: the text side of a step, without an encoder."""
    from textimg.text import TextEncoding

    return TextEncoding(torch.randn(batch, tokens, dim), torch.ones(batch, tokens, dtype=torch.bool),
                        torch.randn(batch, dim)).to(device)


def regression_step(preset: str, batch: int = 64, device="cpu", foreach: bool | None = None, **overrides):
    """One regression training step of the preset's generator (forward, regression_loss, backward, Adam)
    on random text and images, as a callable; returns (step, generator)."""
    from textimg.generator import Generator, GeneratorConfig, regression_loss

    cfg = GeneratorConfig.preset(preset, **overrides)
    g = Generator(cfg).to(device)
    opt = torch.optim.Adam(g.parameters(), foreach=foreach)
    text = random_text(batch, cfg.text_dim, device=device)
    x_real = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1

    def step():
        loss = regression_loss(g(torch.randn(batch, cfg.z_dim, device=device), text), x_real)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step, g


def bench_generator_step(batch: int = 64, steps: int = 10) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    for preset in ("quick", "cpu", "gpu"):
        step, g = regression_step(preset, batch, device)

        def run():
            for _ in range(steps):
                step()
            if device == "cuda":
                torch.cuda.synchronize()

        run()  # warm-up
        out[f"generator {preset} preset: {g.num_parameters():,} params, ms/step (batch {batch}, {device})"] = \
            1000 * median_time(run) / steps
    return out


def bench_vqvae_step(batch: int = 32, steps: int = 10) -> dict:
    from textimg.refiner import Refiner, RefinerConfig, train_refiner
    from textimg.vqvae import VQVAE, VQTrainConfig, VQVAEConfig, train_vqvae

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x_real = torch.rand(batch, 3, 64, 64) * 2 - 1  # one batch: the step, not the data path
    out = {}
    for preset in ("quick", "cpu", "gpu"):
        for name, model, train in (("VQ-VAE", VQVAE(VQVAEConfig.preset(preset)), train_vqvae),
                                   ("refiner", Refiner(RefinerConfig.preset(preset, text_cond=False)), train_refiner)):
            model.to(device)
            cfg = VQTrainConfig(batch_size=batch)
            train(model, x_real, cfg, steps=2, progress=False)  # warm-up
            seconds = statistics.median(train(model, x_real, cfg, steps=steps, progress=False,
                                              log_every=steps)["seconds"] for _ in range(3))
            out[f"{name} {preset} preset: {model.num_parameters():,} params, ms/step (batch {batch}, {device})"] = \
                1000 * seconds / steps
    return out



def bench_gan_step(steps: int = 10) -> dict:
    """One `train_gan` step per preset (its own batch size: 16 / 32 / 64): D's step and G's, with the
    captions' text already cached and the images rendered; median of 3 runs of ``steps`` steps."""
    from textimg.data import NUM_CLASSES, ShapesDataset
    from textimg.discriminator import Discriminator, DiscriminatorConfig
    from textimg.gan import GANTrainConfig, train_gan
    from textimg.generator import Generator, GeneratorConfig
    from textimg.text import TextEncoder

    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder = TextEncoder("minilm", device=device)
    data = ShapesDataset(1024, split="train", seed=0, image_size=32).render_all()  # the step, not the renderer
    encoder.encode_dataset(data.captions())
    out = {}
    for preset in ("quick", "cpu", "gpu"):
        g = Generator(GeneratorConfig.preset(preset, text_dim=encoder.dim))
        d = Discriminator(DiscriminatorConfig.preset(preset, text_dim=encoder.dim, num_classes=NUM_CLASSES))
        cfg = GANTrainConfig.preset(preset)
        train_gan(g, d, encoder, data, cfg, steps=3, progress=False, device=device)  # warm-up
        seconds = statistics.median(train_gan(g, d, encoder, data, cfg, steps=steps, progress=False,
                                              log_every=steps, device=device)["seconds"] for _ in range(3))
        out[f"GAN {preset} preset: {g.num_parameters() + d.num_parameters():,} params (G + D), "
            f"ms/step (batch {cfg.batch_size}, {device})"] = 1000 * seconds / steps
    return out

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    print(f"machine: {machine()}\n")
    results = {"machine": machine()}
    for bench in (bench_data, bench_text, bench_generator_step, bench_vqvae_step, bench_gan_step):
        for name, value in bench().items():
            results[name] = round(value, 1)
            print(f"{name:75s} {value:12,.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
