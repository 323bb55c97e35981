"""aepg-kernels: fused kernels for the policy-gradient (EPG / aEPG) loss family.

Reference: Zhang, Pfahringer, Frank, Bifet, "Policy Gradient with Adaptive Entropy Annealing for
Continual Fine-Tuning", arXiv 2602.14078 (2026).
"""
from . import _op  # noqa: F401  (registers the aepg:: custom ops)
from .backends import available_backends
from .functional import LossStats, aepg_loss, cross_entropy, epg_loss, policy_loss
from .modules import AEPGLoss, PolicyLoss
from .schedules import AlphaSchedule, ConstantAlpha, CosineAnneal, LinearAnneal, SigmoidAnneal

__version__ = "0.1.0"

__all__ = [
    "AEPGLoss", "AlphaSchedule", "ConstantAlpha", "CosineAnneal", "LinearAnneal", "LossStats", "PolicyLoss",
    "SigmoidAnneal", "aepg_loss", "available_backends", "cross_entropy", "epg_loss", "policy_loss",
]
