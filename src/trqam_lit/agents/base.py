"""FlowAgent, the base of every agent: its networks (built through hooks), one optimizer and the template training
step; an agent writes ``fine_tune_loss`` (pure loss functions in sequence) and overrides the hooks where it differs:
``build_policy``, ``build_critic``, ``target_pairs``, ``next_actions``, ``policy_net`` / ``policy_actions``,
``copy_bc_into_policy``. The rest is in the mixins it combines, one job per module (docs/architecture.md).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from trqam_lit.agents.bc_weights import FromBC
from trqam_lit.agents.checks import check_hparams, check_trainer
from trqam_lit.agents.draws import RandomStreams
from trqam_lit.agents.evaluating import EVAL_METRICS, Evaluating
from trqam_lit.agents.shared_losses import SharedLosses
from trqam_lit.agents.step_logging import StepLogging
from trqam_lit.agents.update_guard import UpdateGuard
from trqam_lit.math import gemm
from trqam_lit.math.nets import CriticEnsemble, VelocityField, gemm_shapes, set_gemm_backend

__all__ = ["EVAL_METRICS", "FlowAgent"]


class FlowAgent(UpdateGuard, RandomStreams, FromBC, SharedLosses, StepLogging, Evaluating, pl.LightningModule):
    """Base LightningModule: a BC velocity field ``v_bc``, the agent's own policy networks (``build_policy``) and,
    for RL agents, the critic ensemble and its polyak target.

    Shapes (``obs_dim``, ``action_dim`` = H x per-step action dim, ``horizon``, ``discount``) are linked from the
    DataModule by the CLI; never set them by hand.
    """

    uses_critic: bool = True
    scalars = ("actor/bc_loss", "train/grad_norm", "train/nonfinite_steps")
    acting_draws_noise: bool = False  # policy_actions draws more noise itself (QAM-E's edit)

    def __init__(
        self,
        obs_dim: int = 0,
        action_dim: int = 0,
        horizon: int = 1,
        discount: float = 0.99,
        actor_hidden_dims: Sequence[int] = (512, 512, 512, 512),
        actor_layer_norm: bool = False,
        critic_hidden_dims: Sequence[int] = (512, 512, 512, 512),
        critic_layer_norm: bool = True,
        num_critics: int = 10,
        flow_steps: int = 10,
        rho_q: float = 0.5,
        lr: float = 3e-4,
        tau: float = 0.005,
        grad_clip_norm: float | None = 1.0,
        analytic_critic: bool = False,
        init_from: str | None = None,
        bc_warmup_steps: int = 0,
        max_nonfinite_steps: int = 3,
        gemm_backend: str = "auto",
    ) -> None:
        """
        Args:
            obs_dim: observation dimension (linked from the DataModule).
            action_dim: flattened action-chunk dimension H * act_dim (linked from the DataModule).
            horizon: action-chunk length H (linked from the DataModule).
            discount: discount gamma; the TD target bootstraps with gamma^H (linked from the DataModule).
            actor_hidden_dims: hidden widths of the velocity fields.
            actor_layer_norm: LayerNorm after each actor activation (the reference enables it at width 1024).
            critic_hidden_dims: hidden widths of each critic.
            critic_layer_norm: LayerNorm after each critic activation.
            num_critics: ensemble size E.
            flow_steps: K, Euler steps of the flow ODE and the SDE.
            rho_q: pessimism of the TD target, mean - rho_q * std over the target ensemble.
            lr: Adam learning rate (one optimizer over all trained networks).
            tau: polyak rate of the targets (``target_pairs``: the critic's, and v_base for the AM agents).
            grad_clip_norm: one global gradient-norm clip over all trained parameters; None: no clip.
            analytic_critic: use the DataModule's analytic reward as a fixed critic (toy domains only).
            init_from: checkpoint whose v_bc initialises v_bc and what starts from it (``copy_bc_into_policy``: v_base
                and v_ft of the AM agents), e.g. a BC run's; applied when a fit starts from scratch, ignored when
                resuming with --ckpt_path (the checkpoint has every weight).
            bc_warmup_steps: train v_bc alone for this many steps, then ``copy_bc_into_policy`` (v_base, v_ft).
            max_nonfinite_steps: a step whose loss, path-KL estimate or gradient norm is NaN or inf is skipped
                (weights, targets, lambda unchanged; counted in ``train/nonfinite_steps``); this many in a row stop
                the run with an error naming the quantity.
            gemm_backend: the float32 GEMM kernel of every network on CPU: "mkl" (ATen's default), "onednn", or
                "auto": the faster at the networks' real shapes, timed once at the first training batch
                (``configure_gemm``; docs/performance.md, "fp32 GEMM backend"). The environment variable
                ``TRQAM_GEMM=mkl|onednn`` overrides it. Same numbers to float32 rounding; never applied to CUDA
                tensors, under autocast or inside ``torch.compile``.
        """
        super().__init__()
        self.save_hyperparameters()
        check_hparams(obs_dim, action_dim, flow_steps, max_nonfinite_steps, grad_clip_norm, gemm_backend)
        self.v_bc = VelocityField(obs_dim, action_dim, actor_hidden_dims, actor_layer_norm)
        self.build_policy()  # between v_bc and the critics: the order sets the initial weights of a seed
        if self.uses_critic:
            self.critic = self.build_critic()
            self.target_critic = self._frozen_copy(self.critic)
        self.analytic_q = None
        # Whether v_ft/v_base were set from v_bc; a buffer so a checkpoint taken exactly at the end of the BC
        # warm-up (before the copy) resumes correctly.
        self._policy_checked = False
        self.register_buffer("policy_from_bc", torch.tensor(not (self.uses_critic and bc_warmup_steps > 0)))
        self.init_evaluation()
        self.init_random_streams()
        self.init_update_guard()
        self.gemm_choice: dict[str, dict] | None = None  # set once, by configure_gemm

    @staticmethod
    def _frozen_copy(net: nn.Module) -> nn.Module:
        target = copy.deepcopy(net)
        target.requires_grad_(False)
        return target

    # ---- hooks of the algorithms ----------------------------------------------------------------------------
    def build_policy(self) -> None:
        """Build the agent's networks besides v_bc and the critics (v_ft and v_base; a one-step policy; ...).

        Called in ``__init__`` after v_bc and before the critics, with ``self.hparams`` set. Targets are
        ``_frozen_copy``s; every other parameter with ``requires_grad`` is trained by the one optimizer. BC: none.
        """

    def build_critic(self) -> nn.Module:
        """The critic ensemble Q_j(s, a) (its polyak target is a copy); CGQL's is time-conditioned, Q_j(s, a, t)."""
        hp = self.hparams
        return CriticEnsemble(hp.obs_dim, hp.action_dim, hp.num_critics, hp.critic_hidden_dims, hp.critic_layer_norm)

    def target_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(target, online) pairs that the polyak step mixes, with the pre-step online weights."""
        return [(self.target_critic, self.critic)] if self.uses_critic else []

    def next_actions(self, s_next: Tensor, noise: Tensor) -> Tensor:
        """The TD target's next action chunk a' at s' from the given noise (called under ``no_grad``)."""
        raise NotImplementedError(f"{type(self).__name__} does not define the TD target's next action")

    @torch.no_grad()
    def copy_bc_into_policy(self) -> None:
        """The start of fine-tuning (a BC warm-up ended, or ``init_from``): nets that start from v_bc are set here;
        subclasses copy, then call this."""
        self.policy_from_bc.fill_(True)

    # ---- set-up -------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        check_trainer(self.trainer, self.device, stage)
        if stage == "fit":
            if int(self.rng_seed) < 0:  # a fresh fit; a resumed one gets the checkpoint's seed when it is restored
                self.rng_seed.fill_(int(os.environ.get("PL_GLOBAL_SEED", 0)))
        if stage == "fit" and self.hparams.init_from and self.trainer.ckpt_path is None:
            self.load_bc_weights(self.hparams.init_from)
        if self.hparams.analytic_critic:
            dm = self.trainer.datamodule if self._trainer is not None else None
            if dm is None or not hasattr(dm, "analytic_q"):
                raise ValueError("analytic_critic=True needs a DataModule with an analytic reward (the toy bandit)")
            self.analytic_q = dm.analytic_q()

    def configure_gemm(self, batch_rows: int) -> dict[str, dict]:
        """Choose the float32 GEMM kernel of every network once (``gemm_backend``; ``TRQAM_GEMM`` wins) and set it on
        them. "auto" times MKL against oneDNN, forward and backward, at the networks' weight shapes with ``batch_rows``
        and ``flow_steps * batch_rows`` rows (the batch, and the AM loss's and the lean adjoint's K x B points) for
        the linear layers, ``batch_rows`` for the critic ensembles; on another device than the CPU nothing is timed
        (MKL, i.e. ATen's ops). Returns the choice (with the timings when calibrated), also kept as ``gemm_choice``."""
        setting = gemm.forced_backend() or self.hparams.gemm_backend
        if self.device.type != "cpu":
            setting = "mkl"
        if setting == "auto":
            linear, ensemble = gemm_shapes(self)
            rows = {batch_rows, self.flow_steps * batch_rows}
            choice = gemm.calibrate(
                [(r, i, o) for r in rows for i, o in linear], [(e, batch_rows, i, o) for e, i, o in ensemble]
            )
        else:
            choice = {kind: {"choice": setting} for kind in ("linear", "ensemble")}
        set_gemm_backend(self, choice["linear"]["choice"], choice["ensemble"]["choice"])
        self.gemm_choice = choice
        return choice

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.gemm_choice is None:  # once per process, at the real batch size
            self.configure_gemm(batch["observations"].shape[0])
        super().on_train_batch_start(batch, batch_idx)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        # The fused kernel: one pass over all parameters instead of ~10 small ops per tensor (4.7 -> 1 ms per step on
        # CPU at the CPU-small shapes); the same update up to float rounding. Not under fp16's GradScaler: Lightning
        # leaves the unscaling to a fused optimizer, so the finiteness check and the clip would see scaled gradients.
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer is not None else None
        fused = (self.device.type in ("cpu", "cuda") and scaler is None) or None
        return torch.optim.Adam(params, lr=self.hparams.lr, fused=fused)

    def q_fn(self, target: bool):
        """The critic used for values and adjoints: the analytic reward, or the (target) ensemble."""
        if self.analytic_q is not None:
            return self.analytic_q
        return self.target_critic if target else self.critic

    # ---- the training step --------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """The template step: v_bc's BC loss during a BC warm-up (the networks it leaves idle touched for DDP), else
        the agent's ``fine_tune_loss``; then its terms recorded (checked for NaN/inf before the optimizer step) and
        logged, once."""
        if self.in_bc_warmup:
            bc = self.bc_loss(batch)
            loss, info = (
                self.touch_unused(bc, *[m for m in self.children() if m is not self.v_bc]),
                {"actor/bc_loss": bc},
            )
        else:
            loss, info = self.fine_tune_loss(batch)
            if self.uses_critic and self.analytic_q is not None:
                loss = self.touch_unused(loss, self.critic)  # the analytic reward stands in for it
        self.record(**{name: value for name, value in info.items() if name == "kl" or name.endswith("_loss")})
        self.log_step({name: value.detach() for name, value in info.items() if "/" in name}, prog_bar=["actor/bc_loss"])
        return loss

    def fine_tune_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """(the loss one optimizer step minimises, its terms by name). Names with a ``/`` are logged (the class's
        ``scalars``); loss terms (``*_loss``) and ``kl`` (the path-KL estimate, for ``after_update``) are checked for
        NaN/inf before the optimizer step; a diagnostic (CGQL's ``critic/exp_bias`` may overflow) is only logged."""
        raise NotImplementedError(f"{type(self).__name__} does not define its fine-tuning loss")

    @property
    def flow_steps(self) -> int:
        return self.hparams.flow_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Checkpoints written before these buffers existed: the seed they ran with is unknown, take 0.
        state = checkpoint.get("state_dict", {})
        for name in ("rng_seed", "nonfinite_steps", "nonfinite_run"):
            state.setdefault(name, torch.zeros((), dtype=torch.int64))
