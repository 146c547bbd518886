"""Shared step of the adjoint-matching agents (TRQAM, QAM, QAM-F, QAM-E): critic + BC + adjoint-matching losses (+ a
variant's policy loss)."""

from __future__ import annotations

import copy
import functools
import sys
import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn

from trqam_lit.agents.base import FlowAgent
from trqam_lit.math.adjoint import AMOutput, adjoint_matching_objective
from trqam_lit.math.flow import ACTION_CLIP, sample_actions
from trqam_lit.math.nets import VelocityField
from trqam_lit.math.sde import FlowSDE, Solver, rollout, rollout_fused_with_ode

_COMPILED: dict[type, Callable] = {}  # compiled fine_tune_losses per agent class (compile_step)

# compile_step "auto" compiles a CPU run that plans at least this many fine-tuning steps: the compiled step saves
# ~13 ms per step at small64 (20 -> 27 steps/s through the Trainer) and more at larger shapes, against a compilation
# of 45-75 s on a machine's first run (20-26 s with inductor's cache warm): it pays after ~3,500 steps cold.
AUTO_COMPILE_MIN_STEPS = 5000


class AdjointMatchingAgent(FlowAgent):
    """L = L_Q + L_BC + L_AM with one optimizer; subclasses set ``lam_eff`` (sigma = g / sqrt(lam_eff)) and
    ``adj_scale`` (the factor on the terminal adjoint).

    Networks besides v_bc and the critics: the fine-tuned field v_ft (it acts and gives the TD target's next action)
    and its prior v_base, the polyak copy of v_bc.
    """

    scalars = ("critic/critic_loss", "critic/q_mean", "critic/q_min", "actor/am_loss", "actor/adj_max", "dual/kl")

    # Whether v_ft starts equal to v_bc (and v_base) when neither a BC warm-up nor init_from sets it: TRQAM's trust
    # region is measured from the prior, so it must start there; QAM's reference trains v_ft from its own init.
    ft_starts_at_prior: bool = False

    def __init__(
        self, sde_solver: Solver = "torchsde", compile_step: bool | Literal["auto"] = "auto", **kwargs: Any
    ) -> None:
        """
        Args:
            sde_solver: forward rollout solver, "torchsde" (torchsde.sdeint) or "fused" (the same Euler-Maruyama steps
                in a plain loop, identical states); the CPU-sized configs choose "fused" (docs/performance.md).
            compile_step: compile the fine-tuning step's losses (``fine_tune_losses``: BC, critic and adjoint
                matching, their backward included) with ``torch.compile`` into one graph; the same numbers as the
                eager step, about 1.7x faster at small shapes on CPU, after a compilation of about a minute on the
                first run of a machine (~20 s once its cache is warm; docs/performance.md). With sde_solver
                "torchsde" the rollout runs eagerly through torchsde.sdeint (its solver loop is not traced) and
                everything after it is compiled. "auto" (default): compiled when the fit pays for it: on the CPU,
                with at least AUTO_COMPILE_MIN_STEPS (5,000) fine-tuning steps planned (max_steps minus the BC
                warm-up); eager otherwise (and outside a Trainer).
        """
        super().__init__(**kwargs)
        if compile_step not in (True, False, "auto"):
            raise ValueError(f"compile_step must be true, false or 'auto' (got {compile_step!r})")
        self.compiles = compile_step is True  # resolved for "auto" when a fit starts (resolve_compile_step)
        # "auto"'s decision as a resumed checkpoint recorded it ("fused only": an older checkpoint, decided by the
        # rule of its time, under which torchsde stayed eager)
        self._checkpoint_compiles: bool | str | None = None

    def build_policy(self) -> None:
        hp = self.hparams
        if self.ft_starts_at_prior:
            self.v_ft = copy.deepcopy(self.v_bc)
        else:
            self.v_ft = VelocityField(hp.obs_dim, hp.action_dim, hp.actor_hidden_dims, hp.actor_layer_norm)
        self.v_base = self._frozen_copy(self.v_bc)

    def target_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [*super().target_pairs(), (self.v_base, self.v_bc)]

    def next_actions(self, s_next: Tensor, noise: Tensor) -> Tensor:
        return sample_actions(self.v_ft, s_next, noise, self.flow_steps)  # the current v_ft, as the reference

    @torch.no_grad()
    def copy_bc_into_policy(self) -> None:
        self.v_base.load_state_dict(self.v_bc.state_dict())
        self.v_ft.load_state_dict(self.v_bc.state_dict())
        super().copy_bc_into_policy()

    @property
    def policy_net(self) -> nn.Module:
        # Until v_ft has been set from v_bc (during the BC warm-up) the policy being built is v_bc.
        return self.v_ft if bool(self.policy_from_bc) else self.v_bc

    @property
    def lam_eff(self) -> Tensor | float:
        raise NotImplementedError

    @property
    def adj_scale(self) -> float:
        raise NotImplementedError

    def actor_objective(self, s: Tensor, x0: Tensor, eps: Tensor, xs: Tensor | None = None) -> AMOutput:
        """The adjoint-matching pass from the rollout's draws ``x0`` (B, A) and ``eps`` (K-1, B, A) (and the rollout's
        states ``xs`` if already computed)."""
        return adjoint_matching_objective(
            self.v_ft, self.v_base, self.q_fn(target=True), s, x0, eps, self.flow_steps, self.hparams.horizon,
            lam_eff=self.lam_eff, adj_scale=self.adj_scale, solver=self.hparams.sde_solver, xs=xs,
        )  # fmt: skip

    @property
    def shares_rollout(self) -> bool:
        """Whether the TD target's next action is integrated beside the AM rollout (``rollout_fused_with_ode``: one v_ft
        call on 2B rows per shared flow time): with the fused solver, a learned critic, and the next action v_ft's
        ODE (an agent with its own ``next_actions``, QAM-F's one-step policy or QAM-E's edit, keeps its own)."""
        return (
            self.hparams.sde_solver == "fused" and self.analytic_q is None
            and type(self).next_actions is AdjointMatchingAgent.next_actions
        )  # fmt: skip

    def draw_step_noise(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every draw of a fine-tuning step's losses, in the stream's order: ``bc/x0``, ``bc/t``,
        ``critic/next_noise``, ``am/x0``, ``am/eps`` (a variant's ``policy_loss`` draws after these)."""
        B, A = batch["actions"].shape
        return {
            "bc_x0": self.draw("bc/x0", B, A),
            "bc_t": self.draw("bc/t", B, 1, uniform=True),
            "next_noise": self.draw("critic/next_noise", B, A),
            "am_x0": self.draw("am/x0", B, A),
            "am_eps": self.draw("am/eps", self.flow_steps - 1, B, A),
        }

    def fine_tune_losses(
        self, batch: dict[str, Tensor], noise: dict[str, Tensor], xs: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, AMOutput]:
        """(L_BC, L_Q, Q(s, a), the AM pass) of one fine-tuning step: a pure function of the weights, the batch and
        the draws (``draw_step_noise``), so ``compile_step`` can compile it as one graph; ``xs``: the AM rollout's
        states when already computed (``rollout_states``, the compiled step with torchsde)."""
        bc = self.bc_loss(batch, noise["bc_x0"], noise["bc_t"])
        s = batch["observations"]
        if not self.shares_rollout:
            q_loss, q = self.critic_loss(batch, noise["next_noise"])
            return bc, q_loss, q, self.actor_objective(s, noise["am_x0"], noise["am_eps"], xs=xs)
        with torch.no_grad():
            sde = FlowSDE(self.v_ft, self.v_base, s, self.flow_steps)
            xs, a_next = rollout_fused_with_ode(
                sde, noise["am_x0"], noise["am_eps"], batch["next_observations"], noise["next_noise"]
            )
        q_loss, q = self.critic_loss(batch, a_next=a_next.clamp(-ACTION_CLIP, ACTION_CLIP))  # as sample_actions
        return bc, q_loss, q, self.actor_objective(s, noise["am_x0"], noise["am_eps"], xs=xs)

    def resolve_compile_step(self, device: torch.device, max_steps: int | None) -> bool:
        """Whether this fit compiles the step (``compile_step``): True / False as given; "auto" compiles a CPU fit
        that plans at least AUTO_COMPILE_MIN_STEPS fine-tuning steps (``max_steps`` minus
        the BC warm-up; the plan, not what is left). A fit resumed from a checkpoint keeps the decision recorded there
        (``on_save_checkpoint``), whatever its own ``max_steps``: compiled and eager steps round differently, so
        changing paths mid-run would break the exact resume. A recorded decision binds CPU fits only (a CPU run resumed
        on a GPU decides as a GPU run)."""
        setting = self.hparams.compile_step
        if setting == "auto" and device.type == "cpu" and isinstance(self._checkpoint_compiles, bool):
            self.compiles = self._checkpoint_compiles
            if self.compiles:
                _say("compile_step auto: compiled, as the run this checkpoint comes from decided")
        elif setting == "auto":
            planned = (max_steps - self.hparams.bc_warmup_steps) if max_steps is not None and max_steps > 0 else 0
            self.compiles = device.type == "cpu" and planned >= AUTO_COMPILE_MIN_STEPS
            if self._checkpoint_compiles == "fused only":  # a checkpoint from before torchsde could be compiled
                self.compiles = self.compiles and self.hparams.sde_solver == "fused"
            if self.compiles:
                _say(
                    f"compile_step auto: {planned} fine-tuning steps planned, so the step is compiled with "
                    "torch.compile at its first call (about a minute on a machine's first run, ~20 s with "
                    "inductor's cache; compile_step: false keeps it eager)"
                )
        else:
            self.compiles = bool(setting)
        return self.compiles

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.resolve_compile_step(self.device, self.trainer.max_steps)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["compile_step_resolved"] = self.compiles

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        # absent in checkpoints written before the decision was recorded: decide as they did (torchsde stayed eager)
        self._checkpoint_compiles = checkpoint.get("compile_step_resolved", "fused only")

    def step_losses(self) -> Callable[..., tuple[Tensor, Tensor, Tensor, AMOutput]]:
        """``fine_tune_losses``, compiled once per agent class when this fit compiles (``compile_step``; with torchsde
        the rollout runs eagerly first and hands its states to the compiled rest)."""
        if not self.compiles:
            return self.fine_tune_losses
        cls = type(self)
        if cls not in _COMPILED:  # the unbound function: the compiled code holds no reference to a model
            _COMPILED[cls] = _announced(torch.compile(cls.fine_tune_losses, fullgraph=True, dynamic=False), cls)
        compiled = _COMPILED[cls]
        if self.hparams.sde_solver == "fused":
            return functools.partial(compiled, self)

        def eager_rollout_then_compiled(batch: dict[str, Tensor], noise: dict[str, Tensor]):
            xs = self.rollout_states(batch["observations"], noise["am_x0"], noise["am_eps"])
            return compiled(self, batch, noise, xs)

        return eager_rollout_then_compiled

    def rollout_states(self, s: Tensor, x0: Tensor, eps: Tensor) -> Tensor:
        """The AM rollout's states (K+1, B, A) from its draws, without a graph, with the configured solver (what
        ``adjoint_matching_objective`` computes when it is not handed them)."""
        with torch.no_grad():
            return rollout(FlowSDE(self.v_ft, self.v_base, s, self.flow_steps), x0, eps, self.hparams.sde_solver)

    def policy_loss(self, s: Tensor) -> tuple[Tensor, dict[str, Tensor]] | None:
        """The loss a variant adds to L_Q + L_BC + L_AM and its terms by scalar name (logged, and checked for NaN/inf
        before the step): QAM-F's one-step policy, QAM-E's edit policy. TRQAM and QAM: None."""
        return None

    def fine_tune_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        bc, q_loss, q, am = self.step_losses()(batch, self.draw_step_noise(batch))
        loss = q_loss + bc + am.loss
        info = {
            "actor/bc_loss": bc, "critic/critic_loss": q_loss, "critic/q_mean": q.mean(), "critic/q_min": q.min(),
            "actor/am_loss": am.loss, "actor/adj_max": am.adj_final.abs().max(), "kl": am.path_kl,
        }  # fmt: skip
        extra = self.policy_loss(batch["observations"])  # a variant's own loss, drawing after the step's draws
        if extra is not None:
            loss = loss + extra[0]
            info.update(extra[1])
        return loss, info


@rank_zero_only
def _say(message: str) -> None:
    print(f"trqam-lit: {message}", file=sys.stderr, flush=True)


def _announced(compiled: Callable, cls: type) -> Callable:
    """``compiled``, saying in the log when its first call (which compiles) starts and how long it took."""
    first = True

    @functools.wraps(compiled)
    def call(*args: Any, **kwargs: Any):
        nonlocal first
        if not first:
            return compiled(*args, **kwargs)
        first = False
        _say(f"compiling {cls.__name__}'s fine-tuning step (torch.compile, inductor)...")
        t0 = time.perf_counter()
        out = compiled(*args, **kwargs)
        _say(f"compiled {cls.__name__}'s fine-tuning step in {time.perf_counter() - t0:.0f} s")
        return out

    return call
