"""Stage 5: the whole pipeline, caption -> 64x64 image, that a learner can prompt, save, load and measure.

    caption --> TextEncoder (frozen BERT) --> Generator (noise + text, 32x32) --> Refiner (VQ-VAE, 64x64)

:class:`TextToImagePipeline` holds the three stages. It is *Imagen-inspired*: like Google's Imagen
it conditions on a frozen pretrained language model and generates small first, then refines; unlike
Imagen its generator and refiner are a GAN and a VQ-VAE, not a cascade of diffusion models.

    pipe = TextToImagePipeline.from_pretrained()                # the committed checkpoints
    images = pipe.generate(["a small red circle at the top left"], seed=0)   # (1, 3, 64, 64) in [0, 1]
    pipe(["a large blue star in the center"])[0].save("star.png")           # PIL images
    pipe.save_pretrained("runs/my_pipeline")                    # model.safetensors + config.json
    TextToImagePipeline.from_pretrained("runs/my_pipeline")

:func:`evaluate_pipeline` measures it (judge accuracy on seen and held-out compositions, the
Fréchet distance in the judge's feature space beside its real-vs-real floor, diversity, PSNR/SSIM
and codebook usage); :func:`train_pipeline` trains every stage in order, resumably, which is what
``textimg train`` runs.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from textimg.config import PresetConfig, check_preset
from textimg.generator import Generator, GeneratorConfig
from textimg.text import TextEncoder, TextEncoding
from textimg.utils import (CONFIG_NAME, WEIGHTS_NAME, count_parameters, load_pretrained_state, read_json,
                           save_json, save_pretrained_module)
from textimg.vqvae import Refiner, RefinerConfig, bicubic, refine

PIPELINE_FORMAT = "textimg.pipeline/1"


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
        refiner: a trained :class:`~textimg.vqvae.Refiner` (32x32 -> 64x64); None upsamples bicubically.
        encoder: a :class:`~textimg.text.TextEncoder` whose ``dim`` is the generator's ``text_dim``;
            None loads ``text_encoder`` (the one the generator was trained with).
        text_encoder: the encoder's name, recorded by :meth:`save_pretrained` (default "minilm").

    The pipeline runs where its generator is (:meth:`to`); all three parts are frozen in eval mode.
    """

    def __init__(self, generator: Generator, refiner: Refiner | None = None, encoder: TextEncoder | None = None,
                 text_encoder: str = "minilm"):
        if not isinstance(generator, Generator):
            raise TypeError(f"generator must be a textimg Generator, got {type(generator).__name__}")
        if refiner is not None and not isinstance(refiner, Refiner):
            raise TypeError(f"refiner must be a textimg Refiner or None, got {type(refiner).__name__}")
        self.encoder = encoder if encoder is not None else TextEncoder(text_encoder)
        self.text_encoder = getattr(self.encoder, "name", text_encoder)
        if self.encoder.dim != generator.cfg.text_dim:
            raise ValueError(f"the text encoder {self.text_encoder!r} gives {self.encoder.dim}-d vectors but the "
                             f"generator was built for text_dim={generator.cfg.text_dim}")
        if refiner is not None and refiner.cfg.text_cond and refiner.cfg.text_dim != self.encoder.dim:
            raise ValueError(f"the refiner expects text_dim={refiner.cfg.text_dim}, the encoder gives {self.encoder.dim}")
        self.generator = generator.eval().requires_grad_(False)
        self.refiner = refiner.eval().requires_grad_(False) if refiner is not None else None
        self.to(next(generator.parameters()).device)

    # -- where it runs ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    def to(self, device: str | torch.device) -> "TextToImagePipeline":
        """Moves the generator, the refiner and the encoder to ``device``. Returns self."""
        self.generator.to(device)
        if self.refiner is not None:
            self.refiner.to(device)
        self.encoder.to(device)
        return self

    # -- generating ------------------------------------------------------------------------------

    def noise(self, n: int, seed: int = 0) -> Tensor:
        """The noise z (n, z_dim) that :meth:`generate` uses for ``seed``: drawn on the CPU from its own
        torch.Generator, so a seed gives the same z on every device and never touches the global RNG."""
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}: {seed!r}")
        return torch.randn(n, self.generator.cfg.z_dim, generator=torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def generate_from(self, z: Tensor, text: TextEncoding, batch_size: int = 256, refine_output: bool = True) -> Tensor:
        """Images for given noise z (B, z_dim) and a TextEncoding (B captions): float (B, 3, S, S) in
        [0, 1] on the CPU, S = 64 (or 32 with ``refine_output=False``). The refiner reads the same
        text. Used by :meth:`generate` and :meth:`interpolate`."""
        out = []
        for s in range(0, z.shape[0], batch_size):
            t = text[s:s + batch_size].to(self.device)
            x = self.generator(z[s:s + batch_size].to(self.device), t)  # (b, 3, 32, 32) in [-1, 1]
            if refine_output:
                if self.refiner is None:
                    x = bicubic(x, 64)
                else:
                    x = refine(self.refiner, x, t if self.refiner.cfg.text_cond else None, batch_size)
            out.append(((x.float() + 1) / 2).clamp(0, 1).cpu())
        return torch.cat(out)

    def generate(self, prompts: list[str] | str, seed: int = 0, num_per_prompt: int = 1, batch_size: int = 256,
                 refine_output: bool = True) -> Tensor:
        """Generates images for prompts.

        Args:
            prompts: B non-empty strings (one string is a batch of one).
            seed: the noise seed: the same prompts and seed give the same images;
                the global RNG is not touched.
            num_per_prompt: images per prompt (each with its own z), grouped by prompt.
            batch_size: images per forward pass (memory only: results agree up to float rounding).
            refine_output: False returns the generator's 32x32 images, before the refiner.

        Returns:
            float (B * num_per_prompt, 3, 64, 64) in [0, 1], on the CPU.

        Raises:
            TypeError / ValueError from the encoder, naming the bad prompt (empty, not a string, ...).
        """
        prompts = _check_prompts(prompts)
        if not isinstance(num_per_prompt, int) or num_per_prompt < 1:
            raise ValueError(f"num_per_prompt must be a positive int, got {num_per_prompt!r}")
        text = self.encoder.encode(prompts)  # raises on a bad prompt, naming its position
        if num_per_prompt > 1:
            text = text[torch.arange(len(prompts)).repeat_interleave(num_per_prompt)]
        z = self.noise(len(prompts) * num_per_prompt, seed)
        return self.generate_from(z, text, batch_size=batch_size, refine_output=refine_output)

    def __call__(self, prompts: list[str] | str, seed: int = 0, **kwargs) -> list:
        """Like :meth:`generate`, returning a list of PIL images (RGB, 64x64)."""
        from PIL import Image

        images = self.generate(prompts, seed=seed, **kwargs)
        arrays = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
        return [Image.fromarray(a) for a in arrays]  # uint8 (H, W, 3): RGB

    def interpolate(self, prompt_a: str, prompt_b: str, steps: int = 8, seed: int = 0) -> Tensor:
        """Walks the text embedding from ``prompt_a`` to ``prompt_b`` in ``steps`` even steps with one
        fixed z: returns (steps, 3, 64, 64) in [0, 1]. Token sequences are zero-padded to the same
        length and mixed like the pooled vector; the mask is the union of both."""
        if not isinstance(steps, int) or steps < 2:
            raise ValueError(f"steps must be an int >= 2, got {steps!r}")
        enc = self.encoder.encode([prompt_a, prompt_b])  # padded to the longer one: (2, T, D)
        w = torch.linspace(0, 1, steps).view(-1, 1)  # (steps, 1)
        tokens = (1 - w[..., None]) * enc.tokens[0] + w[..., None] * enc.tokens[1]  # (steps, T, D)
        mask = (enc.mask[0] | enc.mask[1]).expand(steps, -1)  # (steps, T)
        pooled = (1 - w) * enc.pooled[0] + w * enc.pooled[1]  # (steps, D)
        z = self.noise(1, seed).expand(steps, -1)
        return self.generate_from(z, TextEncoding(tokens, mask.clone(), pooled))

    # -- saving and loading ----------------------------------------------------------------------

    def config(self) -> dict:
        return {"format": PIPELINE_FORMAT, "text_encoder": self.text_encoder,
                "generator": self.generator.cfg.to_dict(),
                "refiner": self.refiner.cfg.to_dict() if self.refiner is not None else None}

    def save_pretrained(self, directory: str | Path, facts: dict | None = None) -> Path:
        """Writes ``directory/model.safetensors`` (the generator's and the refiner's weights, keys
        prefixed ``generator.`` / ``refiner.``) and ``directory/config.json`` (both configs, the text
        encoder's name, the weights' SHA-256, and ``facts``), each atomically. Returns the directory."""
        return save_pretrained_module(self._parts(self.generator, self.refiner), {**self.config(), **(facts or {})},
                                      directory, record_hash=True)

    @staticmethod
    def _parts(generator: Generator, refiner: Refiner | None) -> nn.ModuleDict:
        """The networks under one module, so their state dict keys read ``generator.…`` / ``refiner.…``."""
        return nn.ModuleDict({"generator": generator, **({"refiner": refiner} if refiner is not None else {})})

    @classmethod
    def from_pretrained(cls, directory: str | Path | None = None, encoder: TextEncoder | None = None,
                        device: str | torch.device | None = None) -> "TextToImagePipeline":
        """Loads a pipeline saved by :meth:`save_pretrained`, or (``directory=None``) the committed
        checkpoints ``checkpoints/generator_gan`` + ``checkpoints/refiner_gan``, checked against
        ``checkpoints/MANIFEST.json``.

        Safe (safetensors: no pickled code runs). ``encoder`` shares an already loaded TextEncoder.

        Raises:
            FileNotFoundError: the directory or one of its files is missing (named).
            ChecksumError: model.safetensors does not match the SHA-256 in config.json (named).
            ValueError: a file cannot be read, or is not a textimg pipeline (named).
        """
        if directory is None:
            from textimg.gan import GENERATOR_DIR, REFINER_GAN_DIR, load_generator
            from textimg.vqvae import load_refiner

            generator, refiner = load_generator(GENERATOR_DIR), load_refiner(REFINER_GAN_DIR)
            name = read_json(GENERATOR_DIR / CONFIG_NAME).get("text_encoder", "minilm")
            pipe = cls(generator, refiner, encoder, name)
            return pipe.to(device) if device is not None else pipe
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"no pipeline directory at {directory} (expected {WEIGHTS_NAME} and {CONFIG_NAME})")
        state, config = load_pretrained_state(directory)  # checks the weights against config.json's SHA-256
        config_path, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not isinstance(config, dict) or config.get("format") != PIPELINE_FORMAT:
            raise ValueError(f"{config_path} is not a textimg pipeline config (format {PIPELINE_FORMAT!r} expected)")
        try:
            generator = Generator(GeneratorConfig.from_dict(config["generator"]))
            refiner = Refiner(RefinerConfig.from_dict(config["refiner"])) if config.get("refiner") is not None else None
            cls._parts(generator, refiner).load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"{weights} and {config_path} do not describe the same pipeline "
                             f"({type(err).__name__}: {str(err)[:300]})") from err
        pipe = cls(generator, refiner, encoder, config.get("text_encoder", "minilm"))
        return pipe.to(device) if device is not None else pipe

    def __repr__(self) -> str:
        refiner = f"Refiner({count_parameters(self.refiner):,} parameters)" if self.refiner is not None else "bicubic"
        return (f"TextToImagePipeline(text_encoder={self.text_encoder!r}, "
                f"generator=Generator({count_parameters(self.generator):,} parameters), refiner={refiner}, "
                f"device={self.device})")


# -----------------------------------------------------------------------------------------------
# Measuring the whole pipeline


def evaluate_pipeline(pipe: TextToImagePipeline, judge: torch.nn.Module | None = None, num_samples: int = 2000,
                      seed: int = 0, diversity_captions: int = 16, diversity_samples: int = 16,
                      progress: bool = False, inception: bool = False) -> dict:
    """Every number the course reports for a pipeline, on the shapes dataset's test split.

    - ``seen`` / ``heldout``: judge accuracy (per attribute and all four) of the 64x64 images for
      the captions of ``num_samples`` items of the test split (compositions seen in training) and
      of the ``heldout`` split (colour-shape pairs never seen);
    - ``mistakes``: the three most frequent shape misreadings on the seen set, as [asked (with its
      size), read, count] (:func:`textimg.metrics.confusions`);
    - ``fid``: the Fréchet distance in the judge's feature space between the images for the test
      captions and the real images of those same items, and ``fid_floor``: the same distance
      between two disjoint sets of ``num_samples`` real test images (what a perfect generator scores);
    - ``diversity``: mean pairwise judge-feature distance over ``diversity_samples`` draws of z for
      each of ``diversity_captions`` captions, and ``diversity_real``: the same for real images;
    - ``sharpness`` of generated and real images;
    - ``refiner``: PSNR / SSIM of the refiner and of bicubic upsampling on real 32x32 test images,
      and its codebook usage and perplexity (:func:`textimg.vqvae.evaluate_refiner`).

    With ``inception=True`` also ``fid_inception`` and its floor ``fid_inception_floor``: standard
    Inception-v3 FID (:func:`textimg.metrics.inception_fid`, needs torch-fidelity and a network once).

    ``seed`` picks the dataset items and the noise (the global RNG is untouched). ``judge`` defaults
    to the committed one. Returns a dict of floats (fractions for accuracies); :func:`metrics_table`
    prints it. Raises ValueError if num_samples < 2, diversity_captions < 1 or diversity_samples < 2.
    """
    from textimg.data import ShapesDataset, sample_images
    from textimg.metrics import caption_accuracy, confusions, diversity, judge_fid, load_judge, sharpness
    from textimg.vqvae import evaluate_refiner

    for name, value, low in (("num_samples", num_samples, 2), ("diversity_captions", diversity_captions, 1),
                             ("diversity_samples", diversity_samples, 2)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low} (a Fréchet distance and a diversity need at least "
                             f"two images), got {value!r}")
    judge = judge if judge is not None else load_judge()
    steps = ["seen", "heldout", "fid", "diversity", "refiner"]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(steps), desc="evaluating", unit="part")
    results: dict = {"images": num_samples, "seed": seed}

    def done():
        if bar is not None:
            bar.update(1)

    test = ShapesDataset(2 * num_samples, split="test", seed=seed, cache=False)
    captions = test.captions()[:num_samples]
    fake = pipe.generate(captions, seed=seed) * 2 - 1  # (N, 3, 64, 64) in [-1, 1]
    results["seen"] = caption_accuracy(judge, fake, captions)
    results["mistakes"] = [list(m) for m in confusions(judge, fake, captions, "shape", given="size")[:3]]
    done()
    held = ShapesDataset(num_samples, split="heldout", seed=seed, cache=False).captions()
    results["heldout"] = caption_accuracy(judge, pipe.generate(held, seed=seed + 1) * 2 - 1, held)
    done()
    real = torch.stack([test[i]["image"] for i in range(2 * num_samples)])  # (2N, 3, 64, 64)
    results["fid"] = judge_fid(judge, fake, real[:num_samples])
    results["fid_floor"] = judge_fid(judge, real[num_samples:], real[:num_samples])
    if inception:
        from textimg.metrics import inception_fid

        results["fid_inception"] = inception_fid(fake, real[:num_samples])
        results["fid_inception_floor"] = inception_fid(real[num_samples:], real[:num_samples])
    done()
    div_caps = captions[:diversity_captions]
    results["diversity"] = sum(diversity(judge, pipe.generate([c] * diversity_samples, seed=seed + 2 + k) * 2 - 1)
                               for k, c in enumerate(div_caps)) / len(div_caps)
    results["diversity_real"] = sum(diversity(judge, sample_images(test.spec(k).labels, diversity_samples, seed=seed + k))
                                    for k in range(len(div_caps))) / len(div_caps)  # spec: labels without a render
    results["sharpness"], results["sharpness_real"] = sharpness(fake), sharpness(real[:num_samples])
    done()
    if pipe.refiner is not None:
        r = evaluate_refiner(pipe.refiner, num_samples, "test", seed=seed + 1,
                             encoder=pipe.encoder if pipe.refiner.cfg.text_cond else None)
        results["refiner"] = {k: v for k, v in r.items() if k not in ("images", "split")}
    done()
    if bar is not None:
        bar.close()
    return results


def metrics_table(results: dict) -> str:
    """The results of :func:`evaluate_pipeline` as a plain-text table (Markdown-compatible)."""
    from textimg.data import ATTRIBUTES

    attrs = [*ATTRIBUTES, "all"]
    rows = ["| judge accuracy | " + " | ".join(attrs) + " |", "|---|" + "---|" * len(attrs)]
    for name in ("seen", "heldout"):
        rows.append(f"| {name} compositions | " + " | ".join(f"{100 * results[name][a]:.1f} %" for a in attrs) + " |")
    if results.get("mistakes"):
        rows.append("\nMost common shape mistakes (seen): " + ", ".join(
            f"{asked} read as {read} ({n})" for asked, read, n in results["mistakes"]) + ".")
    rows += ["", "| measure | pipeline | reference |", "|---|---|---|",
             f"| judge-FID (vs real test images) | {results['fid']:.2f} | {results['fid_floor']:.2f} (real vs real floor) |",
             *([f"| Inception FID (standard) | {results['fid_inception']:.2f} | "
                f"{results['fid_inception_floor']:.2f} (real vs real floor) |"] if "fid_inception" in results else []),
             f"| diversity (judge features) | {results['diversity']:.2f} | {results['diversity_real']:.2f} (real images) |",
             f"| sharpness (Laplacian variance) | {results['sharpness']:.4f} | {results['sharpness_real']:.4f} (real images) |"]
    if "refiner" in results:
        r = results["refiner"]
        rows += [f"| refiner PSNR on real 32x32 inputs | {r['psnr_refiner']:.2f} dB | {r['psnr_bicubic']:.2f} dB (bicubic) |",
                 f"| refiner SSIM | {r['ssim_refiner']:.4f} | {r['ssim_bicubic']:.4f} (bicubic) |",
                 f"| codebook usage / perplexity | {100 * r['usage']:.1f} % / {r['perplexity']:.1f} | |"]
    rows.append(f"\n{results['images']} images per set, seed {results['seed']}.")
    return "\n".join(rows)


# -----------------------------------------------------------------------------------------------
# Training every stage in order (textimg train)


@dataclass
class PipelineTrainConfig(PresetConfig):
    """How much :func:`train_pipeline` trains each stage. The model sizes come from the preset's
    GeneratorConfig, RefinerConfig and discriminator configs."""

    num_train: int = 20_000  # training images (and their captions)
    refiner_steps: int = 2000  # stage 3: the refiner's reconstruction training
    refiner_batch_size: int = 32
    gan_steps: int = 24_000  # stage 4: the generator against the matching-aware discriminator
    refiner_gan_steps: int = 300  # stage 4: the refiner's adversarial fine-tuning
    checkpoint_every: int = 200  # refiner and GAN steps between resumable checkpoints
    seed: int = 0

    SIZES = {"quick": dict(num_train=256, refiner_steps=10, refiner_batch_size=8, gan_steps=10, refiner_gan_steps=3,
                           checkpoint_every=5),
             "cpu": dict(),
             "gpu": dict(num_train=40_000, refiner_steps=4000, gan_steps=20_000, refiner_gan_steps=600,
                         checkpoint_every=500)}


TRAIN_STAGES = ("text", "refiner", "gan", "refiner_gan", "pipeline")
TRAIN_DIR = "pipeline_training"  # textimg train's default folder inside config.models_dir(preset)


def train_pipeline(out_dir: str | Path, preset: str = "cpu", cfg: PipelineTrainConfig | None = None,
                   device: str | torch.device | None = None, progress: bool = True, log=print) -> Path:
    """Trains the pipeline's stages in course order into ``out_dir`` and saves the pipeline there.

    Stages (each writes its result before the next starts):

    1. ``text``: encodes the training captions once with the frozen encoder -> ``text_cache.safetensors``;
    2. ``refiner``: the VQ-VAE refiner, reconstruction loss (notebook 03), checkpointed to
       ``refiner_training/vqvae_training.pt`` -> ``refiner/``;
    3. ``gan``: the generator against a matching-aware discriminator with an attribute head
       (notebook 04), checkpointed to ``gan/gan_training.pt`` -> ``generator/``;
    4. ``refiner_gan``: the refiner fine-tuned with a PatchGAN (notebook 04) -> ``refiner_gan/``;
    5. ``pipeline``: generator + fine-tuned refiner -> ``pipeline/`` (:meth:`TextToImagePipeline.save_pretrained`).

    Resumable: run it again with the same ``out_dir`` after an interruption and finished stages are
    skipped, and the refiner and GAN stages continue exactly from their last checkpoint (every
    ``cfg.checkpoint_every`` steps); the short adversarial fine-tuning of the refiner starts again.
    The preset and config are recorded in ``out_dir/train_config.json``, and a second run must match them.

    Returns:
        the pipeline's directory, ``out_dir/pipeline``.
    """
    from textimg.data import NUM_CLASSES, ShapesDataset
    from textimg.gan import (Discriminator, DiscriminatorConfig, GANTrainConfig, PatchDiscriminator,
                             PatchDiscriminatorConfig, finetune_refiner, load_generator, save_generator, train_gan)
    from textimg.vqvae import load_refiner, save_refiner, train_refiner

    preset = check_preset(preset)
    cfg = cfg or PipelineTrainConfig.preset(preset)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {"format": "textimg.train/1", "preset": preset, "config": cfg.to_dict()}
    record_path = out / "train_config.json"
    if record_path.is_file():
        old = read_json(record_path)
        old = old if isinstance(old, dict) else {}
        if {k: old.get(k) for k in record} != record:
            raise ValueError(f"{out} holds a run with preset {old.get('preset')!r} and config {old.get('config')}; "
                             f"resume it with the same settings, or train into another output directory")
    else:
        save_json(record, record_path)

    def done(stage: str) -> bool:
        return (out / stage / CONFIG_NAME).is_file()

    started = time.perf_counter()
    encoder = TextEncoder("minilm", device=device)
    data64 = ShapesDataset(cfg.num_train, split="train", seed=cfg.seed)
    data32 = ShapesDataset(cfg.num_train, split="train", seed=cfg.seed, image_size=32)
    cache = out / "text_cache.safetensors"
    log(f"[1/5] text: encoding {cfg.num_train:,} training captions with {encoder.name}")
    if cache.is_file():
        encoder.load_cache(cache)
    else:
        encoder.encode_dataset(data64.captions(), progress=progress)
        encoder.save_cache(cache)
    facts = {"preset": preset, "torch": torch.__version__, "date": datetime.date.today().isoformat()}

    log(f"[2/5] refiner: {cfg.refiner_steps} reconstruction steps" + (" (done, skipped)" if done("refiner") else ""))
    if not done("refiner"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            refiner = Refiner(RefinerConfig.preset(preset, text_cond=True, text_dim=encoder.dim))
        history = train_refiner(refiner, data64, cfg.refiner_steps, cfg.refiner_batch_size, device=device,
                                seed=cfg.seed, progress=progress, encoder=encoder,
                                checkpoint_dir=out / "refiner_training", checkpoint_every=cfg.checkpoint_every)
        save_refiner(refiner.cpu(), out / "refiner", {"text_encoder": encoder.name, "training": {
            **facts, "steps": cfg.refiner_steps, "seconds": round(history["seconds"], 1)}}, manifest=None)

    log(f"[3/5] gan: {cfg.gan_steps} adversarial steps" + (" (done, skipped)" if done("generator") else ""))
    if not done("generator"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            generator = Generator(GeneratorConfig.preset(preset, text_dim=encoder.dim))
            discriminator = Discriminator(DiscriminatorConfig.preset(preset, text_dim=encoder.dim,
                                                                     num_classes=NUM_CLASSES))
        gan_cfg = GANTrainConfig.preset(preset, seed=cfg.seed)
        history = train_gan(generator, discriminator, encoder, data32, gan_cfg, steps=cfg.gan_steps,
                            checkpoint_dir=out / "gan", checkpoint_every=cfg.checkpoint_every, resume=True,
                            progress=progress, log_every=max(1, min(100, cfg.gan_steps // 10)), device=device)
        save_generator(generator.cpu(), out / "generator", {"text_encoder": encoder.name, "training": {
            **facts, "steps": cfg.gan_steps, "seconds": round(history["seconds"], 1)}}, manifest=None)

    log(f"[4/5] refiner_gan: {cfg.refiner_gan_steps} adversarial fine-tuning steps"
        + (" (done, skipped)" if done("refiner_gan") else ""))
    if not done("refiner_gan"):
        refiner = load_refiner(out / "refiner", manifest=None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            patch_d = PatchDiscriminator(PatchDiscriminatorConfig.preset(preset))
        history = finetune_refiner(refiner, patch_d, data64, encoder, steps=cfg.refiner_gan_steps, seed=cfg.seed,
                                   device=device, progress=progress, log_every=max(1, cfg.refiner_gan_steps // 10))
        save_refiner(refiner.cpu(), out / "refiner_gan", {"text_encoder": encoder.name, "training": {
            **facts, "steps": cfg.refiner_gan_steps, "seconds": round(history["seconds"], 1)}}, manifest=None)

    log("[5/5] pipeline: generator + fine-tuned refiner")
    pipe = TextToImagePipeline(load_generator(out / "generator", manifest=None),
                               load_refiner(out / "refiner_gan", manifest=None), encoder.to("cpu"))
    path = pipe.save_pretrained(out / "pipeline", {"training": {**facts, "config": cfg.to_dict(),
                                                                "seconds_this_run": round(time.perf_counter() - started, 1)}})
    log(f"saved the pipeline to {path}")
    return path
