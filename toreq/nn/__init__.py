"""toreq's equilibrium models (``nn.Module`` s) and their backprop baseline."""

from toreq.nn.block import ConvergenceWarning, EquilibriumBlock
from toreq.nn.equilibrium import EquilibriumModel, Network
from toreq.nn.lm import CharLM, CharTransformerLM, LoopedMLPLM, build_lm, count_parameters
from toreq.nn.models import EPMLP, FeedforwardMLP, LoopedMLP, ToroidalMLP
from toreq.nn.stepped import ConvEP, ModernEqProp
from toreq.nn.transformer import (EqPropAttention, EqPropFeedForward, SelfAttention,
                                  TransformerBlock)
from toreq.nn.vision import PatchTransformer

__all__ = [
    "CharLM", "CharTransformerLM", "ConvEP", "ConvergenceWarning", "EPMLP", "EqPropAttention",
    "EqPropFeedForward", "EquilibriumBlock", "EquilibriumModel", "FeedforwardMLP", "LoopedMLP",
    "LoopedMLPLM", "ModernEqProp", "Network", "PatchTransformer", "SelfAttention",
    "ToroidalMLP", "TransformerBlock", "build_lm", "count_parameters",
]


def __getattr__(name: str):
    # Deprecated names, kept for one release.
    if name == "SteppedEquilibriumModel":
        import warnings

        warnings.warn("toreq.nn.SteppedEquilibriumModel is deprecated: every model is an "
                      "EquilibriumModel with a dynamics (toreq.dynamics) and a solver "
                      "(toreq.solvers); derive from EquilibriumModel and a dynamics kind",
                      DeprecationWarning, stacklevel=2)
        return EquilibriumModel
    raise AttributeError(f"module 'toreq.nn' has no attribute {name!r}")
