"""One LightningModule per algorithm; thin wrappers over the pure loss functions."""

from .adjoint_matching import AdjointMatchingAgent
from .base import FlowAgent
from .bc import BC
from .fql import FQL
from .qam import QAM
from .trqam import TRQAM

__all__ = ["BC", "FQL", "QAM", "TRQAM", "AdjointMatchingAgent", "FlowAgent"]
