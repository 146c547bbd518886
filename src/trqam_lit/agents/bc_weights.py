"""Where fine-tuning starts from v_bc: ``init_from`` (a checkpoint's v_bc loaded into the agent, checked first so a
wrong file gets a message naming it) and the end of a BC warm-up (``bc_warmup_steps``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from trqam_lit.training.checkpoint import check_checkpoint_file


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


class FromBC:
    """Mixin of :class:`~trqam_lit.agents.base.FlowAgent` (a LightningModule): the BC warm-up and ``init_from``, both
    ending in the agent's ``copy_bc_into_policy``."""

    @property
    def in_bc_warmup(self) -> bool:
        return self.global_step < self.hparams.bc_warmup_steps

    def load_bc_weights(self, path: str) -> None:
        """Copy a checkpoint's v_bc into v_bc, then ``copy_bc_into_policy`` (the start of fine-tuning)."""
        load_bc_weights(self.v_bc, path)
        self.copy_bc_into_policy()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if not self._policy_checked and not self.in_bc_warmup:  # one host read per run, not per step
            if not bool(self.policy_from_bc):
                self.copy_bc_into_policy()  # the BC warm-up just ended: fine-tuning starts from v_bc
                for optimizer in self.trainer.optimizers:
                    optimizer.state.clear()  # a fresh Adam, as when fine-tuning starts from a BC checkpoint
            self._policy_checked = True
