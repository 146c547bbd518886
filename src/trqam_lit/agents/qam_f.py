"""QAM-F: QAM plus a one-step policy distilled from the fine-tuned flow (the QAM repository's ``agents/qam.py`` with
``fql_alpha > 0``).

On top of QAM's L_Q + L_BC + L_AM, a one-step policy mu(s, z) is distilled from v_ft's K-step ODE and pushed up the
critic: + fql_alpha * L_distill + L_pi^Q, FQL's two terms with v_ft as the teacher. mu acts and gives the TD target's
next action; v_ft, still trained by adjoint matching, only teaches it.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from trqam_lit.agents.qam import QAM
from trqam_lit.math.critic import actor_q_loss
from trqam_lit.math.flow import ACTION_CLIP, distillation_loss, onestep_actions, sample_actions
from trqam_lit.math.nets import OneStepPolicy


class QAMF(QAM):
    """QAM with a one-step policy (spec baselines.md, QAM-F): one Adam, global-norm clip 1 (QAM's), as the reference.

    Networks: QAM's (v_bc, v_ft, v_base, the critic ensemble and its target) and mu (the widths of the velocity
    fields, input concat(s, z), no time). A BC warm-up or ``init_from`` sets v_ft and v_base from v_bc, as for QAM;
    mu trains from its own init. A spec entry fql_alpha = 0 is plain QAM: use ``trqam_lit.agents.QAM``.
    """

    label = "QAM-F"
    scalars = ("actor/distill_loss", "actor/q_loss")

    def __init__(self, fql_alpha: float = 30.0, **kwargs: Any) -> None:
        """
        Args:
            fql_alpha: weight of the distillation of mu onto v_ft's ODE (the spec's per-domain value; > 0).
        """
        if not fql_alpha > 0:
            raise ValueError(f"fql_alpha must be > 0 (got {fql_alpha}); fql_alpha 0 is plain QAM: use QAM")
        super().__init__(**kwargs)

    def build_policy(self) -> None:
        super().build_policy()
        hp = self.hparams
        self.mu = OneStepPolicy(hp.obs_dim, hp.action_dim, hp.actor_hidden_dims, hp.actor_layer_norm)

    def next_actions(self, s_next: Tensor, noise: Tensor) -> Tensor:
        return onestep_actions(self.mu, s_next, noise)  # the one-step policy, not v_ft's ODE

    @property
    def policy_net(self) -> nn.Module:
        return self.mu if bool(self.policy_from_bc) else self.v_bc

    def policy_actions(self, s: Tensor, noise: Tensor) -> Tensor:
        net = self.policy_net
        return onestep_actions(net, s, noise) if net is self.mu else sample_actions(net, s, noise, self.flow_steps)

    def policy_loss(self, s: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """fql_alpha * L_distill + L_pi^Q from one noise draw z (B, A), as the reference (drawn after the AM draws):
        the distillation target is clip(ODE of v_ft) without gradient, the Q term holds the online critic fixed."""
        z = self.draw("actor/noise", s.shape[0], self.hparams.action_dim)
        distill, mu_out = distillation_loss(self.mu, self.v_ft, s, z, self.flow_steps)
        q = actor_q_loss(self.q_fn(target=False), s, mu_out.clamp(-ACTION_CLIP, ACTION_CLIP))
        return self.hparams.fql_alpha * distill + q, {"actor/distill_loss": distill, "actor/q_loss": q}
