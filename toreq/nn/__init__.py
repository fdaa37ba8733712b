"""toreq's equilibrium models (``nn.Module`` s) and their backprop baseline."""

from toreq.nn.block import ConvergenceWarning, EquilibriumBlock
from toreq.nn.equilibrium import EquilibriumModel, Network
from toreq.nn.lm import CharLM, CharTransformerLM, LoopedMLPLM, build_lm, count_parameters
from toreq.nn.models import EPMLP, FeedforwardMLP, LoopedMLP, ToroidalMLP
from toreq.nn.stepped import ConvEP, ModernEqProp, SteppedEquilibriumModel
from toreq.nn.transformer import (EqPropAttention, EqPropFeedForward, SelfAttention,
                                  TransformerBlock)
from toreq.nn.vision import PatchTransformer

__all__ = [
    "CharLM", "CharTransformerLM", "ConvEP", "ConvergenceWarning", "EPMLP", "EqPropAttention",
    "EqPropFeedForward", "EquilibriumBlock", "EquilibriumModel", "FeedforwardMLP", "LoopedMLP",
    "LoopedMLPLM", "ModernEqProp", "Network", "PatchTransformer", "SelfAttention",
    "SteppedEquilibriumModel", "ToroidalMLP", "TransformerBlock", "build_lm", "count_parameters",
]
