"""toreq's equilibrium models (``nn.Module`` s) and their backprop baseline."""

from toreq.nn.equilibrium import EquilibriumModel, Network
from toreq.nn.models import EPMLP, FeedforwardMLP, LoopedMLP, ToroidalMLP

__all__ = ["EPMLP", "EquilibriumModel", "FeedforwardMLP", "LoopedMLP", "Network", "ToroidalMLP"]
