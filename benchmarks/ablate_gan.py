"""Each fix of the committed GAN recipe taken away in turn, at the same budget: judge accuracy and diversity.

    python benchmarks/ablate_gan.py [--preset cpu] [--steps 3000] [--json out.json]

The recipe is `textimg train`'s GAN stage: the source document's L_D (binary cross-entropy, with
GAN-CLS's mismatched captions) and the non-saturating L_G, spectral norm, DiffAugment (colour,
translation) and the discriminator's attribute head (AC-GAN). Each variant changes one thing and
trains from the same seed on the same ``ShapesDataset(20_000, "train", seed=0, image_size=32)``
(``--num-train``);
then `evaluate_generator` scores 1,000 test captions at 32x32 (all four attributes, and diversity:
16 draws of one caption, 16 captions). The machine is printed first; quote it with the numbers.
Notebook 04 section 6 shows the same fixes at 120 steps, where the symptoms (not the accuracy) differ.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

VARIANTS = {  # name: (GANTrainConfig overrides, DiscriminatorConfig overrides)
    "recipe (BCE, SN, DiffAugment, attribute head)": ({}, {}),
    "without spectral norm": ({}, {"spectral_norm": False}),
    "without DiffAugment": ({"augment": ""}, {}),
    "without the attribute head": ({}, {"num_classes": ()}),
    "hinge losses instead of BCE": ({"d_loss": "hinge", "g_loss": "hinge"}, {}),
}


def train_variant(preset: str, encoder, data, train_over: dict, d_over: dict, steps: int, device: str):
    """The preset's G and D from seed 0, with the AC-GAN head unless ``d_over`` says
    otherwise, trained ``steps`` GAN steps with the overrides: (generator, ms per step)."""
    from textimg.data import NUM_CLASSES
    from textimg.discriminator import Discriminator, DiscriminatorConfig
    from textimg.gan import GANTrainConfig, train_gan
    from textimg.generator import Generator, GeneratorConfig
    from textimg.utils import seeded

    with seeded(0):  # every variant starts from the same weights where it can
        generator = Generator(GeneratorConfig.preset(preset, text_dim=encoder.dim))
        discriminator = Discriminator(DiscriminatorConfig.preset(preset, text_dim=encoder.dim,
                                                                 **{"num_classes": NUM_CLASSES, **d_over}))
    cfg = GANTrainConfig.preset(preset, seed=0, **train_over)
    start = time.perf_counter()
    train_gan(generator, discriminator, encoder, data, cfg, steps=steps, progress=False, log_every=steps,
              device=device)
    return generator, 1000 * (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> dict:
    from bench_stages import machine

    from textimg.data import ShapesDataset
    from textimg.metrics import load_judge
    from textimg.pipeline import TextToImagePipeline, evaluate_pipeline
    from textimg.text import TextEncoder

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu", choices=("quick", "cpu", "gpu"))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--num-eval", type=int, default=1000)
    parser.add_argument("--num-train", type=int, default=20_000, help="training images (fewer: a smoke test)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"machine: {machine()}\npreset {args.preset}, {args.steps} GAN steps per variant, {device}\n", flush=True)

    encoder = TextEncoder("minilm", device=device)
    data = ShapesDataset(args.num_train, split="train", seed=0, image_size=32)
    encoder.encode_dataset(data.captions())
    judge = load_judge()
    results = {"machine": machine(), "preset": args.preset, "steps": args.steps, "device": device, "variants": {}}
    print(f"{'variant':48s}{'shape':>8s}{'all':>8s}{'diversity':>11s}{'ms/step':>9s}", flush=True)
    for name, (train_over, d_over) in VARIANTS.items():
        generator, ms = train_variant(args.preset, encoder, data, train_over, d_over, args.steps, device)
        pipe = TextToImagePipeline(generator.cpu(), None, encoder.to("cpu"))
        scores = evaluate_pipeline(pipe, judge, args.num_eval, size=32, parts=("seen", "diversity"))
        encoder.to(device)
        acc = scores["seen"]
        results["variants"][name] = {"accuracy": acc, "diversity": scores["diversity"], "ms_per_step": ms}
        print(f"{name:48s}{acc['shape']:8.1%}{acc['all']:8.1%}{scores['diversity']:11.2f}{ms:9.0f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
