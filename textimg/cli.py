"""The ``textimg`` command (also ``python -m textimg``): train, generate, evaluate, train-judge, grade.

    textimg train --preset quick          # every stage in order; run it again to resume
    textimg train --preset cpu --out checkpoints          # remake the committed pipeline (and its manifest)
    textimg train --diffusion --preset quick              # the diffusion cascade instead (notebook 06)
    textimg generate "a small red circle at the top left" "a large blue star" --out grid.png
    textimg generate --model runs/models/quick/pipeline_training/pipeline --seed 3 --per-prompt 4 "a green square"
    textimg evaluate --json metrics.json                      # the metrics table, on screen and as JSON
    textimg evaluate --record --model DIR                     # re-measure and write the results into its pipeline.json
    textimg train-judge --out checkpoints/judge               # remake the committed judge (the instrument)
    textimg grade submissions/ --csv grades.csv --json grades.json   # run and score a class's notebooks

Without ``--model`` the committed checkpoints are used. Errors in the arguments or the files
print one line naming the problem and exit with status 2 (bad arguments) or 1 (anything else).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from textimg.config import PRESETS, get_preset, models_dir
from textimg.pipeline import TRAIN_DIR


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"a seed must be in [0, 2**63), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="textimg", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    sub = parser.add_subparsers(dest="command", metavar="{train,generate,evaluate,train-judge,grade}")
    sub.required = True

    train = sub.add_parser("train", help="train every stage in order (resumable) and save the pipeline")
    train.add_argument("--preset", choices=PRESETS, default=None,
                       help="model sizes and step counts (default: $TEXTIMG_PRESET, else gpu with CUDA, else cpu)")
    train.add_argument("--out", type=Path, default=None,
                       help="output directory (default: runs/models/pipeline_training, or runs/models/quick/"
                       "pipeline_training for --preset quick); checkpoints/ remakes the committed one")
    train.add_argument("--num-train", type=_positive_int, help="training images (overrides the preset)")
    train.add_argument("--refiner-steps", type=_positive_int, help="refiner reconstruction steps")
    train.add_argument("--gan-steps", type=_positive_int, help="adversarial steps of the generator")
    train.add_argument("--refiner-gan-steps", type=_positive_int, help="adversarial fine-tuning steps of the refiner")
    train.add_argument("--diffusion", action="store_true",
                       help="train the diffusion cascade (notebook 06: base U-Net 32x32, super-resolution to 64x64) "
                       "instead of the GAN pipeline")
    train.add_argument("--base-steps", type=_positive_int, help="--diffusion: steps of the base U-Net")
    train.add_argument("--sr-steps", type=_positive_int, help="--diffusion: steps of the super-resolution U-Net")
    train.add_argument("--grammar", choices=("templates", "rich"), default=None,
                       help="how the training captions are written (default: the preset's; textimg.data.GRAMMARS)")
    train.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")

    gen = sub.add_parser("generate", help="prompts -> an image grid file")
    gen.add_argument("prompts", nargs="*", help="captions, each in quotes")
    gen.add_argument("--prompts-file", type=Path, help="a text file with one prompt per line (added to the others)")
    gen.add_argument("--model", type=Path, default=None,
                     help="a saved pipeline directory (default: the committed one)")
    gen.add_argument("--seed", type=_seed, default=0, help="noise seed: same prompts and seed, same images")
    gen.add_argument("--per-prompt", type=_positive_int, default=1, help="images per prompt (one row each)")
    gen.add_argument("--out", type=Path, default=Path("textimg_grid.png"), help="the grid image (.png, .jpg)")
    gen.add_argument("--device", default=None)

    ev = sub.add_parser("evaluate", help="the metrics table, on screen and as JSON")
    ev.add_argument("--model", type=Path, default=None, help="a saved pipeline directory (default: the committed one)")
    ev.add_argument("--num-samples", type=_positive_int, default=2000, help="images per set (default 2000)")
    ev.add_argument("--seed", type=_seed, default=0)
    ev.add_argument("--json", type=Path, default=None, help="also write the metrics here (default: print only)")
    ev.add_argument("--record", action="store_true",
                    help="re-measure the pipeline as training does (textimg.pipeline.measure) and write the results "
                         "into its pipeline.json: the record every quoted number about it comes from")
    ev.add_argument("--inception-fid", action="store_true",
                    help="also standard Inception FID (needs torch-fidelity and a network once)")
    ev.add_argument("--device", default=None)
    ev.add_argument("--no-progress", action="store_true")

    judge = sub.add_parser("train-judge", help="train, measure and save the judge that scores generated images")
    judge.add_argument("--out", type=Path, required=True,
                       help="output directory (checkpoints/judge: the committed one)")
    judge.add_argument("--preset", choices=("quick", "cpu"), default="cpu",
                       help="cpu: the committed judge; quick: seconds")
    judge.add_argument("--device", default=None)
    judge.add_argument("--no-progress", action="store_true")

    grade = sub.add_parser("grade", help="run submitted notebooks (untrusted) in the quick preset and score them")
    grade.add_argument("submissions", nargs="*", type=Path,
                       help="notebooks, or folders of them (one subfolder per student, or one notebook per student)")
    grade.add_argument("--csv", type=Path, help="write one row per student, a column per exercise")
    grade.add_argument("--json", type=Path, help="write every result, with each exercise's message")
    grade.add_argument("--jobs", type=_positive_int, default=1, help="submissions graded at once (default 1)")
    grade.add_argument("--timeout", type=_positive_int, default=600, help="seconds per notebook (default 600)")
    grade.add_argument("--memory", type=float, default=8.0, help="GB of address space per submission (default 8)")
    grade.add_argument("--isolation", choices=("auto", "namespace", "process"), default="auto",
                       help="namespace: no network, read-only course, own PID space (default where available)")
    grade.add_argument("--keep", type=Path, help="keep each executed notebook and its log here (feedback)")
    grade.add_argument("--require", metavar="ID",
                       help="with --from-json: exit 0 only if exercise ID earned all its points")
    grade.add_argument("--from-json", type=Path, help="read results written by an earlier --json instead of grading")
    return parser


def _device(name: str | None):
    from textimg.utils import get_device

    try:
        return get_device(name)
    except RuntimeError as err:  # an unknown device string, or CUDA asked for without CUDA
        raise ValueError(f"--device {name!r}: {err}") from None


def _load(model: Path | None, device):
    """The pipeline saved in ``model`` (the committed GAN pipeline if None), whichever kind its
    pipeline.json names: TextToImagePipeline or DiffusionPipeline."""
    from textimg.pipeline import TextToImagePipeline
    from textimg.utils import read_json

    path = model / "pipeline.json" if model is not None else None
    if path is not None and path.is_file() and isinstance(facts := read_json(path), dict) \
            and facts.get("class") == "DiffusionPipeline":
        from textimg.diffusion import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(model, device=device)
    return TextToImagePipeline.from_pretrained(model, device=device)


def cmd_train(args) -> int:
    from textimg.pipeline import PipelineTrainConfig, train_pipeline

    device = _device(args.device)
    preset = args.preset or get_preset()
    if args.diffusion:
        return train_diffusion_cmd(args, device, preset)
    if args.base_steps is not None or args.sr_steps is not None:
        raise ValueError("--base-steps and --sr-steps size the diffusion pipeline: add --diffusion")
    overrides = {k: v for k, v in {"num_train": args.num_train, "refiner_steps": args.refiner_steps,
                                   "gan_steps": args.gan_steps, "refiner_gan_steps": args.refiner_gan_steps,
                                   "grammar": args.grammar}.items()
                 if v is not None}
    cfg = PipelineTrainConfig.preset(preset, **overrides)
    out = args.out or models_dir(preset) / TRAIN_DIR
    print(f"textimg train: preset {preset}, device {device}, output {out}")
    command = "textimg " + shlex.join(args.argv)  # recorded in every saved config
    path = train_pipeline(out, preset, cfg, device=device, progress=not args.no_progress, command=command)
    print(f"done. Try:  textimg generate --model {path} \"a small red circle at the top left\"")
    return 0


def train_diffusion_cmd(args, device, preset: str) -> int:
    """``textimg train --diffusion``: :func:`textimg.diffusion.train_diffusion_pipeline`."""
    from textimg.diffusion import DIFFUSION_TRAIN_DIR, DiffusionPipelineTrainConfig, train_diffusion_pipeline

    gan_only = [flag for flag, v in (("--refiner-steps", args.refiner_steps), ("--gan-steps", args.gan_steps),
                                     ("--refiner-gan-steps", args.refiner_gan_steps)) if v is not None]
    if gan_only:
        raise ValueError(", ".join(gan_only) + " size the GAN pipeline; --diffusion takes --base-steps, --sr-steps")
    overrides = {k: v for k, v in {"num_train": args.num_train, "base_steps": args.base_steps,
                                   "sr_steps": args.sr_steps, "grammar": args.grammar}.items() if v is not None}
    cfg = DiffusionPipelineTrainConfig.preset(preset, **overrides)
    out = args.out or models_dir(preset) / DIFFUSION_TRAIN_DIR
    print(f"textimg train --diffusion: preset {preset}, device {device}, output {out}")
    path = train_diffusion_pipeline(out, preset, cfg, device=device, progress=not args.no_progress,
                                    command="textimg " + shlex.join(args.argv))
    print(f"done. Try:  textimg generate --model {path} \"a small red circle at the top left\"")
    return 0


def cmd_generate(args) -> int:
    from PIL import Image

    from textimg.viz import image_grid

    prompts = list(args.prompts)
    if args.prompts_file is not None:
        if not args.prompts_file.is_file():
            raise FileNotFoundError(f"no prompts file at {args.prompts_file}")
        lines = args.prompts_file.read_text(encoding="utf-8").splitlines()
        prompts += [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError("no prompts: give them as arguments (in quotes) or with --prompts-file")
    if args.out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
        raise ValueError(f"--out must end in .png, .jpg, .webp or .bmp, got {args.out.name!r}")
    pipe = _load(args.model, _device(args.device))
    images = pipe.generate(prompts, seed=args.seed, num_per_prompt=args.per_prompt)  # (B * n, 3, 64, 64)
    nrow = args.per_prompt if args.per_prompt > 1 else min(8, len(prompts))
    grid = image_grid(images, nrow=nrow, value_range=(0, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(args.out)
    print(f"{images.shape[0]} images ({len(prompts)} prompts x {args.per_prompt}, seed {args.seed}) -> {args.out}")
    return 0


def cmd_evaluate(args) -> int:
    from textimg.pipeline import evaluate_pipeline, metrics_table

    pipe = _load(args.model, _device(args.device))
    if args.record:
        return record_measurements(pipe, args)
    results = evaluate_pipeline(pipe, num_samples=args.num_samples, seed=args.seed, progress=not args.no_progress,
                                inception=args.inception_fid)
    results["model"] = str(args.model) if args.model else "checkpoints (committed)"
    print(metrics_table(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"metrics written to {args.json}")
    return 0


def record_measurements(pipe, args) -> int:
    """``textimg evaluate --record``: :func:`textimg.pipeline.measure` written into the pipeline's own
    pipeline.json (and the manifest, inside checkpoints/), with the machine that measured it."""
    import time

    from textimg.config import PIPELINE_DIR
    from textimg.pipeline import measure, metrics_table
    from textimg.training import run_facts
    from textimg.utils import read_json

    directory = args.model or PIPELINE_DIR
    facts = read_json(directory / "pipeline.json")
    for key in ("format", "class", "components", "text_encoder"):
        facts.pop(key, None)
    start = time.perf_counter()
    facts.update(measure(pipe, args.num_samples, progress=not args.no_progress))  # in pipe.grammar
    facts["evaluated"] = run_facts(pipe.device, command=f"textimg evaluate --record --num-samples {args.num_samples}",
                                   seconds=round(time.perf_counter() - start, 1))
    pipe.save_pretrained(directory, facts)
    print(metrics_table(facts["test"]))
    print(f"recorded in {directory / 'pipeline.json'}")
    return 0


def cmd_train_judge(args) -> int:
    from textimg.metrics import JudgeConfig, evaluate_judge, make_judge

    judge = make_judge(args.out, JudgeConfig.preset(args.preset), command="textimg " + shlex.join(args.argv),
                       device=_device(args.device), progress=not args.no_progress)
    print(f"judge saved to {args.out}; all four attributes right on 2,000 real test images: "
          f"{evaluate_judge(judge)['all']:.2%}")
    return 0


def cmd_grade(args) -> int:
    from textimg import grading

    if args.from_json:
        if not args.require:
            raise ValueError("--from-json needs --require ID")
        ok = grading.passed(args.from_json, args.require)
        print(f"{args.require}: {'all points' if ok else 'not all points'}")
        return 0 if ok else 1
    if not args.submissions:
        raise ValueError("name at least one submitted notebook or folder")
    limits = grading.Limits(timeout=args.timeout, memory_gb=args.memory,
                            threads=max(1, (os.cpu_count() or 1) // args.jobs))
    results = grading.grade(args.submissions, limits, args.isolation, args.jobs, args.keep)
    print(grading.table(results))
    grading.write_reports(results, args.csv, args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(argv) if argv is not None else sys.argv[1:]
    args = parser.parse_args(argv)  # exits with 2 and a usage line on bad arguments
    args.argv = argv
    from textimg.text import TextEncoderNotFoundError
    from textimg.utils import ChecksumError

    try:
        commands = {"train": cmd_train, "generate": cmd_generate, "evaluate": cmd_evaluate,
                    "train-judge": cmd_train_judge, "grade": cmd_grade}
        return commands[args.command](args)
    except (FileNotFoundError, ChecksumError, TextEncoderNotFoundError, ValueError, TypeError, RuntimeError) as err:
        print(f"textimg {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ntextimg {args.command}: interrupted" + ("; run the same command again to resume"
                                                          if args.command == "train" else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
