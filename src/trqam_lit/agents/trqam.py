"""TRQAM: critic + BC + adjoint matching with the trust-region parameter lambda inside the SDE (spec 2-5)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..adjoint import AMOutput, adjoint_matching_objective
from ..dual import DualDescent, DualForm
from ..sde import Solver
from .base import FlowAgent


class TRQAM(FlowAgent):
    """Trust Region Q-Adjoint Matching; lambda and its KL average are buffers stepped after each update."""

    has_dual = True

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
        eps_kl: float = 1.0,
        eta: float = 0.01,
        kl_ema_rho: float = 0.1,
        kl_clip: float = 2.0,
        lam_init: float = 1.0,
        lam_min: float = 0.01,
        lam_max: float = 100.0,
        lam_scale: float = 3.0,
        dual_form: DualForm = "reference",
        dual_update: bool = True,
        sde_solver: Solver = "fused",
    ) -> None:
        """
        Args:
            eps_kl: the path-KL budget epsilon_KL (per chunk step, i.e. after dividing by H).
            eta: dual step size on lambda.
            kl_ema_rho: weight of the new KL estimate in its running average.
            kl_clip: the KL estimate is clipped at kl_clip * eps_kl before averaging (reference form).
            lam_init: lambda at the start of fine-tuning.
            lam_min: lower bound of lambda (reference form).
            lam_max: upper bound of lambda (reference form).
            lam_scale: lambda_eff = lam_scale * lambda sets sigma in the AM loss (reference form; paper form 1).
            dual_form: "reference" (what produced the paper's numbers) or "paper" (the paper's plain form).
            dual_update: step lambda by dual descent; False keeps it fixed at lam_init.
            sde_solver: forward rollout solver, "fused" (fast loop) or "torchsde" (torchsde.sdeint).
        """
        super().__init__(
            obs_dim, action_dim, horizon, discount, actor_hidden_dims, actor_layer_norm, critic_hidden_dims,
            critic_layer_norm, num_critics, flow_steps, rho_q, lr, tau, grad_clip_norm, analytic_critic, init_from,
            bc_warmup_steps,
        )  # fmt: skip
        self.dual = DualDescent(eps_kl, eta, kl_ema_rho, kl_clip, lam_init, lam_min, lam_max, lam_scale, dual_form)

    def actor_objective(self, s: Tensor, batch_size: int) -> AMOutput:
        x0 = self.draw("am/x0", batch_size, self.hparams.action_dim)
        eps = self.draw("am/eps", self.flow_steps - 1, batch_size, self.hparams.action_dim)
        return adjoint_matching_objective(
            self.v_ft, self.v_base, self.q_fn(target=True), s, x0, eps, self.flow_steps, self.hparams.horizon,
            lam_eff=self.lam_eff, adj_scale=self.adj_scale, solver=self.hparams.sde_solver,
        )  # fmt: skip

    @property
    def lam_eff(self) -> Tensor | float:
        return self.dual.lam_eff

    @property
    def adj_scale(self) -> float:
        return 1.0

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        bc = self.bc_loss(batch)
        self.log("train/bc_loss", bc, on_step=True, prog_bar=True)
        if self.in_bc_warmup:
            return self.touch_unused(bc, self.v_ft, self.critic)
        q_loss, q_mean = self.critic_loss(batch)
        am = self.actor_objective(batch["observations"], batch["actions"].shape[0])
        self.log_dict({"train/critic_loss": q_loss, "train/am_loss": am.loss.detach(), "train/q_mean": q_mean})
        self._last_kl = am.path_kl  # the dual step runs after the optimizer step (FlowAgent.optimizer_step)
        loss = q_loss + bc + am.loss
        if self.analytic_q is not None:
            loss = self.touch_unused(loss, self.critic)
        return loss

    def after_optimizer_step(self, kl: Tensor) -> None:
        # ``kl`` is already averaged over ranks, so lambda stays identical on every rank.
        super().after_optimizer_step(kl)
        if self.has_dual:
            if self.hparams.dual_update:
                self.dual.step(kl)
            self.log("dual/kl_ema", self.dual.kl_ema, prog_bar=True)
            self.log("dual/lambda", self.dual.lam, prog_bar=True)
