"""Shared machinery of the flow-policy agents: networks, one optimizer, one global clip, targets, acting, eval.

An agent subclass only sequences pure loss functions in ``training_step`` (and, for TRQAM, steps the dual
variable); everything a Trainer feature touches (precision, DDP, checkpoints) is handled here once. What differs
between algorithms is a few hooks: ``build_policy`` (the networks besides v_bc and the critics), ``build_critic``
(the critic ensemble), ``target_pairs`` (the polyak targets), ``next_actions`` (the TD target's a'), ``policy_net`` /
``policy_actions`` (acting) and ``copy_bc_into_policy`` (the end of a BC warm-up).
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric

from .. import hardware
from ..checkpoint import check_checkpoint_file
from ..critic import critic_loss, ensemble_pessimistic_value, td_target
from ..flow import bc_flow_loss, sample_actions
from ..nets import CriticEnsemble, VelocityField
from ..rng import EVAL_NOISE, TRAIN_NOISE, fold_seed, seeded
from ..targets import polyak_update

EVAL_METRICS = ("success", "return", "length", "action_mean")


class FlowAgent(pl.LightningModule):
    """Base LightningModule: a BC velocity field ``v_bc``, the agent's own policy networks (``build_policy``) and,
    for RL agents, the critic ensemble and its polyak target.

    Shapes (``obs_dim``, ``action_dim`` = H x per-step action dim, ``horizon``, ``discount``) are linked from the
    DataModule by the CLI; never set them by hand.
    """

    uses_critic: bool = True
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
        if max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1, got {max_nonfinite_steps}")
        if grad_clip_norm is not None and not grad_clip_norm > 0:
            raise ValueError(f"grad_clip_norm must be positive or None (no clip), got {grad_clip_norm}")
        self.v_bc = VelocityField(obs_dim, action_dim, actor_hidden_dims, actor_layer_norm)
        self.build_policy()  # between v_bc and the critics: the order sets the initial weights of a seed
        if self.uses_critic:
            self.critic = self.build_critic()
            self.target_critic = self._frozen_copy(self.critic)
        self.analytic_q = None
        self.grad_norm = torch.zeros(())
        # Whether v_ft/v_base were set from v_bc; a buffer so a checkpoint taken exactly at the end of the BC
        # warm-up (before the copy) resumes correctly.
        self._policy_checked = False
        self.register_buffer("policy_from_bc", torch.tensor(not (self.uses_critic and bc_warmup_steps > 0)))
        self.eval_metrics = nn.ModuleDict({name: MeanMetric() for name in EVAL_METRICS})
        # Seed of every random stream of the run (set from seed_everything at the start of a fit, then restored from
        # checkpoints): a step's draws are a pure function of (seed, rank, global step), see trqam_lit.rng.
        self.register_buffer("rng_seed", torch.tensor(-1, dtype=torch.int64))
        self.register_buffer("nonfinite_steps", torch.tensor(0, dtype=torch.int64))  # skipped steps in all
        self.register_buffer("nonfinite_run", torch.tensor(0, dtype=torch.int64))  # ... in a row, up to now
        self._gen: torch.Generator | None = None
        self._gen_step = -1
        self._step_values: dict[str, Tensor] = {}  # this rank's losses and KL of the current step
        self._update_kl: Tensor | None = None  # rank-averaged KL of an update that was applied

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
    def load_bc_weights(self, path: str) -> None:
        """Copy a checkpoint's v_bc into v_bc, then ``copy_bc_into_policy`` (the start of fine-tuning)."""
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
            self.v_bc.load_state_dict(bc)
        except RuntimeError as err:
            raise ValueError(f"init_from {path}: its v_bc does not match this model's shapes: {err}") from None
        self.copy_bc_into_policy()

    def setup(self, stage: str) -> None:
        precision = str(self.trainer.precision)
        if "bf16" in precision and self.device.type == "cpu" and not hardware.cpu_has_bf16_gemm():
            rank_zero_warn(
                f"precision={precision} on a CPU without native bf16 (AVX512-BF16 or AMX): its bf16 matmuls are "
                "emulated, several times slower than float32 (docs/performance.md, 'Reduced precision'); use 32-true"
            )
        if stage == "fit":
            if self.trainer.accumulate_grad_batches != 1:
                raise ValueError(
                    f"trainer.accumulate_grad_batches={self.trainer.accumulate_grad_batches} is not supported: target "
                    "updates, the dual step and the random streams are per update; raise data.init_args.batch_size "
                    "(or use more devices) instead"
                )
            if int(self.rng_seed) < 0:  # a fresh fit; a resumed one gets the checkpoint's seed when it is restored
                self.rng_seed.fill_(int(os.environ.get("PL_GLOBAL_SEED", 0)))
        if stage == "fit" and self.hparams.init_from and self.trainer.ckpt_path is None:
            self.load_bc_weights(self.hparams.init_from)
        if self.hparams.analytic_critic:
            dm = self.trainer.datamodule if self._trainer is not None else None
            if dm is None or not hasattr(dm, "analytic_q"):
                raise ValueError("analytic_critic=True needs a DataModule with an analytic reward (the toy bandit)")
            self.analytic_q = dm.analytic_q()

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        # The fused kernel: one pass over all parameters instead of ~10 small ops per tensor (4.7 -> 1 ms per step on
        # CPU at the CPU-small shapes); the same update up to float rounding. Not under fp16's GradScaler: Lightning
        # leaves the unscaling to a fused optimizer, so the finiteness check and the clip would see scaled gradients.
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer is not None else None
        fused = (self.device.type in ("cpu", "cuda") and scaler is None) or None
        return torch.optim.Adam(params, lr=self.hparams.lr, fused=fused)

    # ---- training step helpers ----------------------------------------------------------------------------
    @property
    def in_bc_warmup(self) -> bool:
        return self.global_step < self.hparams.bc_warmup_steps

    def q_fn(self, target: bool):
        """The critic used for values and adjoints: the analytic reward, or the (target) ensemble."""
        if self.analytic_q is not None:
            return self.analytic_q
        return self.target_critic if target else self.critic

    def seed_of(self, purpose: int, step: int | None = None) -> int:
        """Seed of this rank's stream ``purpose`` (trqam_lit.rng) at a global step (default: the current one)."""
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return fold_seed(max(int(self.rng_seed), 0), rank, self.global_step if step is None else step, purpose)

    def draw(self, name: str, *shape: int, uniform: bool = False) -> Tensor:
        """Every random draw of a training step goes through here (tests feed recorded draws by name).

        Names: ``bc/x0``, ``bc/t`` (uniform), ``critic/next_noise``, ``am/x0``, ``am/eps``, ``actor/noise`` (the
        one-step policy's z). Draws come, in this order, from a generator seeded with (seed, rank, global step): a
        resumed run repeats an uninterrupted one's draws, and every DDP rank draws its own.
        """
        if self._gen is None or self._gen.device != self.device:
            self._gen = torch.Generator(device=self.device)
            self._gen_step = -1
        if self._gen_step != self.global_step:
            self._gen.manual_seed(self.seed_of(TRAIN_NOISE))
            self._gen_step = self.global_step
        fn = torch.rand if uniform else torch.randn
        return fn(*shape, device=self.device, dtype=torch.float32, generator=self._gen)

    @property
    def logging_this_step(self) -> bool:
        """Whether Lightning writes this step's scalars (every ``trainer.log_every_n_steps`` steps).

        Each ``self.log`` costs about 1 ms of Lightning bookkeeping (a fifth of a small step on CPU), so per-step
        scalars are computed and handed to Lightning only on the steps its loggers write; the progress bar shows
        them at that rate too.
        """
        if self._trainer is None:
            return False
        trainer = self.trainer
        return bool(trainer.fast_dev_run) or trainer._logger_connector.should_update_logs

    def log_step(self, values: dict[str, Tensor], prog_bar: Sequence[str] = ()) -> None:
        """Log per-step scalars (on a logging step; see :attr:`logging_this_step`)."""
        if self.logging_this_step:
            for name, value in values.items():
                self.log(name, value, on_step=True, on_epoch=False, prog_bar=name in prog_bar)

    def record(self, **values: Tensor) -> None:
        """Keep this step's losses and path-KL estimate (``kl``) for the finiteness check before the optimizer step."""
        self._step_values.update({k: v.detach() for k, v in values.items()})

    def bc_loss(self, batch: dict[str, Tensor], x0: Tensor | None = None, t: Tensor | None = None) -> Tensor:
        """L_BC of v_bc with the draws ``x0`` (B, A) and ``t`` (B, 1), drawn here (``bc/x0``, ``bc/t``) if not given."""
        s, a = batch["observations"], batch["actions"]
        if x0 is None:
            x0 = self.draw("bc/x0", *a.shape)
        if t is None:
            t = self.draw("bc/t", a.shape[0], 1, uniform=True)
        return bc_flow_loss(self.v_bc, s, a, x0, t, batch["valid"])

    def critic_loss(
        self, batch: dict[str, Tensor], next_noise: Tensor | None = None, a_next: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(L_Q, Q(s, a) of every member, detached) with the next action ``a_next``, or from ``next_actions`` (the AM
        agents: the current v_ft ODE) from ``next_noise`` (drawn here, ``critic/next_noise``, if not given); zero loss
        for an analytic critic."""
        s, a = batch["observations"], batch["actions"]
        if self.analytic_q is not None:
            with torch.no_grad():
                return torch.zeros((), device=a.device), self.analytic_q(s, a).float()
        with torch.no_grad():
            s_next = batch["next_observations"]
            if a_next is None:
                if next_noise is None:
                    next_noise = self.draw("critic/next_noise", *a.shape)
                a_next = self.next_actions(s_next, next_noise)
            next_q = ensemble_pessimistic_value(self.target_critic(s_next, a_next), self.hparams.rho_q)
            y = td_target(batch["rewards"], batch["masks"], next_q, self.hparams.discount, self.hparams.horizon)
        q = self.critic(s, a)
        return critic_loss(q, y, batch["valid"]), q.detach().float()

    def touch_unused(self, loss: Tensor, *modules: nn.Module) -> Tensor:
        """Adds 0 * params so DDP sees a gradient for networks a phase leaves idle (BC warm-up)."""
        zero = sum(p.sum() for m in modules for p in m.parameters() if p.requires_grad)
        return loss + 0.0 * zero

    @property
    def flow_steps(self) -> int:
        return self.hparams.flow_steps

    # ---- optimizer-step hooks -------------------------------------------------------------------------------
    # Lightning runs, within one optimizer step: training_step, backward (DDP all-reduces the gradients), AMP
    # unscale, on_before_optimizer_step, configure_gradient_clipping, optimizer.step; then on_train_batch_end
    # (callbacks first: the dual step, then ModelCheckpoint).
    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        values = self._step_values
        self._step_values = {}
        reduced: dict[str, Tensor] = {}
        if names := sorted(values):
            # One all-reduce: a NaN on any rank makes the mean NaN, so every rank takes the same decision.
            means = self.trainer.strategy.reduce(torch.stack([values[k].float() for k in names]), reduce_op="mean")
            reduced = dict(zip(names, means, strict=True))
        if not bool(torch.isfinite(torch.stack([self.grad_norm.float(), *reduced.values()])).all()):
            self._skip_update(optimizer, values, reduced)
            return
        self.nonfinite_run.zero_()
        self._update_kl = reduced.get("kl")
        # Targets mix the PRE-step online weights (the reference's one-step lag), so update them here.
        if not self.in_bc_warmup:
            for target, online in self.target_pairs():
                polyak_update(target, online, self.hparams.tau)

    def _skip_update(self, optimizer, local: dict[str, Tensor], reduced: dict[str, Tensor]) -> None:
        """No weight, Adam, target or dual update for this step (Adam skips parameters without a gradient)."""
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self._update_kl = None
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and all(bool(torch.isfinite(v)) for v in reduced.values()):
            return  # fp16: an overflow of the scaled gradients; the GradScaler lowers its scale and skips the step
        self.nonfinite_steps += 1
        self.nonfinite_run += 1
        bad = [k for k, v in local.items() if not bool(torch.isfinite(v))]
        if bad:
            what = ", ".join(bad) + " on this rank"
        else:
            what = (
                "gradient norm" if all(bool(torch.isfinite(v)) for v in reduced.values()) else "value on another rank"
            )
        warnings.warn(
            f"step {self.global_step}: non-finite {what}; the update was skipped ({int(self.nonfinite_run)} in a row)",
            stacklevel=2,
        )
        if int(self.nonfinite_run) >= self.hparams.max_nonfinite_steps:
            raise FloatingPointError(
                f"{int(self.nonfinite_run)} consecutive steps with a non-finite value (last: {what}, global step "
                f"{self.global_step}); no weight, target or lambda was changed by them. Check the data for NaN/inf "
                "rows, lower model.init_args.lr or set model.init_args.grad_clip_norm, use precision 32 instead of "
                "16-mixed, or resume from the last checkpoint with another seed; "
                "model.init_args.max_nonfinite_steps sets how many skipped steps in a row are tolerated"
            )

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # One global clip over every trained parameter with the norm computed above (grads already all-reduced).
        if gradient_clip_val is not None:
            raise ValueError(
                "trainer.gradient_clip_val is not used by trqam-lit agents: set model.init_args.grad_clip_norm "
                "(one global norm clip over all trained parameters; its default is the agent's reference's)"
            )
        if self.hparams.grad_clip_norm is None:  # agents whose reference has no clip (FQL)
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if params:
            torch.nn.utils.clip_grads_with_norm_(params, self.hparams.grad_clip_norm, self.grad_norm)

    def take_update_kl(self) -> Tensor | None:
        """The rank-averaged path-KL estimate of the update just applied (None: no AM loss, or a skipped step)."""
        kl, self._update_kl = self._update_kl, None
        return kl

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if not self._policy_checked and not self.in_bc_warmup:  # one host read per run, not per step
            if not bool(self.policy_from_bc):
                self.copy_bc_into_policy()  # the BC warm-up just ended: fine-tuning starts from v_bc
                for optimizer in self.trainer.optimizers:
                    optimizer.state.clear()  # a fresh Adam, as when fine-tuning starts from a BC checkpoint
            self._policy_checked = True

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log_step({"train/grad_norm": self.grad_norm, "train/nonfinite_steps": self.nonfinite_steps.float()})

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Checkpoints written before these buffers existed: the seed they ran with is unknown, take 0.
        state = checkpoint.get("state_dict", {})
        for name in ("rng_seed", "nonfinite_steps", "nonfinite_run"):
            state.setdefault(name, torch.zeros((), dtype=torch.int64))

    # ---- acting and evaluation --------------------------------------------------------------------------------
    @property
    def policy_net(self) -> nn.Module:
        """The acting network; v_bc here (BC) and, in every agent, until fine-tuning starts (the BC warm-up)."""
        return self.v_bc

    def policy_actions(self, s: Tensor, noise: Tensor) -> Tensor:
        """The acting policy's action chunk from the given noise: here the Euler ODE of ``policy_net``, clipped."""
        return sample_actions(self.policy_net, s, noise, self.flow_steps)

    def acting_noise_shape(self, batch: int) -> tuple[int, ...]:
        """The shape of the noise ``policy_actions`` takes for ``batch`` observations: (B, A) here."""
        return (batch, self.hparams.action_dim)

    @torch.no_grad()
    def act(self, obs: Tensor, noise: Tensor | None = None) -> Tensor:
        """The acting policy (``policy_actions``) from fresh noise, clipped: (B, H * act_dim)."""
        obs = obs.to(self.device, torch.float32)
        if noise is None:
            noise = torch.randn(self.acting_noise_shape(obs.shape[0]), device=self.device)
        return self.policy_actions(obs, noise)

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
        # Episodes are sharded over ranks; torchmetrics averages the per-episode values across ranks. The acting
        # noise is its own stream, so an evaluation neither depends on nor disturbs the training draws.
        with seeded(self.device, self.seed_of(EVAL_NOISE)):
            values = self._evaluator.evaluate(self.act, rank=rank, world_size=world)
        for name, per_episode in values.items():
            metric = self.eval_metrics[name]
            metric.update(torch.as_tensor(per_episode, dtype=torch.float32, device=self.device))
            self.log(f"eval/{name}", metric, on_step=False, on_epoch=True, prog_bar=name in ("success", "return"))
