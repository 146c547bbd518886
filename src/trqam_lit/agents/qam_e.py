"""QAM-E: QAM plus an edit policy that refines the fine-tuned flow's action (the QAM repository's ``agents/qam.py``
with ``edit_scale > 0``).

a = clip(a_flow + edit_scale * e), a_flow = clip(ODE of v_ft) and e ~ pi_e(. | s, a_flow) a tanh-Gaussian. On top of
QAM's L_Q + L_BC + L_AM, the edit policy is trained SAC-style with a learned temperature alpha:
-mean_j Q_j(s, a) + alpha * log pi_e(e) (alpha fixed there) + alpha * (H - target_entropy) (alpha trained). The
edited action acts and gives the TD target's next action.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from trqam_lit.agents.qam import QAM
from trqam_lit.math.critic import actor_q_loss
from trqam_lit.math.flow import ACTION_CLIP, sample_actions
from trqam_lit.math.nets import LogParam, TanhGaussianPolicy
from trqam_lit.math.tanh_gaussian import tanh_gaussian_log_prob, tanh_gaussian_sample, temperature_loss


def edited_actions(a_flow: Tensor, edit: Tensor, edit_scale: float) -> Tensor:
    """clip(a_flow + edit_scale * e, -1, 1): the flow's action moved by the (tanh-bounded) edit."""
    return (a_flow + edit_scale * edit).clamp(-ACTION_CLIP, ACTION_CLIP)


class Edit(NamedTuple):
    action: Tensor  # clip(a_flow + edit_scale * tanh(x)) (B, A)
    log_prob: Tensor  # log pi_e(tanh(x) | s, a_flow) (B,), at the pre-tanh x


class QAME(QAM):
    """QAM with an edit policy (spec baselines.md, QAM-E): one Adam over everything (the temperature included),
    global-norm clip 1 (QAM's), as the reference.

    Networks: QAM's, the edit policy ``edit_policy`` (a tanh-Gaussian over concat(s, a_flow), the velocity fields'
    widths) and the temperature ``edit_alpha`` (alpha = exp(log_value), a parameter: in the checkpoint and Adam).
    A spec entry edit_scale = 0 is plain QAM: use ``trqam_lit.agents.QAM``.
    """

    label = "QAM-E"
    scalars = (
        "actor/edit_q_loss",
        "actor/edit_entropy",
        "actor/edit_entropy_loss",
        "actor/edit_alpha",
        "actor/edit_alpha_loss",
    )

    acting_draws_noise = True  # the edit's eps, from the acting stream (policy_actions)

    def __init__(self, edit_scale: float = 0.1, edit_target_entropy_multiplier: float = 0.5, **kwargs: Any) -> None:
        """
        Args:
            edit_scale: the largest change of each action coordinate by the edit (the spec's per-domain value; > 0).
            edit_target_entropy_multiplier: the temperature's target entropy is -multiplier * action_dim (H x A).
        """
        if not edit_scale > 0:
            raise ValueError(f"edit_scale must be > 0 (got {edit_scale}); edit_scale 0 is plain QAM: use QAM")
        super().__init__(**kwargs)

    def build_policy(self) -> None:
        super().build_policy()
        hp = self.hparams
        self.edit_policy = TanhGaussianPolicy(hp.obs_dim + hp.action_dim, hp.action_dim, hp.actor_hidden_dims)
        self.edit_alpha = LogParam()

    @property
    def target_entropy(self) -> float:
        return -self.hparams.edit_target_entropy_multiplier * self.hparams.action_dim

    def edit(self, s: Tensor, a_flow: Tensor, eps: Tensor) -> Edit:
        """The edited action from the flow's action and the edit's standard-normal draw eps (B, A)."""
        mean, log_std = self.edit_policy(torch.cat([s.to(a_flow.dtype), a_flow], dim=-1))
        e, x = tanh_gaussian_sample(mean, log_std, eps)
        return Edit(edited_actions(a_flow, e, self.hparams.edit_scale), tanh_gaussian_log_prob(mean, log_std, x))

    def draw_step_noise(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The base step's draws, then the TD target's edit draw ``critic/next_edit_eps`` (where the step always drew
        it: after the AM draws), stacked under the flow noise in ``next_noise`` so the losses stay pure."""
        noise = super().draw_step_noise(batch)
        edit_eps = self.draw("critic/next_edit_eps", *noise["next_noise"].shape)
        noise["next_noise"] = torch.stack([noise["next_noise"], edit_eps])
        return noise

    def next_actions(self, s_next: Tensor, noise: Tensor) -> Tensor:
        """The edited next action; ``noise`` is the flow noise (B, A), the edit's eps then drawn here, or both
        stacked (2, B, A) as ``draw_step_noise`` gives them."""
        noise, edit_eps = (noise[0], noise[1]) if noise.dim() == 3 else (noise, None)
        a_flow = sample_actions(self.v_ft, s_next, noise, self.flow_steps)
        if edit_eps is None:
            edit_eps = self.draw("critic/next_edit_eps", *noise.shape)
        return self.edit(s_next, a_flow, edit_eps).action

    def policy_actions(self, s: Tensor, noise: Tensor) -> Tensor:
        a = sample_actions(self.policy_net, s, noise, self.flow_steps)
        if self.policy_net is self.v_bc:  # during a BC warm-up
            return a
        return self.edit(s, a, torch.randn_like(noise)).action  # the acting stream (act's), not the training draws

    def policy_loss(self, s: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """-mean Q(s, a) + mean(alpha log pi_e) + alpha (H - target) with a_flow from v_ft without gradient, the
        online critic and alpha held fixed in the first two terms; draws: a_flow's noise, then the edit's eps."""
        B, A = s.shape[0], self.hparams.action_dim
        with torch.no_grad():
            a_flow = sample_actions(self.v_ft, s, self.draw("edit/noise", B, A), self.flow_steps)
        edit = self.edit(s, a_flow, self.draw("edit/eps", B, A))
        q = actor_q_loss(self.q_fn(target=False), s, edit.action)
        alpha = self.edit_alpha()
        entropy_loss = (edit.log_prob.float() * alpha.detach()).mean()
        alpha_loss = temperature_loss(alpha, edit.log_prob, self.target_entropy)
        terms = {"actor/edit_q_loss": q, "actor/edit_entropy_loss": entropy_loss, "actor/edit_alpha_loss": alpha_loss,
                 "actor/edit_entropy": -edit.log_prob.detach().mean(), "actor/edit_alpha": alpha}  # fmt: skip
        return q + entropy_loss + alpha_loss, terms
