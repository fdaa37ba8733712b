"""toreq's equilibrium models (``nn.Module`` s) and their backprop baseline."""

from toreq.nn.block import ConvergenceWarning, EquilibriumBlock
from toreq.nn.equilibrium import EquilibriumModel, Network
from toreq.nn.models import EPMLP, FeedforwardMLP, LoopedMLP, ToroidalMLP
from toreq.nn.stepped import ConvEP, ModernEqProp, SteppedEquilibriumModel

__all__ = [
    "ConvEP", "ConvergenceWarning", "EPMLP", "EquilibriumBlock", "EquilibriumModel",
    "FeedforwardMLP", "LoopedMLP", "ModernEqProp", "Network",
    "SteppedEquilibriumModel", "ToroidalMLP",
]
