"""The agents by name: the one list the tests, the benchmark and the docs iterate over.

A name is the agent's folder under ``configs/`` and what ``trqam-lit-exp`` grids call it; the class is what a config's
``model.class_path`` names (``trqam_lit.agents.<class>``). Adding an agent: its module, one line here.
"""

from __future__ import annotations

from .base import FlowAgent
from .bc import BC
from .cgql import CGQL
from .dsrl import DSRL
from .fql import FQL
from .ifql import IFQL
from .qam import QAM
from .qam_e import QAME
from .qam_f import QAMF
from .trqam import TRQAM

AGENTS: dict[str, type[FlowAgent]] = {
    "bc": BC,
    "trqam": TRQAM,
    "qam": QAM,
    "qam-f": QAMF,
    "qam-e": QAME,
    "fql": FQL,
    "ifql": IFQL,
    "dsrl": DSRL,
    "cgql": CGQL,
}
