"""The course's graded exercises, one module per notebook (the mechanism is in :mod:`textimg.checks`).

Each exercise is a ``respond`` function (runs the learner's answer on fixed inputs, in the
learner's process, with the package's reference out of reach) and a ``score`` function (computes
the reference itself and compares; the grader runs it in its own process). Inputs come from fixed
``torch.Generator`` seeds, so both halves see the same numbers. Ids and points appear in the
notebooks' exercise cells; ``tests/test_grading.py`` keeps the two in step.
"""

from .adversarial_training import *  # noqa: F401,F403
from .generation import *  # noqa: F401,F403
from .introduction import *  # noqa: F401,F403
from .pipeline import *  # noqa: F401,F403
from .text_encoding import *  # noqa: F401,F403
from .vqvae_refinement import *  # noqa: F401,F403
