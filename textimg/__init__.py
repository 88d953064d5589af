"""textimg: a course that builds an Imagen-inspired text-to-image pipeline, one stage at a time.

Stages and modules (each module is named like its notebook, and reads top to bottom):

    data.py          captioned-shapes dataset, other image-caption sources          (00_introduction)
    text.py          frozen pretrained Transformer text encoder                     (01_text_encoding)
    generator.py     noise + text -> 32x32, with attention; the regression baseline (02_generation)
    metrics.py       the judge, caption accuracy, judge-FID, diversity, ...         (02, 03, 04, 05)
    vqvae.py         the vector quantiser and the VQ-VAE                            (03_vqvae_refinement)
    refiner.py       the refiner 32x32 -> 64x64, and its adversarial fine-tuning    (03, 04)
    discriminator.py the matching-aware discriminator, PatchGAN, DiffAugment        (04_adversarial_training)
    gan.py           the GAN losses, d_step / g_step, train_gan                     (04_adversarial_training)
    pipeline.py      TextToImagePipeline, evaluate_pipeline, train_pipeline         (05_pipeline)
    diffusion.py     what Imagen really is: text-conditional diffusion, guidance,    (06, in progress)
                     thresholding, the 32 -> 64 super-resolution stage, DiffusionPipeline
    cli.py           the ``textimg`` command: train, generate, evaluate, train-judge, grade

Shared helpers live in ``config.py`` (presets, checkpoint paths), ``utils.py`` (seeding, device,
files, ModelMixin: the one save/load), ``training.py`` (what every training loop shares: Accelerate,
batches, resumable checkpoints, run facts), ``viz.py`` (image grids) and ``checks.py`` (exercises).
"""

__version__ = "0.2.0"

# The repository URL lives here and only here: notebooks build their "Open in Colab" badge and
# their Colab install line from it, so a fork changes one line.
REPO_URL = "https://github.com/textimg-course/textimg"
