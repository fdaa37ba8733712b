"""toreq's equilibrium models (``nn.Module`` s) and their backprop baseline."""

from toreq.nn.block import ConvergenceWarning, EquilibriumBlock
from toreq.nn.equilibrium import EquilibriumModel, Network
from toreq.nn.lm import CharTransformerLM, count_parameters
from toreq.nn.models import EPMLP, FeedforwardMLP, LoopedMLP, ToroidalMLP
from toreq.nn.stepped import ConvEP, ModernEqProp, SteppedEquilibriumModel
from toreq.nn.transformer import (CausalSelfAttention, EqPropAttention, EqPropFeedForward,
                                  TransformerBlock)

__all__ = [
    "CausalSelfAttention", "CharTransformerLM", "ConvEP", "ConvergenceWarning", "EPMLP",
    "EqPropAttention", "EqPropFeedForward", "EquilibriumBlock", "EquilibriumModel",
    "FeedforwardMLP", "LoopedMLP", "ModernEqProp", "Network", "SteppedEquilibriumModel",
    "ToroidalMLP", "TransformerBlock", "count_parameters",
]
