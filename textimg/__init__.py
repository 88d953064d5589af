"""textimg: a course that builds an Imagen-inspired text-to-image pipeline, one stage at a time.

Stages and modules (each module is named like its notebook):

    data.py      captioned-shapes dataset, other image-caption sources   (00_introduction)
    text.py      frozen pretrained Transformer text encoder              (01_text_encoding)

Shared helpers live in ``config.py`` (presets), ``utils.py`` (seeding, device, checkpoints),
``viz.py`` (image grids) and ``checks.py`` (self-checking exercises).
"""

__version__ = "0.1.0"

# The repository URL lives here and only here: notebooks build their "Open in Colab" badge and
# their Colab install line from it, so a fork changes one line.
REPO_URL = "https://github.com/textimg-course/textimg"
