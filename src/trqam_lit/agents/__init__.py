"""One LightningModule per algorithm; thin wrappers over the pure loss functions."""

from trqam_lit.agents.adjoint_matching import AdjointMatchingAgent
from trqam_lit.agents.base import FlowAgent
from trqam_lit.agents.bc import BC
from trqam_lit.agents.cgql import CGQL
from trqam_lit.agents.dsrl import DSRL
from trqam_lit.agents.fql import FQL
from trqam_lit.agents.ifql import IFQL
from trqam_lit.agents.qam import QAM
from trqam_lit.agents.qam_e import QAME
from trqam_lit.agents.qam_f import QAMF
from trqam_lit.agents.registry import AGENTS
from trqam_lit.agents.trqam import TRQAM

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
