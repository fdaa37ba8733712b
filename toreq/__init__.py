"""toreq: Equilibrium Propagation for PyTorch.

A network's prediction is the fixed point of its own dynamics; toreq relaxes it (free phase),
nudges its output toward the target and relaxes again (nudged phase), and turns the
difference between the two equilibria into local, contrastive weight updates. The relaxation
and the Hebbian update are C++/CUDA operators (`torch.ops.toreq.*`) with pure-PyTorch
references in [`toreq.ops`][toreq.ops].
"""

__version__ = "0.1.0"

import torch  # noqa: F401  (loads libtorch, which toreq._C links against)

try:
    from toreq import _C  # noqa: F401  (registers torch.ops.toreq.*)
except ImportError as error:  # pragma: no cover - only without a built extension
    raise ImportError(
        "toreq's compiled extension (toreq._C) could not be loaded. Build it against the torch "
        "you have installed: `pip install scikit-build-core ninja && pip install "
        "--no-build-isolation .` (a torch upgrade needs the same rebuild). Original error: "
        f"{error}"
    ) from error

from toreq import ops  # noqa: E402
from toreq import control  # noqa: E402,F401  (registers the behaviour-cloning data sets)

__all__ = ["__version__", "ops"]
