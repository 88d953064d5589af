"""Measuring generated images (notebooks 02 and 05): does the image show what the caption says?

The *judge* is a small CNN attribute classifier, one head per attribute of the shapes dataset
(shape, color, size, position), trained once on real rendered images and committed in
``checkpoints/judge/``. Scoring a generator means: generate an image for each caption, let the
judge read its attributes, and compare with the attributes parsed from the caption
(:func:`caption_accuracy`). This is the shapes-world analogue of scoring with a pretrained
classifier, as the Inception Score (Salimans et al. 2016) and FID (Heusel et al. 2017) do with
Inception-v3; the judge's penultimate features (:meth:`Judge.features`) serve the same role for
the Fréchet distance and the diversity score that later stages add.

The judge works at 64x64; 32x32 images are resized up with bilinear interpolation inside
:meth:`Judge.forward`. It is trained on a mix of native 64x64 images and 64->32->64 round-tripped
ones, so it is fair to both sizes.

Reading order: JudgeConfig, Judge, caption_accuracy and confusions, train_judge and make_judge (what
``textimg train-judge`` runs), PSNR / SSIM and codebook statistics, diversity, judge-FID, sharpness.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from textimg.config import JUDGE_DIR, PresetConfig
from textimg.data import ATTRIBUTES, ShapesDataset, parse_caption, render_shape
from textimg.training import BatchOrder, make_accelerator, run_facts, unwrap
from textimg.utils import ModelMixin, evaluating, manifest_for, progress_bar, seeded
from textimg.viz import to_unit

# -----------------------------------------------------------------------------------------------
# The judge


@dataclass
class JudgeConfig(PresetConfig):
    channels: tuple = (32, 64, 128, 128)  # widths of the stride-2 convs: 64 -> 32, 16, 8, 4 pixels
    feature_dim: int = 128  # size of the penultimate features (for FID / diversity)
    image_size: int = 64  # working size: other sizes are resized to it (bilinear)
    # training (train_judge)
    num_train: int = 30_000  # distinct rendered training images (all (color, shape) pairs)
    num_val: int = 2_000  # validation images
    steps: int = 2_000  # optimiser steps
    batch_size: int = 64  # images per step
    lr: float = 3e-3  # peak learning rate of the one-cycle schedule (AdamW)
    weight_decay: float = 1e-4  # AdamW weight decay
    roundtrip_prob: float = 0.5  # fraction of training images made 32x32 and back (fair to 32x32 inputs)
    noise_std: float = 0.02  # Gaussian pixel noise added in training (robustness to generated images)
    eval_every: int = 500  # validate every this many steps
    seed: int = 0  # seeds the weights, the images' order and the augmentation

    # the committed judge is the "cpu" one; the same instrument serves every preset
    SIZES = {"quick": dict(num_train=512, num_val=128, steps=20, batch_size=32, eval_every=10)}

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)  # a JSON list becomes a tuple again


def resize(images: Tensor, size: int) -> Tensor:
    """Bilinear resize of (B, 3, H, W) to (B, 3, size, size); a no-op at the right size."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


class Judge(ModelMixin, nn.Module):
    """A small CNN that reads the four attributes off an image. ``Judge.from_pretrained(JUDGE_DIR)``
    loads the committed one (:func:`load_judge`).

    ``forward(x)`` takes images (B, 3, H, W) in [-1, 1] (64x64 or 32x32; any size is resized to
    ``cfg.image_size``) and returns a dict attribute -> logits (B, number of values).
    """

    config_class = JudgeConfig

    def __init__(self, cfg: JudgeConfig):
        super().__init__()
        self.cfg = cfg
        c = (3, *cfg.channels)
        layers = []
        for i in range(len(cfg.channels)):  # each stage halves the side with a stride-2 conv
            layers += [nn.Conv2d(c[i], c[i + 1], kernel_size=3, stride=2, padding=1),
                       nn.BatchNorm2d(c[i + 1]), nn.ReLU()]
        self.conv = nn.Sequential(*layers)
        side = cfg.image_size // 2 ** len(cfg.channels)  # 4 for 64x64 and four stages
        # flatten, not global pooling: *where* the object is (position) must survive
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(c[-1] * side * side, cfg.feature_dim), nn.ReLU())
        self.heads = nn.ModuleDict({a: nn.Linear(cfg.feature_dim, len(v)) for a, v in ATTRIBUTES.items()})

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features (B, feature_dim) of images (B, 3, H, W) in [-1, 1]."""
        return self.fc(self.conv(resize(x, self.cfg.image_size)))  # (B, feature_dim)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.features(x)  # (B, feature_dim)
        return {a: head(h) for a, head in self.heads.items()}  # attribute -> (B, n_values)

    @torch.no_grad()
    def predict(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """The predicted labels (N, 4), columns in ATTRIBUTES order, computed in eval mode."""
        return _predict(self, images, batch_size)


def _predict(judge: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """Argmax labels (N, 4) of any module returning attribute -> logits, run in eval mode, batched."""
    device = next(judge.parameters(), torch.empty(0)).device
    preds = []
    with evaluating(judge), torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            logits = judge(images[start:start + batch_size].to(device))
            preds.append(torch.stack([logits[a].argmax(-1) for a in ATTRIBUTES], dim=1).cpu())  # (b, 4)
    return torch.cat(preds)  # (N, 4)


# -----------------------------------------------------------------------------------------------
# Caption accuracy


def labels_of(targets: Sequence[str] | Sequence[dict] | Tensor) -> Tensor:
    """Captions (parsed with parse_caption), label dicts, or a LongTensor (N, 4) -> LongTensor (N, 4)."""
    if isinstance(targets, Tensor):
        if targets.ndim != 2 or targets.shape[1] != len(ATTRIBUTES):
            raise ValueError(f"labels must have shape (N, {len(ATTRIBUTES)}), got {tuple(targets.shape)}")
        return targets.long().cpu()
    rows = [parse_caption(t) if isinstance(t, str) else t for t in targets]
    return torch.tensor([[row[a] for a in ATTRIBUTES] for row in rows], dtype=torch.long)


def _readings(judge: nn.Module, images: Tensor, targets, batch_size: int) -> tuple[Tensor, Tensor]:
    """What the judge reads from N images and what their targets ask for: two LongTensors (N, 4)."""
    labels = labels_of(targets)  # (N, 4)
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} captions/labels")
    return _predict(judge, images, batch_size), labels


def caption_accuracy(judge: nn.Module, images: Tensor, targets: Sequence[str] | Sequence[dict] | Tensor,
                     batch_size: int = 256) -> dict[str, float]:
    """How often the judge reads, from each image, the attributes its caption asked for.

    Args:
        judge: a Judge (or any module mapping images to attribute -> logits); run in eval mode.
        images: (N, 3, H, W) in [-1, 1].
        targets: N captions in the shapes grammar, N label dicts, or a LongTensor (N, 4).
        batch_size: images per judge call.

    Returns:
        {"shape", "color", "size", "position": fraction right, "all": fraction with all four right}.
    """
    read, labels = _readings(judge, images, targets, batch_size)  # (N, 4) each
    right = read == labels  # (N, 4) bool
    scores = {a: right[:, i].float().mean().item() for i, a in enumerate(ATTRIBUTES)}
    scores["all"] = right.all(dim=1).float().mean().item()
    return scores


def confusions(judge: nn.Module, images: Tensor, targets: Sequence[str] | Sequence[dict] | Tensor,
               attribute: str = "shape", given: str | None = None,
               batch_size: int = 256) -> list[tuple[str, str, int]]:
    """The judge's misreadings of one attribute, most frequent first: where the errors are.

    Args:
        judge, images, targets, batch_size: as in :func:`caption_accuracy`.
        attribute: the attribute whose errors are counted (a key of ``ATTRIBUTES``).
        given: another attribute whose asked value is put before the asked one, so errors can be
            told apart by it (``given="size"`` gives ``("small star", "cross", 97)``); None: no prefix.

    Returns:
        [(asked, read, count), ...] for the images whose ``attribute`` the judge read wrong, sorted
        by count (ties by name); an empty list if there is no error.
    """
    for name in (attribute, given):
        if name is not None and name not in ATTRIBUTES:
            raise ValueError(f"unknown attribute {name!r}; the attributes are {list(ATTRIBUTES)}")
    read, labels = _readings(judge, images, targets, batch_size)  # (N, 4) each
    names = list(ATTRIBUTES)
    col = names.index(attribute)
    read = read[:, col]  # (N,)
    counts: dict[tuple[str, str], int] = {}
    for i in torch.nonzero(read != labels[:, col]).flatten().tolist():
        asked = ATTRIBUTES[attribute][int(labels[i, col])]
        if given is not None:
            asked = f"{ATTRIBUTES[given][int(labels[i, names.index(given)])]} {asked}"
        key = (asked, ATTRIBUTES[attribute][int(read[i])])
        counts[key] = counts.get(key, 0) + 1
    return [(asked, got, n) for (asked, got), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


# -----------------------------------------------------------------------------------------------
# Training


def real_images(num_samples: int, split: str = "train", seed: int = 0, holdout: bool = True,
                progress: bool = False) -> tuple[Tensor, Tensor]:
    """Renders shapes as uint8 (N, 3, 64, 64) with labels (N, 4): compact enough for 40k images."""
    ds = ShapesDataset(num_samples, split=split, seed=seed, holdout=holdout, cache=False)
    indices = range(num_samples)
    if progress:
        indices = progress_bar(indices, desc=f"rendering {split}", unit="img", mininterval=1.0)
    images = torch.stack([torch.from_numpy(render_shape(ds.spec(i))) for i in indices])  # (N, 3, 64, 64)
    return images, ds.labels_tensor()


def _to_float(images_u8: Tensor) -> Tensor:
    return images_u8.float() / 127.5 - 1.0  # uint8 -> [-1, 1]


def roundtrip_32(x: Tensor) -> Tensor:
    """64x64 -> 32x32 (area, as the dataset downsamples) -> back to 64x64 (bilinear, as the judge resizes)."""
    return resize(F.avg_pool2d(x, 2), x.shape[-1])


def train_judge(cfg: JudgeConfig | None = None, device: str | torch.device | None = None,
                progress: bool = True) -> tuple[Judge, dict]:
    """Trains a judge on rendered training images; validates on the val split.

    The training images use ``holdout=False``: every (color, shape) pair, the held-out ones too.
    The judge is an instrument, not the model under test: it must recognise held-out compositions
    when it scores a generator on them later.

    Args:
        cfg: a JudgeConfig (default: the committed judge's). Its seed seeds the weights, batch order
            and augmentation (the global RNG is not touched).
        device: where to train (default CPU).
        progress: progress bars.

    Returns:
        (judge in eval mode, history {"step", "loss", "val_all_64", "val_all_32", "seconds"}).
    """
    cfg = cfg or JudgeConfig()
    with seeded(cfg.seed):
        judge = Judge(cfg)
    accelerator = make_accelerator(device or "cpu", amp=False)
    x_train, y_train = real_images(cfg.num_train, "train", cfg.seed, holdout=False, progress=progress)
    x_val, y_val = real_images(cfg.num_val, "val", cfg.seed, holdout=False)
    x_val = _to_float(x_val)  # (N_val, 3, 64, 64)

    rng = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(judge.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    net, opt = accelerator.prepare(judge, opt)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps)
    batches = BatchOrder(cfg.num_train, cfg.batch_size, rng=rng)
    history = {"step": [], "loss": [], "val_all_64": [], "val_all_32": []}
    start = time.perf_counter()
    net.train()
    bar = progress_bar(range(cfg.steps), desc="training the judge", unit="step", disable=not progress)
    for step in bar:
        idx = batches.next()
        x = _to_float(x_train[idx])  # (B, 3, 64, 64)
        small = torch.rand(x.shape[0], generator=rng) < cfg.roundtrip_prob  # (B,) which to round-trip
        x = torch.where(small[:, None, None, None], roundtrip_32(x), x)
        x = x + cfg.noise_std * torch.randn(x.shape, generator=rng)
        logits = net(x.to(accelerator.device))
        y = y_train[idx].to(accelerator.device)  # (B, 4)
        loss = sum(F.cross_entropy(logits[a], y[:, i]) for i, a in enumerate(ATTRIBUTES))
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        opt.step()
        schedule.step()
        if step % cfg.eval_every == 0 or step == cfg.steps - 1:
            history["step"].append(step)
            history["loss"].append(loss.item())
            history["val_all_64"].append(caption_accuracy(judge, x_val, y_val)["all"])
            history["val_all_32"].append(caption_accuracy(judge, roundtrip_32(x_val), y_val)["all"])
            bar.set_postfix(loss=f"{loss.item():.3f}", val64=f"{history['val_all_64'][-1]:.3f}")
    unwrap(accelerator, net)
    history["seconds"] = time.perf_counter() - start
    return judge.eval(), history


def evaluate_judge(judge: nn.Module, num_samples: int = 2000, split: str = "test", image_size: int = 64,
                   seed: int = 0) -> dict[str, float]:
    """The judge's caption accuracy on ``num_samples`` real images of a split ("test", "heldout", ...)."""
    ds = ShapesDataset(num_samples, split=split, seed=seed, image_size=image_size, cache=False)
    images = torch.stack([ds[i]["image"] for i in range(num_samples)])  # (N, 3, size, size)
    return caption_accuracy(judge, images, ds.labels_tensor())


def load_judge(directory: str | Path = JUDGE_DIR) -> Judge:
    """The committed judge (or one ``textimg train-judge`` saved), checked against its SHA-256 sums,
    on the CPU in eval mode, with ``requires_grad`` off: it is an instrument, never trained further."""
    return Judge.from_pretrained(directory).requires_grad_(False)


def make_judge(directory: str | Path = JUDGE_DIR, cfg: JudgeConfig | None = None, command: str = "textimg train-judge",
               device: str | torch.device | None = None, progress: bool = True) -> Judge:
    """Trains a judge, measures it on 2,000 real images per split and size, and saves it to ``directory``
    with those facts (and the manifest's sums, for the committed folder). What ``textimg train-judge`` runs."""
    cfg = cfg or JudgeConfig()
    judge, history = train_judge(cfg, device=device, progress=progress)
    judge.cpu()
    accuracy = {f"{split}_{size}": evaluate_judge(judge, 2000, split, size) for split in ("test", "heldout")
                for size in (64, 32)}
    facts = run_facts(device, command=command, steps=cfg.steps, seconds=history["seconds"], history=history,
                      parameters=judge.num_parameters(),
                      test={"note": "caption_accuracy on 2000 real images per split (seed 0), 64x64 and 32x32",
                            **accuracy})
    judge.save_pretrained(directory, {"training": facts}, manifest=manifest_for(directory))
    return judge


# -----------------------------------------------------------------------------------------------
# Image quality (PSNR, SSIM) and codebook statistics (notebooks 03 and 05)


def psnr(x: Tensor, y: Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images x against references y, both (B, 3, H, W) in [-1, 1].

    Computed on [0, 1] images (data_range=1) with torchmetrics, per image, then averaged over the
    batch (so batches of different sizes average correctly, weighted by size). Identical images
    give inf.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(to_unit(x), to_unit(y), data_range=1.0, dim=(1, 2, 3)).item()


def ssim(x: Tensor, y: Tensor) -> float:
    """Structural similarity (Wang et al. 2004) of images x against references y, both (B, 3, H, W) in
    [-1, 1]: torchmetrics' SSIM (11x11 Gaussian window, sigma 1.5) on [0, 1] images, data_range=1,
    averaged over pixels and images. 1 for identical images."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(to_unit(x), to_unit(y), data_range=1.0).item()


def codebook_usage(indices: Tensor, num_codes: int) -> float:
    """Fraction of the ``num_codes`` codes that occur at least once in ``indices`` (any shape)."""
    return (torch.bincount(indices.flatten().cpu(), minlength=num_codes) > 0).float().mean().item()


def codebook_perplexity(indices: Tensor, num_codes: int) -> float:
    """exp(entropy) of the code histogram of ``indices`` (any shape): 1 if a single code is used,
    ``num_codes`` if all are used equally often; the "effective number of codes"."""
    p = torch.bincount(indices.flatten().cpu(), minlength=num_codes).double()
    p = p / p.sum()
    return torch.exp(torch.special.entr(p).sum()).item()


# -----------------------------------------------------------------------------------------------
# Diversity, Fréchet distance and sharpness of generated images (notebooks 04 and 05)


@torch.no_grad()
def judge_features(judge: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """The judge's penultimate features (:meth:`Judge.features`) of images (N, 3, H, W) in [-1, 1].

    Computed in eval mode (BatchNorm uses its running statistics, so an image's features do not
    depend on its batch), in batches on the judge's device. Returns float (N, feature_dim) on the CPU.
    """
    device = next(judge.parameters()).device
    with evaluating(judge):
        out = [judge.features(images[s:s + batch_size].to(device)).float().cpu()
               for s in range(0, images.shape[0], batch_size)]
    return torch.cat(out)  # (N, feature_dim)


def diversity(judge: nn.Module, images: Tensor) -> float:
    """Mean pairwise L2 distance between the judge features of images generated for ONE prompt with
    different noise, (N, 3, H, W) in [-1, 1], N >= 2. A generator that ignores its noise (mode
    collapse) scores ~0; compare with the same score on real images of that caption
    (``data.sample_images``), which vary only by the dataset's jitter."""
    if images.shape[0] < 2:
        raise ValueError(f"diversity needs at least 2 images, got {images.shape[0]}")
    feats = judge_features(judge, images).double()  # (N, F)
    dist = torch.cdist(feats, feats)  # (N, N), zero diagonal
    n = feats.shape[0]
    return (dist.sum() / (n * (n - 1))).item()  # mean over the ordered pairs i != j


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """The Fréchet distance between Gaussians fitted to two feature sets a (N, F) and b (M, F):
    ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), S the unbiased covariances, in float64.
    (S_a S_b)^(1/2) is computed as S_a^1/2 (S_a^1/2 S_b S_a^1/2)^1/2 S_a^-1/2, whose trace is that of the
    symmetric middle root; :func:`judge_fid` gets the same number from torchmetrics."""
    def sqrt_psd(m: Tensor) -> Tensor:
        vals, vecs = torch.linalg.eigh(m)
        return vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T

    a, b = a.double(), b.double()
    sa, sb = torch.atleast_2d(torch.cov(a.T)), torch.atleast_2d(torch.cov(b.T))  # (F, F), also for F = 1
    root = sqrt_psd(sa)
    return ((a.mean(0) - b.mean(0)).square().sum() + (sa + sb - 2 * sqrt_psd(root @ sb @ root)).trace()).item()


class _JudgeFeatureExtractor(nn.Module):
    """Adapts a judge to torchmetrics' FID: images (N, 3, H, W) in [-1, 1] -> features (N, feature_dim)."""

    def __init__(self, judge: nn.Module):
        super().__init__()
        self.judge = judge
        self.num_features = int(judge.cfg.feature_dim)

    def forward(self, x: Tensor) -> Tensor:
        return judge_features(self.judge, x)


def judge_fid(judge: nn.Module, images: Tensor, reference: Tensor, batch_size: int = 256) -> float:
    """The Fréchet distance between two image sets in the judge's feature space ("judge-FID").

    FID (Heusel et al. 2017) fits a Gaussian to each set's features and measures
    ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)). Standard FID uses Inception-v3 features
    of natural photographs; here the judge's penultimate features (:func:`judge_features`) take
    their place, computed by torchmetrics' ``FrechetInceptionDistance`` with the judge as a custom
    feature extractor (float64 statistics). Numbers are comparable only with the same judge and set
    sizes; always read them next to the real-vs-real floor (:func:`judge_fid_floor`), since two
    finite samples of the *same* distribution are not at distance 0.

    Args:
        images, reference: (N, 3, H, W) and (M, 3, H', W') in [-1, 1], N, M >= 2 (use N, M well
            above the judge's feature_dim, 128, for a stable estimate).

    Returns:
        the distance, a float >= 0 (tiny negative rounding is clipped to 0).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    for name, x in (("images", images), ("reference", reference)):
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{name} must be a float tensor (N, 3, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if x.shape[0] < 2:
            raise ValueError(f"{name} needs at least 2 images for a covariance, got {x.shape[0]}")
    fid = FrechetInceptionDistance(feature=_JudgeFeatureExtractor(judge), normalize=True)
    for s in range(0, reference.shape[0], batch_size):
        fid.update(reference[s:s + batch_size].float(), real=True)
    for s in range(0, images.shape[0], batch_size):
        fid.update(images[s:s + batch_size].float(), real=False)
    return max(fid.compute().item(), 0.0)


def inception_fid(images: Tensor, reference: Tensor, batch_size: int = 64) -> float:
    """Standard FID: Inception-v3 pool features (torch-fidelity's weights, as in Heusel et al. 2017).

    Optional, never required by the course: it needs ``pip install torch-fidelity`` and, the first
    time, a network to download the Inception weights (fine on Colab). On 64x64 shapes its features
    mean little (Inception was trained on photographs): prefer :func:`judge_fid`; this is here to
    compare with papers. images, reference: (N, 3, H, W) in [-1, 1], N, M >= 2.

    Raises:
        RuntimeError: torch-fidelity or the weights are not available, saying how to get them.
    """
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        fid = FrechetInceptionDistance(feature=2048, normalize=True)  # float images in [0, 1]
    except (ImportError, OSError, RuntimeError) as err:
        raise RuntimeError("standard (Inception) FID needs the torch-fidelity package and, once, a network to "
                           "download its Inception-v3 weights: pip install torch-fidelity. Offline, use "
                           f"judge_fid. [{type(err).__name__}: {(str(err).splitlines() or [''])[0]}]") from err
    for x, real in ((reference, True), (images, False)):
        for s in range(0, x.shape[0], batch_size):
            fid.update(((x[s:s + batch_size].float() + 1) / 2).clamp(0, 1).cpu(), real=real)
    return max(fid.compute().item(), 0.0)


def judge_fid_floor(judge: nn.Module, num_samples: int = 2000, split: str = "test", seed: int = 0,
                    image_size: int = 64) -> float:
    """The real-vs-real floor of :func:`judge_fid`: the distance between two disjoint sets of
    ``num_samples`` real images of one split (items 0..N-1 and N..2N-1). A generator cannot be
    expected to score below it with sets of that size."""
    ds = ShapesDataset(2 * num_samples, split=split, seed=seed, image_size=image_size, cache=False)
    x = torch.stack([ds[i]["image"] for i in range(2 * num_samples)])
    return judge_fid(judge, x[num_samples:], x[:num_samples])


def sharpness(images: Tensor) -> float:
    """Mean variance of the Laplacian (a blur detector, Pech-Pacheco et al. 2000), of images
    (N, 3, H, W) in [-1, 1].

    Each image is mapped to [0, 1] and to grey (the channel mean), filtered with the 3x3 Laplacian
    [[0, 1, 0], [1, -4, 1], [0, 1, 0]] (no padding), and the variance of the response is taken;
    the result is the mean over images. Blur lowers it, crisp edges raise it; noise raises it
    too, so read it next to a fidelity measure.
    """
    grey = to_unit(images).mean(dim=1, keepdim=True).double()  # (N, 1, H, W) in [0, 1]
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=grey.dtype)
    response = F.conv2d(grey, kernel.view(1, 1, 3, 3).to(grey.device))  # (N, 1, H-2, W-2)
    return response.flatten(1).var(dim=1).mean().item()

