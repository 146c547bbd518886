"""``init_from``: a checkpoint's v_bc loaded into an agent, checked first so a wrong file gets a message naming it."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..checkpoint import check_checkpoint_file


def load_bc_weights(v_bc: nn.Module, path: str) -> None:
    """Copy the checkpoint ``path``'s v_bc into ``v_bc``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a checkpoint, no v_bc weights in it, or a v_bc of other shapes.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"init_from checkpoint not found: {path}")
    check_checkpoint_file(path)  # a truncated or foreign file: a message naming it, not a pickle traceback
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict):
        raise ValueError(f"init_from {path} is not a checkpoint (it holds a {type(state).__name__})")
    state = state.get("state_dict", state)
    bc = {k[len("v_bc.") :]: v for k, v in state.items() if k.startswith("v_bc.")}
    if not bc:
        raise ValueError(f"{path} holds no v_bc weights (keys start with {sorted(state)[:3]})")
    try:
        v_bc.load_state_dict(bc)
    except RuntimeError as err:
        raise ValueError(f"init_from {path}: its v_bc does not match this model's shapes: {err}") from None
