"""toreq's equilibrium models (`nn.Module` s) and their backprop baseline.

The equilibrium models, EqProp as a layer ([`EquilibriumBlock`][toreq.nn.block.EquilibriumBlock])
and the feedforward backprop baseline, transformer blocks with EqProp sublayers (causal or
bidirectional attention), a character-level language model and a vision transformer over image
patches. Everything listed here is importable from `toreq.nn` except the fixed-point helpers of
[`toreq.nn.block`][toreq.nn.block], the cells and attention function of
[`toreq.nn.transformer`][toreq.nn.transformer] and the measures of [`toreq.nn.lm`][toreq.nn.lm]
(import those from their modules).
"""

from toreq.nn.block import ConvergenceWarning, EquilibriumBlock
from toreq.nn.equilibrium import EquilibriumModel, Network
from toreq.nn.hopfield import ModernHopfield
from toreq.nn.lm import CharLM, CharTransformerLM, LoopedMLPLM, build_lm, count_parameters
from toreq.nn.models import EPMLP, FeedforwardMLP, LoopedMLP, ToroidalMLP
from toreq.nn.stepped import ConvEP, FeedforwardCNN, ModernEqProp
from toreq.nn.transformer import (EqPropAttention, EqPropFeedForward, SelfAttention,
                                  TransformerBlock)
from toreq.nn.vision import PatchTransformer

__all__ = [
    "CharLM", "CharTransformerLM", "ConvEP", "ConvergenceWarning", "EPMLP", "EqPropAttention",
    "EqPropFeedForward", "EquilibriumBlock", "EquilibriumModel", "FeedforwardCNN", "FeedforwardMLP",
    "LoopedMLP",
    "LoopedMLPLM", "ModernEqProp", "ModernHopfield", "Network", "PatchTransformer",
    "SelfAttention", "ToroidalMLP", "TransformerBlock", "build_lm", "count_parameters",
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
