"""QAM: the fixed-temperature baseline (sigma = g, inverse temperature on the terminal adjoint, no dual step)."""

from __future__ import annotations

from collections.abc import Sequence

from ..sde import Solver
from .trqam import TRQAM


class QAM(TRQAM):
    """Q-learning with Adjoint Matching (spec method.md section 6): lambda_eff = 1, adj_K scaled by inv_temp."""

    has_dual = False

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
        inv_temp: float = 1.0,
        sde_solver: Solver = "fused",
    ) -> None:
        """
        Args:
            inv_temp: inverse temperature beta multiplying the terminal adjoint.
            sde_solver: forward rollout solver, "fused" or "torchsde".
        """
        super().__init__(
            obs_dim, action_dim, horizon, discount, actor_hidden_dims, actor_layer_norm, critic_hidden_dims,
            critic_layer_norm, num_critics, flow_steps, rho_q, lr, tau, grad_clip_norm, analytic_critic, init_from,
            bc_warmup_steps, dual_update=False, sde_solver=sde_solver,
        )  # fmt: skip
        self.save_hyperparameters()

    @property
    def lam_eff(self) -> float:
        return 1.0

    @property
    def adj_scale(self) -> float:
        return self.hparams.inv_temp
