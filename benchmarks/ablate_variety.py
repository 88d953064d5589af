"""Wording and variety, each measure at the same budget: judge accuracy on seen and held-out sentence
structures and pairs, diversity and judge-FID.

    python benchmarks/ablate_variety.py [--preset cpu] [--steps 4000] [--json benchmarks/results/variety.json]

The recipe is `textimg train`'s GAN stage (as in ``ablate_gan.py``). Each variant trains from the same
seed and weights on ``ShapesDataset(20_000, "train", seed=0, image_size=32, grammar=...)``:

- the seven caption templates (what the committed pipeline learned);
- the rich grammar (``textimg.data.RICH_STRUCTURES``: 23 sentence structures, varied writing);
- the rich grammar and mode seeking (MSGAN's loss, ``GANTrainConfig.ms_weight`` 1 and 0.1);
- the rich grammar and minibatch standard deviation in D (``DiscriminatorConfig.minibatch_std``).

Then ``evaluate_pipeline`` scores ``--num-eval`` test captions at 32x32 with the committed judge: all four
attributes on the templates' captions, on the rich grammar's, on held-out sentence structures
(``HELDOUT_STRUCTURES``, never trained on) and on held-out colour-shape pairs; diversity (16 draws
of z for each of 16 captions) against real images'; judge-FID against its real-vs-real floor.
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch

VARIANTS = {  # id: (what it is, grammar, GANTrainConfig overrides, DiscriminatorConfig overrides)
    "templates": ("templates (the committed recipe)", "templates", {}, {}),
    "rich": ("rich grammar", "rich", {}, {}),
    "rich_ms": ("rich grammar + mode seeking", "rich", {"ms_weight": 1.0}, {}),
    "rich_ms_small": ("rich grammar + mode seeking, weight 0.1", "rich", {"ms_weight": 0.1}, {}),
    "rich_mbstd": ("rich grammar + minibatch std in D", "rich", {}, {"minibatch_std": True}),
}


def main(argv: list[str] | None = None) -> dict:
    from ablate_gan import train_variant
    from bench_stages import machine

    from textimg.data import ShapesDataset
    from textimg.metrics import load_judge
    from textimg.pipeline import TextToImagePipeline, evaluate_pipeline
    from textimg.text import TextEncoder

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu", choices=("quick", "cpu", "gpu"))
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--num-eval", type=int, default=1000)
    parser.add_argument("--num-train", type=int, default=20_000, help="training images (fewer: a smoke test)")
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS), help="run only these variants")
    parser.add_argument("--json", help="write the figures to this JSON file (merged with what it holds)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"machine: {machine()}\npreset {args.preset}, {args.steps} GAN steps per variant, {device}\n", flush=True)

    encoder = TextEncoder("minilm", device=device)
    judge = load_judge()
    results = {"machine": machine(), "date": datetime.date.today().isoformat(), "preset": args.preset,
               "steps": args.steps, "device": device,
               "threads": torch.get_num_threads(), "num_eval": args.num_eval, "variants": {}}
    if args.json:
        try:
            with open(args.json) as f:
                old = json.load(f)
            if {k: old.get(k) for k in ("preset", "steps", "num_eval")} == \
                    {k: results[k] for k in ("preset", "steps", "num_eval")}:
                results["variants"] = old.get("variants", {})
        except FileNotFoundError:
            pass
    columns = ("templates", "rich", "structures", "heldout")
    header = f"{'variant':36s}" + "".join(f"{c:>11s}" for c in columns)
    print(header + f"{'diversity':>16s}{'FID':>14s}{'ms/step':>9s}", flush=True)
    for key, (name, grammar, train_over, d_over) in VARIANTS.items():
        if args.only and key not in args.only:
            continue
        data = ShapesDataset(args.num_train, split="train", seed=0, image_size=32, grammar=grammar)
        encoder.encode_dataset(data.captions())
        generator, ms = train_variant(args.preset, encoder, data, train_over, d_over, args.steps, device)
        pipe = TextToImagePipeline(generator.cpu(), None, encoder.to("cpu"))
        scores = evaluate_pipeline(pipe, judge, args.num_eval, size=32, grammar="rich",
                                   parts=("seen", "heldout", "structures", "fid", "diversity"))
        templates = evaluate_pipeline(pipe, judge, args.num_eval, size=32, parts=("seen",))["seen"]
        encoder.to(device)
        row = {"name": name, "grammar": grammar, "gan": train_over, "discriminator": d_over,
               "ms_per_step": round(ms, 1),
               "templates": templates, "rich": scores["seen"], "structures": scores["structures"],
               "heldout": scores["heldout"], "diversity": scores["diversity"],
               "diversity_real": scores["diversity_real"], "fid": scores["fid"], "fid_floor": scores["fid_floor"]}
        results["variants"][key] = row
        print(f"{name:36s}" + "".join(f"{row[c]['all']:11.1%}" for c in columns)
              + f"{row['diversity']:8.2f} / {row['diversity_real']:5.2f}{row['fid']:7.1f} / {row['fid_floor']:4.1f}"
              + f"{ms:9.0f}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
                f.write("\n")
    return results


if __name__ == "__main__":
    main()
