"""The agents by name: the one list the tests, the benchmark and the docs iterate over.

A name is the agent's config, ``configs/model/<name>.yaml``, and what ``trqam-lit-exp`` grids call it; the class is
what a config's ``model.class_path`` names (``trqam_lit.agents.<Class>``: ``agents/__init__.py`` exports every class
listed here). Adding an agent: its module, one line here.
"""

from __future__ import annotations

from trqam_lit.agents.base import FlowAgent
from trqam_lit.agents.bc import BC
from trqam_lit.agents.cgql import CGQL
from trqam_lit.agents.dsrl import DSRL
from trqam_lit.agents.fql import FQL
from trqam_lit.agents.ifql import IFQL
from trqam_lit.agents.qam import QAM
from trqam_lit.agents.qam_e import QAME
from trqam_lit.agents.qam_f import QAMF
from trqam_lit.agents.qam_kl import QAMKL
from trqam_lit.agents.trqam import TRQAM

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
    "qam-kl": QAMKL,
}
