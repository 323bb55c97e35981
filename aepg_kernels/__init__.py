"""aepg-kernels: fused kernels for the policy-gradient (EPG / aEPG) loss family.

Reference: Zhang, Pfahringer, Frank, Bifet, "Policy Gradient with Adaptive Entropy Annealing for
Continual Fine-Tuning", arXiv 2602.14078 (2026).
"""

from . import utils  # the trainer and the harness reach it as aepg_kernels.utils
from .backends import BACKEND_NAMES, KERNEL_BACKENDS, available_backends, empty_cache
from .functional import (
    LossStats,
    aepg_loss,
    cross_entropy,
    dft_loss,
    epg_loss,
    linear_aepg_loss,
    linear_cross_entropy,
    linear_dft_loss,
    linear_epg_loss,
    linear_policy_loss,
    policy_loss,
)
from .modules import AEPGLoss, LinearPolicyLoss, PolicyLoss
from .schedules import AlphaSchedule, ConstantAlpha, CosineAnneal, FeedbackAlpha, LinearAnneal, SigmoidAnneal

__version__ = "0.1.0"

__all__ = [
    "BACKEND_NAMES",
    "KERNEL_BACKENDS",
    "AEPGLoss",
    "AlphaSchedule",
    "ConstantAlpha",
    "CosineAnneal",
    "FeedbackAlpha",
    "LinearAnneal",
    "LinearPolicyLoss",
    "LossStats",
    "PolicyLoss",
    "SigmoidAnneal",
    "aepg_loss",
    "available_backends",
    "cross_entropy",
    "dft_loss",
    "empty_cache",
    "epg_loss",
    "linear_aepg_loss",
    "linear_cross_entropy",
    "linear_dft_loss",
    "linear_epg_loss",
    "linear_policy_loss",
    "policy_loss",
    "utils",
]
