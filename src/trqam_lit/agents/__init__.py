"""One LightningModule per algorithm; thin wrappers over the pure loss functions."""

from .adjoint_matching import AdjointMatchingAgent
from .base import FlowAgent
from .bc import BC
from .cgql import CGQL
from .dsrl import DSRL
from .fql import FQL
from .ifql import IFQL
from .qam import QAM
from .qam_e import QAME
from .qam_f import QAMF
from .registry import AGENTS
from .trqam import TRQAM

__all__ = [
    "AGENTS",
    "BC",
    "CGQL",
    "DSRL",
    "FQL",
    "IFQL",
    "QAM",
    "QAME",
    "QAMF",
    "TRQAM",
    "AdjointMatchingAgent",
    "FlowAgent",
]
