"""One LightningModule per algorithm; thin wrappers over the pure loss functions.

Every agent of the registry (``agents/registry.py``) is importable as ``trqam_lit.agents.<Class>``, the path a config's
``model.class_path`` names: adding an agent is its module and one registry line, nothing here.
"""

from trqam_lit.agents.adjoint_matching import AdjointMatchingAgent
from trqam_lit.agents.base import FlowAgent
from trqam_lit.agents.registry import AGENTS

globals().update({cls.__name__: cls for cls in AGENTS.values()})

__all__ = ["AGENTS", "AdjointMatchingAgent", "FlowAgent", *sorted(cls.__name__ for cls in AGENTS.values())]
