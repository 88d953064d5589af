"""Stage 5: the whole pipeline, caption -> 64x64 image, that a learner can prompt, save, load and measure.

    caption --> TextEncoder (frozen BERT) --> Generator (noise + text, 32x32) --> Refiner (VQ-VAE, 64x64)

:class:`TextToImagePipeline` holds the three stages. It is *Imagen-inspired*: like Google's Imagen
it conditions on a frozen pretrained language model and generates small first, then refines; unlike
Imagen its generator and refiner are a GAN and a VQ-VAE, not a cascade of diffusion models.

    pipe = TextToImagePipeline.from_pretrained()                # the committed checkpoints/pipeline
    images = pipe.generate(["a small red circle at the top left"], seed=0)   # (1, 3, 64, 64) in [0, 1]
    pipe(["a large blue star in the center"])[0].save("star.png")           # PIL images
    pipe.save_pretrained("runs/my_pipeline")                    # pipeline.json, generator/, refiner/
    TextToImagePipeline.from_pretrained("runs/my_pipeline")

Inside, images stay in the package's range [-1, 1] (:meth:`TextToImagePipeline.sample`); they
become [0, 1] once, at :meth:`~TextToImagePipeline.generate`. :func:`evaluate_pipeline` is the one
evaluator: every figure the course publishes for a pipeline comes from it. :func:`train_pipeline`
trains every stage in order, resumably: it is ``textimg train``, the one recipe.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from textimg.config import PIPELINE_DIR, PresetConfig, check_preset
from textimg.generator import Generator, GeneratorConfig
from textimg.refiner import Refiner, RefinerConfig, bicubic, refine
from textimg.text import TextEncoder, TextEncoding
from textimg.utils import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    check_weights_hash,
    evaluating,
    load_pipeline,
    manifest_for,
    progress_bar,
    read_json,
    read_safetensors,
    save_json,
    save_pipeline,
)
from textimg.viz import to_unit


def _check_prompts(prompts) -> list[str]:
    """A list of prompts (one string is a batch of one); the encoder's own checks name a bad item."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list of strings (or one string), got {type(prompts).__name__}")
    return list(prompts)


class TextToImagePipeline:
    """Text encoder -> generator -> refiner: prompts in, 64x64 images out.

    Args:
        generator: a trained :class:`~textimg.generator.Generator` (noise + text -> 32x32).
        refiner: a trained :class:`~textimg.refiner.Refiner` (32x32 -> 64x64); None upsamples bicubically.
        text_encoder: a :class:`~textimg.text.TextEncoder` whose ``dim`` is the generator's ``text_dim``,
            or the name of one to load (the one the generator was trained with; default "minilm").
        grammar: how its training captions were written ("templates" or "rich", see
            :data:`textimg.data.GRAMMARS`); :func:`evaluate_pipeline` writes its test captions the same way.
            :meth:`from_pretrained` reads it from the ``training`` facts in pipeline.json.

    The pipeline runs where its generator is (:meth:`to`), in eval mode and without gradients; it
    never trains its networks, so wrapping a generator that is still training leaves it as it was.
    """

    def __init__(self, generator: Generator, refiner: Refiner | None = None,
                 text_encoder: TextEncoder | str = "minilm", grammar: str = "templates"):
        from textimg.data import check_grammar

        if not isinstance(generator, Generator):
            raise TypeError(f"generator must be a textimg Generator, got {type(generator).__name__}")
        if refiner is not None and not isinstance(refiner, Refiner):
            raise TypeError(f"refiner must be a textimg Refiner or None, got {type(refiner).__name__}")
        self.text_encoder = TextEncoder(text_encoder) if isinstance(text_encoder, str) else text_encoder
        if self.text_encoder.dim != generator.cfg.text_dim:
            raise ValueError(f"the text encoder {self.text_encoder.name!r} gives {self.text_encoder.dim}-d vectors "
                             f"but the generator was built for text_dim={generator.cfg.text_dim}")
        if refiner is not None and refiner.cfg.text_cond and refiner.cfg.text_dim != self.text_encoder.dim:
            raise ValueError(f"the refiner expects text_dim={refiner.cfg.text_dim}, "
                             f"the text encoder gives {self.text_encoder.dim}")
        self.generator, self.refiner, self.grammar = generator, refiner, check_grammar(grammar)
        self.to(next(generator.parameters()).device)

    # -- where it runs ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    def to(self, device: str | torch.device) -> "TextToImagePipeline":
        """Moves the generator, the refiner and the text encoder to ``device``. Returns self."""
        self.generator.to(device)
        if self.refiner is not None:
            self.refiner.to(device)
        self.text_encoder.to(device)
        return self

    # -- generating ------------------------------------------------------------------------------

    def noise(self, n: int, seed: int = 0) -> Tensor:
        """The noise z (n, z_dim) for ``seed``: drawn on the CPU from its own torch.Generator, so a seed
        gives the same z on every device and never touches the global RNG."""
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}: {seed!r}")
        return torch.randn(n, self.generator.cfg.z_dim, generator=torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def sample_from(self, z: Tensor, text: TextEncoding, batch_size: int = 256, size: int = 64) -> Tensor:
        """Images for given noise z (B, z_dim) and a TextEncoding (B captions), in the package's range:
        float (B, 3, size, size) in [-1, 1] on the CPU; ``size`` 64 (refined) or 32 (the generator's)."""
        if size not in (32, 64):
            raise ValueError(f"size must be 32 (the generator's images) or 64 (refined), got {size!r}")
        out = []
        for s in range(0, z.shape[0], batch_size):
            t = text[s:s + batch_size].to(self.device)
            with evaluating(self.generator):
                x = self.generator(z[s:s + batch_size].to(self.device), t)  # (b, 3, 32, 32) in [-1, 1]
            if size == 64:
                x = bicubic(x, 64) if self.refiner is None else refine(
                    self.refiner, x, t if self.refiner.cfg.text_cond else None, batch_size)
            out.append(x.float().cpu())
        return torch.cat(out)

    def sample(self, prompts: list[str] | str, seed: int = 0, num_per_prompt: int = 1, batch_size: int = 256,
               size: int = 64) -> Tensor:
        """Like :meth:`generate`, in the package's range [-1, 1] (what the metrics and the judge read)."""
        prompts = _check_prompts(prompts)
        if not isinstance(num_per_prompt, int) or num_per_prompt < 1:
            raise ValueError(f"num_per_prompt must be a positive int, got {num_per_prompt!r}")
        text = self.text_encoder.encode(prompts)  # raises on a bad prompt, naming its position
        if num_per_prompt > 1:
            text = text[torch.arange(len(prompts)).repeat_interleave(num_per_prompt)]
        z = self.noise(len(prompts) * num_per_prompt, seed)
        return self.sample_from(z, text, batch_size=batch_size, size=size)

    def generate(self, prompts: list[str] | str, seed: int = 0, num_per_prompt: int = 1, batch_size: int = 256,
                 size: int = 64) -> Tensor:
        """Generates images for prompts.

        Args:
            prompts: B non-empty strings (one string is a batch of one).
            seed: the noise seed: the same prompts and seed give the same images; the global RNG
                is not touched.
            num_per_prompt: images per prompt (each with its own z), grouped by prompt.
            batch_size: images per forward pass (memory only: results agree up to float rounding).
            size: 64 (refined) or 32 (the generator's images, before the refiner).

        Returns:
            float (B * num_per_prompt, 3, size, size) in [0, 1], on the CPU.

        Raises:
            TypeError / ValueError naming the bad prompt (empty, not a string, ...) or argument.
        """
        return to_unit(self.sample(prompts, seed, num_per_prompt, batch_size, size))

    def __call__(self, prompts: list[str] | str, seed: int = 0, **kwargs) -> list:
        """Like :meth:`generate`, returning a list of PIL images (RGB)."""
        from PIL import Image

        images = self.generate(prompts, seed=seed, **kwargs)
        arrays = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
        return [Image.fromarray(a) for a in arrays]

    def interpolate(self, prompt_a: str, prompt_b: str, steps: int = 8, seed: int = 0) -> Tensor:
        """Walks the text embedding from ``prompt_a`` to ``prompt_b`` in ``steps`` even steps with one
        fixed z: returns (steps, 3, 64, 64) in [0, 1]. Token sequences are zero-padded to the same
        length and mixed like the pooled vector; the mask is the union of both."""
        if not isinstance(steps, int) or steps < 2:
            raise ValueError(f"steps must be an int >= 2, got {steps!r}")
        enc = self.text_encoder.encode([prompt_a, prompt_b])  # padded to the longer one: (2, T, D)
        w = torch.linspace(0, 1, steps).view(-1, 1)  # (steps, 1)
        tokens = (1 - w[..., None]) * enc.tokens[0] + w[..., None] * enc.tokens[1]  # (steps, T, D)
        mask = (enc.mask[0] | enc.mask[1]).expand(steps, -1)  # (steps, T)
        pooled = (1 - w) * enc.pooled[0] + w * enc.pooled[1]  # (steps, D)
        z = self.noise(1, seed).expand(steps, -1)
        return to_unit(self.sample_from(z, TextEncoding(tokens, mask.clone(), pooled)))

    # -- saving and loading: one folder per component + pipeline.json ----------------------------

    def save_pretrained(self, directory: str | Path, facts: dict | None = None) -> Path:
        """Writes ``directory/generator/``, ``directory/refiner/`` (each model.safetensors + config.json
        with its SHA-256) and ``directory/pipeline.json`` (the text encoder's name and ``facts``).
        Inside the committed ``checkpoints/`` the manifest is updated too. Returns the directory."""
        return save_pipeline(directory, type(self).__name__, {"generator": self.generator, "refiner": self.refiner},
                             {"text_encoder": self.text_encoder.name, **(facts or {})}, manifest_for(directory))

    @classmethod
    def from_pretrained(cls, directory: str | Path | None = None, text_encoder: TextEncoder | None = None,
                        device: str | torch.device | None = None) -> "TextToImagePipeline":
        """Loads a pipeline saved by :meth:`save_pretrained`; None loads the committed ``checkpoints/pipeline``
        (checked against ``checkpoints/MANIFEST.json``). A folder saved by textimg 0.1 (one
        model.safetensors with both networks) loads too. ``text_encoder`` shares an already loaded TextEncoder.

        Raises:
            FileNotFoundError: the directory or one of its files is missing (named).
            ChecksumError: a file does not match its recorded SHA-256 (named).
            ValueError: a file cannot be read, or is not a textimg pipeline (named).
        """
        directory = Path(directory) if directory is not None else PIPELINE_DIR
        if not directory.is_dir():
            raise FileNotFoundError(f"no pipeline directory at {directory}")
        if (directory / CONFIG_NAME).is_file() and not (directory / "pipeline.json").is_file():
            config, parts = _load_v1(directory)
        else:
            config, parts = load_pipeline(directory, cls.__name__)
        pipe = cls(parts["generator"], parts.get("refiner"),
                   text_encoder if text_encoder is not None else config.get("text_encoder", "minilm"),
                   training_grammar(config))
        return pipe.to(device) if device is not None else pipe

    def bicubic(self) -> "TextToImagePipeline":
        """The same pipeline with bicubic upsampling in place of the refiner (what the refiner adds)."""
        return TextToImagePipeline(self.generator, None, self.text_encoder, self.grammar)

    def __repr__(self) -> str:
        refiner = f"Refiner({self.refiner.num_parameters():,} parameters)" if self.refiner is not None else "bicubic"
        return (f"TextToImagePipeline(text_encoder={self.text_encoder.name!r}, "
                f"generator=Generator({self.generator.num_parameters():,} parameters), refiner={refiner}, "
                f"device={self.device})")


def training_grammar(facts: dict) -> str:
    """The caption grammar recorded in a pipeline.json's ``training`` facts; "templates" if unrecorded
    (every pipeline saved before the grammar existed)."""
    config = facts.get("training", {}).get("config", {}) if isinstance(facts, dict) else {}
    return config.get("grammar", "templates") if isinstance(config, dict) else "templates"


def _load_v1(directory: Path) -> tuple[dict, dict]:
    """A pipeline folder of textimg 0.1 (config.json with both configs, model.safetensors with keys
    ``generator.*`` / ``refiner.*``), read into today's (config, components)."""
    config_path, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    config = read_json(config_path)
    if not isinstance(config, dict) or config.get("format") != "textimg.pipeline/1":
        raise ValueError(f"{config_path} is not a textimg pipeline config (no pipeline.json beside it either)")
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint file {weights} is missing")
    check_weights_hash(weights, config, config_path)
    state = read_safetensors(weights)
    try:
        parts = {"generator": Generator(GeneratorConfig.from_dict(config["generator"])),
                 "refiner": Refiner(RefinerConfig.from_dict(config["refiner"])) if config.get("refiner") else None}
        for name, model in parts.items():
            if model is not None:
                model.load_state_dict({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")})
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{weights} and {config_path} do not describe the same pipeline "
                         f"({type(err).__name__}: {str(err)[:300]})") from err
    return config, {k: m.eval() if m is not None else None for k, m in parts.items()}


# -----------------------------------------------------------------------------------------------
# The one evaluator

PARTS = ("seen", "heldout", "structures", "fid", "diversity", "refiner")


def evaluate_pipeline(pipe, judge: torch.nn.Module | None = None, num_samples: int = 2000, seed: int = 0,
                      size: int = 64, parts: tuple[str, ...] = PARTS, diversity_captions: int | None = None,
                      diversity_samples: int = 16, progress: bool = False, inception: bool = False,
                      grammar: str | None = None) -> dict:
    """Every number the course reports for a pipeline (or a bare generator, wrapped in one), on the
    shapes dataset's test split. ``pipe`` is a :class:`TextToImagePipeline` or a
    :class:`~textimg.diffusion.DiffusionPipeline` (anything with ``sample(captions, seed=, size=)`` and
    ``grammar``; ``DiffusionPipeline.with_settings`` chooses its guidance and steps). ``parts`` chooses
    what to measure:

    - ``seen``: judge accuracy (per attribute and all four) of the images for the captions of
      ``num_samples`` test items (compositions seen in training), the three most frequent shape
      misreadings (``mistakes``, :func:`textimg.metrics.confusions`), and ``sharpness`` beside the real images';
    - ``heldout``: the same accuracy for the ``heldout`` split (colour-shape pairs never seen);
    - ``structures``: the same accuracy for the ``seen`` items' labels, captioned in sentence
      structures no training caption uses (``grammar="heldout"``, :data:`textimg.data.HELDOUT_STRUCTURES`);
    - ``fid``: the Fréchet distance in the judge's feature space to the real images of the same items,
      and ``fid_floor``, the distance between two disjoint sets of real test images (what a perfect
      generator scores); with ``inception=True`` also standard Inception FID (needs torch-fidelity);
    - ``diversity``: mean pairwise judge-feature distance over ``diversity_samples`` draws of z for each
      of ``diversity_captions`` captions (default: the first 16 test captions, fewer if ``num_samples``
      is smaller), and ``diversity_real``: the same for real images;
    - ``refiner``: PSNR / SSIM of the refiner and of bicubic upsampling on real 32x32 test images, its
      codebook usage and perplexity (64x64 with a refiner only).

    ``size`` 64 measures the refined images, 32 the generator's. ``seed`` picks the items and the
    noise (the global RNG is untouched); ``judge`` defaults to the committed one; ``grammar`` writes the
    test captions ("templates" or "rich"; default: the pipeline's own, as its training captions were written,
    ``pipe.grammar``). Returns a dict of
    floats (fractions for accuracies) that :func:`metrics_table` prints.
    """
    from textimg.data import ShapesDataset, sample_images
    from textimg.metrics import caption_accuracy, confusions, diversity, judge_fid, load_judge, sharpness
    from textimg.refiner import evaluate_refiner

    diversity_captions = min(16, num_samples) if diversity_captions is None else diversity_captions
    for name, value, low in (("num_samples", num_samples, 2), ("diversity_captions", diversity_captions, 1),
                             ("diversity_samples", diversity_samples, 2)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low} (a Fréchet distance and a diversity need at least "
                             f"two images), got {value!r}")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown part(s) {unknown}; choose from {PARTS}")
    if size not in (32, 64):
        raise ValueError(f"size must be 32 or 64, got {size!r}")
    grammar = pipe.grammar if grammar is None else grammar
    judge = judge if judge is not None else load_judge()
    results: dict = {"images": num_samples, "seed": seed, "size": size}
    test = ShapesDataset(2 * num_samples, split="test", seed=seed, image_size=size, cache=False, grammar=grammar)
    captions = test.captions()[:num_samples]
    fake = real = None
    for part in progress_bar([p for p in PARTS if p in parts], desc="evaluating", unit="part", disable=not progress):
        if part in ("seen", "fid") and fake is None:
            fake = pipe.sample(captions, seed=seed, size=size)  # (N, 3, S, S) in [-1, 1]
            real = torch.stack([test[i]["image"] for i in range(2 * num_samples)])  # (2N, 3, S, S)
        if part == "seen":
            results["seen"] = caption_accuracy(judge, fake, captions)
            results["mistakes"] = [list(m) for m in confusions(judge, fake, captions, "shape", given="size")[:3]]
            results["sharpness"], results["sharpness_real"] = sharpness(fake), sharpness(real[:num_samples])
        elif part == "heldout":
            held = ShapesDataset(num_samples, split="heldout", seed=seed, cache=False, grammar=grammar).captions()
            results["heldout"] = caption_accuracy(judge, pipe.sample(held, seed=seed + 1, size=size), held)
        elif part == "structures":  # the same items (labels) as "seen", other words
            new = ShapesDataset(num_samples, split="test", seed=seed, cache=False, grammar="heldout").captions()
            results["structures"] = caption_accuracy(judge, pipe.sample(new, seed=seed, size=size), new)
        elif part == "fid":
            results["fid"] = judge_fid(judge, fake, real[:num_samples])
            results["fid_floor"] = judge_fid(judge, real[num_samples:], real[:num_samples])
            if inception:
                from textimg.metrics import inception_fid

                results["fid_inception"] = inception_fid(fake, real[:num_samples])
                results["fid_inception_floor"] = inception_fid(real[num_samples:], real[:num_samples])
        elif part == "diversity":
            div_caps = captions[:diversity_captions]
            results["diversity"] = sum(
                diversity(judge, pipe.sample([c] * diversity_samples, seed=seed + 2 + k, size=size))
                for k, c in enumerate(div_caps)) / len(div_caps)
            results["diversity_real"] = sum(  # spec: the labels without a render
                diversity(judge, sample_images(test.spec(k).labels, diversity_samples, seed=seed + k, image_size=size))
                for k in range(len(div_caps))) / len(div_caps)
        elif part == "refiner" and getattr(pipe, "refiner", None) is not None and size == 64:
            r = evaluate_refiner(pipe.refiner, num_samples, "test", seed=seed + 1,
                                 text_encoder=pipe.text_encoder if pipe.refiner.cfg.text_cond else None)
            results["refiner"] = {k: v for k, v in r.items() if k not in ("images", "split")}
    return results


def metrics_table(results: dict) -> str:
    """The results of :func:`evaluate_pipeline` as a plain-text table (Markdown-compatible)."""
    from textimg.data import ATTRIBUTES

    attrs = [*ATTRIBUTES, "all"]
    rows = ["| judge accuracy | " + " | ".join(attrs) + " |", "|---|" + "---|" * len(attrs)]
    for name, what in (("seen", "seen compositions"), ("heldout", "held-out compositions"),
                       ("structures", "held-out sentence structures")):
        if name in results:
            cells = " | ".join(f"{100 * results[name][a]:.1f} %" for a in attrs)
            rows.append(f"| {what} | {cells} |")
    if results.get("mistakes"):
        rows.append("\nMost common shape mistakes (seen): " + ", ".join(
            f"{asked} read as {read} ({n})" for asked, read, n in results["mistakes"]) + ".")
    rows += ["", "| measure | pipeline | reference |", "|---|---|---|"]
    if "fid" in results:
        rows.append(f"| judge-FID (vs real test images) | {results['fid']:.2f} | "
                    f"{results['fid_floor']:.2f} (real vs real floor) |")
    if "fid_inception" in results:
        rows.append(f"| Inception FID (standard) | {results['fid_inception']:.2f} | "
                    f"{results['fid_inception_floor']:.2f} (real vs real floor) |")
    if "diversity" in results:
        rows.append(f"| diversity (judge features) | {results['diversity']:.2f} | "
                    f"{results['diversity_real']:.2f} (real images) |")
    if "sharpness" in results:
        rows.append(f"| sharpness (Laplacian variance) | {results['sharpness']:.4f} | "
                    f"{results['sharpness_real']:.4f} (real images) |")
    if "refiner" in results:
        r = results["refiner"]
        rows += [f"| refiner PSNR on real 32x32 inputs | {r['psnr_refiner']:.2f} dB | "
                 f"{r['psnr_bicubic']:.2f} dB (bicubic) |",
                 f"| refiner SSIM | {r['ssim_refiner']:.4f} | {r['ssim_bicubic']:.4f} (bicubic) |",
                 f"| codebook usage / perplexity | {100 * r['usage']:.1f} % / {r['perplexity']:.1f} | |"]
    rows.append(f"\n{results['images']} images per set, {results['size']}x{results['size']}, seed {results['seed']}.")
    return "\n".join(rows)


def measure(pipe, num_samples: int = 2000, progress: bool = False, grammar: str | None = None) -> dict:
    """What a saved pipeline (this module's, or a :class:`~textimg.diffusion.DiffusionPipeline`) records
    about itself: :func:`evaluate_pipeline` at 64x64 ("test"), on its first stage's own 32x32 images
    ("test_32", seen captions and diversity), and at 64x64 with bicubic upsampling in place of the
    refiner or SR model (``pipe.bicubic()``, "test_bicubic": what that stage adds); seed 0, rounded; test
    captions written in ``grammar`` (default: the one the pipeline was trained on, ``pipe.grammar``)."""
    from textimg.training import rounded

    grammar = pipe.grammar if grammar is None else grammar
    return {"test": rounded(evaluate_pipeline(pipe, num_samples=num_samples, seed=0, progress=progress,
                                              grammar=grammar)),
            "test_32": rounded(evaluate_pipeline(pipe, num_samples=num_samples, seed=0, size=32,
                                                 parts=("seen", "diversity"), grammar=grammar)),
            "test_bicubic": rounded(evaluate_pipeline(pipe.bicubic(), num_samples=num_samples, seed=0,
                                                      parts=("seen", "heldout", "fid"), grammar=grammar))}


# -----------------------------------------------------------------------------------------------
# Training every stage in order: textimg train, the one recipe


@dataclass
class PipelineTrainConfig(PresetConfig):
    """How much :func:`train_pipeline` trains each stage. The model sizes and each loop's
    hyper-parameters come from the preset's own configs (GeneratorConfig, GANTrainConfig, ...)."""

    num_train: int = 20_000  # training images (and their captions)
    refiner_steps: int = 2000  # stage 3: the refiner's reconstruction training
    gan_steps: int = 24_000  # stage 4: the generator against the matching-aware discriminator
    refiner_gan_steps: int = 300  # stage 4: the refiner's adversarial fine-tuning
    checkpoint_every: int = 200  # refiner and GAN steps between resumable checkpoints
    eval_samples: int = 2000  # test captions per set for the final evaluation (evaluate_pipeline)
    grammar: str = "templates"  # how the training captions are written (ShapesDataset's grammar)
    seed: int = 0

    SIZES = {"quick": dict(num_train=256, refiner_steps=10, gan_steps=10, refiner_gan_steps=3, checkpoint_every=5,
                           eval_samples=32),
             "cpu": dict(),
             "gpu": dict(num_train=40_000, refiner_steps=4000, gan_steps=20_000, refiner_gan_steps=600,
                         checkpoint_every=500)}

    def __post_init__(self):
        from textimg.data import check_grammar

        check_grammar(self.grammar, training=True)


TRAIN_STAGES = ("text", "refiner", "gan", "refiner_gan", "pipeline")
TRAIN_DIR = "pipeline_training"  # textimg train's default folder inside config.models_dir(preset)


def train_pipeline(out_dir: str | Path, preset: str = "cpu", cfg: PipelineTrainConfig | None = None,
                   device: str | torch.device | None = None, progress: bool = True, command: str | None = None,
                   log=print) -> Path:
    """Trains the pipeline's stages in course order into ``out_dir``, in the committed checkpoints' layout:

    1. ``text``: encodes the training captions once with the frozen text encoder
       -> ``training/text_cache.safetensors``;
    2. ``refiner``: the refiner on reconstruction (notebook 03) -> ``refiner/``;
    3. ``gan``: the generator against a matching-aware discriminator with an attribute head
       (notebook 04) -> ``pipeline/generator/``;
    4. ``refiner_gan``: the refiner fine-tuned with a PatchGAN (notebook 04) -> ``pipeline/refiner/``;
    5. ``pipeline``: measured by :func:`evaluate_pipeline` -> ``pipeline/pipeline.json``.

    Resumable: run it again with the same ``out_dir`` and finished stages are skipped, and the
    refiner and GAN stages continue exactly from their checkpoints in ``training/``; the short
    fine-tuning starts again. The preset and config are kept in ``train_config.json``; a second run
    must match them. Every fact a saved config records is written here, by code
    (:func:`textimg.training.run_facts`). Given the committed ``checkpoints/`` folder, the manifest is
    updated too. Under ``accelerate launch`` every process trains and the main one writes.

    Returns:
        the pipeline's directory, ``out_dir/pipeline``.
    """
    from accelerate import PartialState

    from textimg.data import NUM_CLASSES, ShapesDataset
    from textimg.discriminator import Discriminator, DiscriminatorConfig, PatchDiscriminator, PatchDiscriminatorConfig
    from textimg.gan import GANTrainConfig, train_gan
    from textimg.refiner import RefinerGANConfig, finetune_refiner, train_refiner
    from textimg.training import on_cpu, run_facts
    from textimg.utils import seeded
    from textimg.vqvae import VQTrainConfig

    preset = check_preset(preset)
    cfg = cfg or PipelineTrainConfig.preset(preset)
    command = command or f"textimg train --preset {preset}"
    out = Path(out_dir)
    processes = PartialState(cpu=on_cpu(device))  # this process's rank, before any training loop starts
    device = processes.device  # under accelerate launch: this process's own GPU
    main = processes.is_main_process
    record = {"format": "textimg.train/1", "preset": preset, "config": cfg.to_dict()}
    record_path = out / "train_config.json"
    if record_path.is_file():
        old = read_json(record_path)
        old = old if isinstance(old, dict) else {}
        if {k: old.get(k) for k in record} != record:
            raise ValueError(f"{out} holds a run with preset {old.get('preset')!r} and config {old.get('config')}; "
                             f"resume it with the same settings, or train into another output directory")
    elif main:
        save_json(record, record_path)
    manifest = manifest_for(out)
    done = {"refiner": out / "refiner", "gan": out / "pipeline" / "generator",
            "refiner_gan": out / "pipeline" / "refiner"}

    def finished(stage: str) -> bool:
        return (done[stage] / CONFIG_NAME).is_file()

    def facts(stage: str, model, steps: int, history: dict, **more) -> dict:
        keep = {k: v for k, v in history.items() if k != "seconds"}
        return {"text_encoder": text_encoder.name, "parameters": model.num_parameters(), "training": run_facts(
            device, command=command, preset=preset, stage=stage, steps=steps, num_train=cfg.num_train,
            seed=cfg.seed, processes=processes.num_processes, seconds=history["seconds"], **more, history=keep)}

    started = time.perf_counter()
    text_encoder = TextEncoder("minilm", device=device)
    data64 = ShapesDataset(cfg.num_train, split="train", seed=cfg.seed, grammar=cfg.grammar)
    data32 = ShapesDataset(cfg.num_train, split="train", seed=cfg.seed, image_size=32, grammar=cfg.grammar)
    cache = out / "training" / "text_cache.safetensors"
    log(f"[1/5] text: encoding {cfg.num_train:,} training captions with {text_encoder.name}")
    if cache.is_file():
        text_encoder.load_cache(cache)
    else:
        text_encoder.encode_dataset(data64.captions(), progress=progress and main)
        if main:
            text_encoder.save_cache(cache)

    processes.wait_for_everyone()  # every process sees the same finished stages
    log(f"[2/5] refiner: {cfg.refiner_steps} reconstruction steps" + (" (done, skipped)" * finished("refiner")))
    if not finished("refiner"):
        with seeded(cfg.seed):
            refiner = Refiner(RefinerConfig.preset(preset, text_cond=True, text_dim=text_encoder.dim))
        train_cfg = VQTrainConfig.preset(preset, seed=cfg.seed)
        history = train_refiner(refiner, data64, train_cfg, cfg.refiner_steps, device=device,
                                text_encoder=text_encoder, progress=progress,
                                log_every=max(1, cfg.refiner_steps // 20), checkpoint_dir=out / "training",
                                checkpoint_every=cfg.checkpoint_every)
        if main:
            refiner.cpu().save_pretrained(done["refiner"], facts("refiner", refiner, cfg.refiner_steps, history,
                                                                 config=train_cfg.to_dict()), manifest)

    processes.wait_for_everyone()
    log(f"[3/5] gan: {cfg.gan_steps} adversarial steps" + (" (done, skipped)" * finished("gan")))
    if not finished("gan"):
        with seeded(cfg.seed):
            generator = Generator(GeneratorConfig.preset(preset, text_dim=text_encoder.dim))
            discriminator = Discriminator(DiscriminatorConfig.preset(preset, text_dim=text_encoder.dim,
                                                                     num_classes=NUM_CLASSES))
        gan_cfg = GANTrainConfig.preset(preset, seed=cfg.seed)
        history = train_gan(generator, discriminator, text_encoder, data32, gan_cfg, steps=cfg.gan_steps,
                            checkpoint_dir=out / "training", checkpoint_every=cfg.checkpoint_every, resume=True,
                            progress=progress, log_every=max(1, min(100, cfg.gan_steps // 10)), device=device)
        if main:
            generator.cpu().save_pretrained(done["gan"], facts("gan", generator, cfg.gan_steps, history,
                                                               config=gan_cfg.to_dict(),
                                                               discriminator=discriminator.cfg.to_dict()), manifest)

    processes.wait_for_everyone()
    log(f"[4/5] refiner_gan: {cfg.refiner_gan_steps} adversarial fine-tuning steps"
        + (" (done, skipped)" * finished("refiner_gan")))
    if not finished("refiner_gan"):
        refiner = Refiner.from_pretrained(done["refiner"])
        with seeded(cfg.seed):
            patch_d = PatchDiscriminator(PatchDiscriminatorConfig.preset(preset))
        r_cfg = RefinerGANConfig.preset(preset, seed=cfg.seed)
        history = finetune_refiner(refiner, patch_d, data64, text_encoder, r_cfg, cfg.refiner_gan_steps, device=device,
                                   progress=progress, log_every=max(1, cfg.refiner_gan_steps // 10))
        if main:
            refiner.cpu().save_pretrained(done["refiner_gan"], facts(
                "refiner_gan", refiner, cfg.refiner_gan_steps, history, config=r_cfg.to_dict(),
                discriminator=patch_d.cfg.to_dict()), manifest)

    processes.wait_for_everyone()
    log(f"[5/5] pipeline: measured on {cfg.eval_samples:,} test captions per set")
    path = out / "pipeline"
    if main:
        generator, refiner = Generator.from_pretrained(done["gan"]), Refiner.from_pretrained(done["refiner_gan"])
        pipe = TextToImagePipeline(generator, refiner, text_encoder.to("cpu"))
        pipe.save_pretrained(path, {"training": run_facts(
            device, command=command, preset=preset, config=cfg.to_dict(),
            seconds_this_run=time.perf_counter() - started), **measure(pipe, cfg.eval_samples, progress, cfg.grammar)})
        log(f"saved the pipeline to {path}")
    processes.wait_for_everyone()
    return path

