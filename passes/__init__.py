"""The catalogue: papers' math as plain PyTorch, registered as passes on import (see :mod:`passes.register`)."""
from . import register  # noqa: F401  (registers the passes)
