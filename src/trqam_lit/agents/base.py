"""Shared machinery of the flow-policy agents: networks, one optimizer, one global clip, targets, acting, eval.

An agent subclass only sequences pure loss functions in ``training_step`` (and, for TRQAM, steps the dual
variable); everything a Trainer feature touches (precision, DDP, checkpoints) is handled here once.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from ..critic import critic_loss, ensemble_pessimistic_value, td_target
from ..flow import bc_flow_loss, sample_actions
from ..nets import CriticEnsemble, VelocityField
from ..targets import polyak_update

EVAL_METRICS = ("success", "return", "length", "action_mean")


class FlowAgent(pl.LightningModule):
    """Base LightningModule: a BC velocity field ``v_bc`` and, for RL agents, ``v_ft``, ``v_base``, critics.

    Shapes (``obs_dim``, ``action_dim`` = H x per-step action dim, ``horizon``, ``discount``) are linked from the
    DataModule by the CLI; never set them by hand.
    """

    uses_critic: bool = True

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
        grad_clip_norm: float = 1.0,
        analytic_critic: bool = False,
        init_from: str | None = None,
        bc_warmup_steps: int = 0,
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
            tau: polyak rate of the critic and v_base targets.
            grad_clip_norm: one global gradient-norm clip over all trained parameters.
            analytic_critic: use the DataModule's analytic reward as a fixed critic (toy domains only).
            init_from: checkpoint whose v_bc initialises v_bc, v_base and v_ft (e.g. a BC run's); applied when a
                fit starts from scratch, ignored when resuming with --ckpt_path (the checkpoint has every weight).
            bc_warmup_steps: train v_bc alone for this many steps, then copy it into v_base and v_ft.
        """
        super().__init__()
        self.save_hyperparameters()
        if obs_dim <= 0 or action_dim <= 0:
            raise ValueError(
                f"obs_dim and action_dim must be positive (got {obs_dim}, {action_dim}); they are linked from the "
                "DataModule by `trqam-lit`, or pass them explicitly when building the model in Python"
            )
        if flow_steps < 2:
            raise ValueError(f"flow_steps must be at least 2, got {flow_steps}")
        self.v_bc = VelocityField(obs_dim, action_dim, actor_hidden_dims, actor_layer_norm)
        if self.uses_critic:
            self.v_ft = VelocityField(obs_dim, action_dim, actor_hidden_dims, actor_layer_norm)
            self.v_base = self._frozen_copy(self.v_bc)
            self.critic = CriticEnsemble(obs_dim, action_dim, num_critics, critic_hidden_dims, critic_layer_norm)
            self.target_critic = self._frozen_copy(self.critic)
        self.analytic_q = None
        self.grad_norm = torch.zeros(())
        # Whether v_ft/v_base were set from v_bc; a buffer so a checkpoint taken exactly at the end of the BC
        # warm-up (before the copy) resumes correctly.
        self._policy_checked = False
        self.register_buffer("policy_from_bc", torch.tensor(not (self.uses_critic and bc_warmup_steps > 0)))
        self.eval_metrics = nn.ModuleDict({name: MeanMetric() for name in EVAL_METRICS})
        self._last_kl: Tensor | None = None

    @staticmethod
    def _frozen_copy(net: nn.Module) -> nn.Module:
        target = copy.deepcopy(net)
        target.requires_grad_(False)
        return target

    # ---- set-up -------------------------------------------------------------------------------------------
    def load_bc_weights(self, path: str) -> None:
        """Copy a checkpoint's v_bc into v_bc, v_base and v_ft (the start of fine-tuning)."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"init_from checkpoint not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=False)
        state = state.get("state_dict", state)
        bc = {k[len("v_bc.") :]: v for k, v in state.items() if k.startswith("v_bc.")}
        if not bc:
            raise ValueError(f"{path} holds no v_bc weights (keys start with {sorted(state)[:3]})")
        try:
            self.v_bc.load_state_dict(bc)
        except RuntimeError as err:
            raise ValueError(f"{path}: its v_bc does not match this model's shapes: {err}") from None
        self.copy_bc_into_policy()

    @torch.no_grad()
    def copy_bc_into_policy(self) -> None:
        if self.uses_critic:
            self.v_base.load_state_dict(self.v_bc.state_dict())
            self.v_ft.load_state_dict(self.v_bc.state_dict())
        self.policy_from_bc.fill_(True)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.init_from and self.trainer.ckpt_path is None:
            self.load_bc_weights(self.hparams.init_from)
        if self.hparams.analytic_critic:
            dm = self.trainer.datamodule if self._trainer is not None else None
            if dm is None or not hasattr(dm, "analytic_q"):
                raise ValueError("analytic_critic=True needs a DataModule with an analytic reward (the toy bandit)")
            self.analytic_q = dm.analytic_q()

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.hparams.lr)

    # ---- training step helpers ----------------------------------------------------------------------------
    @property
    def in_bc_warmup(self) -> bool:
        return self.global_step < self.hparams.bc_warmup_steps

    def q_fn(self, target: bool):
        """The critic used for values and adjoints: the analytic reward, or the (target) ensemble."""
        if self.analytic_q is not None:
            return self.analytic_q
        return self.target_critic if target else self.critic

    def draw(self, name: str, *shape: int, uniform: bool = False) -> Tensor:
        """Every random draw of a training step goes through here (tests feed recorded draws by name).

        Names: ``bc/x0``, ``bc/t`` (uniform), ``critic/next_noise``, ``am/x0``, ``am/eps``.
        """
        fn = torch.rand if uniform else torch.randn
        return fn(*shape, device=self.device, dtype=torch.float32)

    def bc_loss(self, batch: dict[str, Tensor]) -> Tensor:
        s, a = batch["observations"], batch["actions"]
        x0 = self.draw("bc/x0", *a.shape)
        t = self.draw("bc/t", a.shape[0], 1, uniform=True)
        return bc_flow_loss(self.v_bc, s, a, x0, t, batch["valid"])

    def critic_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(L_Q, mean Q) with the next action from the current v_ft ODE; zero loss for an analytic critic."""
        s, a = batch["observations"], batch["actions"]
        if self.analytic_q is not None:
            with torch.no_grad():
                return torch.zeros((), device=a.device), self.analytic_q(s, a).float().mean()
        with torch.no_grad():
            s_next = batch["next_observations"]
            a_next = sample_actions(self.v_ft, s_next, self.draw("critic/next_noise", *a.shape), self.flow_steps)
            next_q = ensemble_pessimistic_value(self.target_critic(s_next, a_next), self.hparams.rho_q)
            y = td_target(batch["rewards"], batch["masks"], next_q, self.hparams.discount, self.hparams.horizon)
        q = self.critic(s, a)
        return critic_loss(q, y, batch["valid"]), q.detach().float().mean()

    def touch_unused(self, loss: Tensor, *modules: nn.Module) -> Tensor:
        """Adds 0 * params so DDP sees a gradient for networks a phase leaves idle (BC warm-up)."""
        zero = sum(p.sum() for m in modules for p in m.parameters() if p.requires_grad)
        return loss + 0.0 * zero

    @property
    def flow_steps(self) -> int:
        return self.hparams.flow_steps

    # ---- optimizer-step hooks -------------------------------------------------------------------------------
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # One global clip over every trained parameter; grads are already unscaled (AMP) and all-reduced (DDP).
        if gradient_clip_val is not None:
            raise ValueError(
                "trainer.gradient_clip_val is not used by trqam-lit agents: set model.init_args.grad_clip_norm "
                "(one global norm clip over all trained parameters, 1.0 by default)"
            )
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm=self.hparams.grad_clip_norm)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Runs right after the optimizer step and before any callback's on_train_batch_end, so a checkpoint
        # saved at this step already holds the matching lambda and KL average.
        if self._last_kl is not None:
            self.after_optimizer_step(self.trainer.strategy.reduce(self._last_kl, reduce_op="mean"))
            self._last_kl = None

    def after_optimizer_step(self, kl: Tensor) -> None:
        """Hook for per-step state updates from the rank-averaged path-KL estimate (TRQAM: the dual step)."""
        self.log("dual/kl", kl)

    def on_before_optimizer_step(self, optimizer) -> None:
        # Targets mix the PRE-step online weights (the reference's one-step lag), so update them here.
        if self.uses_critic and not self.in_bc_warmup:
            polyak_update(self.target_critic, self.critic, self.hparams.tau)
            polyak_update(self.v_base, self.v_bc, self.hparams.tau)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if not self._policy_checked and not self.in_bc_warmup:  # one host read per run, not per step
            if not bool(self.policy_from_bc):
                self.copy_bc_into_policy()  # the BC warm-up just ended: fine-tuning starts from v_bc
                for optimizer in self.trainer.optimizers:
                    optimizer.state.clear()  # a fresh Adam, as when fine-tuning starts from a BC checkpoint
            self._policy_checked = True

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log("train/grad_norm", self.grad_norm, on_step=True, prog_bar=False)

    # ---- acting and evaluation --------------------------------------------------------------------------------
    @property
    def policy_net(self) -> nn.Module:
        # Until v_ft has been set from v_bc (during the BC warm-up) the policy being built is v_bc.
        return self.v_ft if self.uses_critic and bool(self.policy_from_bc) else self.v_bc

    @torch.no_grad()
    def act(self, obs: Tensor, noise: Tensor | None = None) -> Tensor:
        """Deterministic Euler ODE from fresh noise with the acting field, clipped: (B, H * act_dim)."""
        obs = obs.to(self.device, torch.float32)
        if noise is None:
            noise = torch.randn(obs.shape[0], self.hparams.action_dim, device=self.device)
        return sample_actions(self.policy_net, obs, noise, self.flow_steps)

    def on_validation_epoch_start(self) -> None:
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "make_evaluator"):
            raise ValueError("evaluation needs a DataModule with make_evaluator() (OGBenchDataModule, ToyBandit...)")
        self._evaluator = dm.make_evaluator()

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)  # `trqam-lit test` runs the same evaluation

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        # Episodes are sharded over ranks; torchmetrics averages the per-episode values across ranks.
        values = self._evaluator.evaluate(self.act, rank=rank, world_size=world)
        for name, per_episode in values.items():
            metric = self.eval_metrics[name]
            metric.update(torch.as_tensor(per_episode, dtype=torch.float32, device=self.device))
            self.log(f"eval/{name}", metric, on_step=False, on_epoch=True, prog_bar=name in ("success", "return"))
