"""One LightningModule per algorithm; thin wrappers over the pure loss functions."""

from .adjoint_matching import AdjointMatchingAgent
from .base import FlowAgent
from .bc import BC
from .qam import QAM
from .trqam import TRQAM

__all__ = ["BC", "QAM", "TRQAM", "AdjointMatchingAgent", "FlowAgent"]
