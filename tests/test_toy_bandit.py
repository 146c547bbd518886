"""TRQAM on the toy bandit with the analytic linear critic: the tilted mean and the KL budget (issue 4).

Behaviour N(0, 0.3^2), reward 3a, so the continuous-time optimum is N(s^2 c / lambda_eff, s^2): shift 0.09 at
lambda_eff = 3 and an unconstrained path KL of |c|^2 s^2 / (2 lambda_eff^2) = 0.045.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from trqam_lit.agents import TRQAM
from trqam_lit.toy import ToyBanditDataModule

MU, S, C = 0.0, 0.3, 3.0


def train(dual_update: bool, steps: int = 2500, warmup: int = 1000, eps_kl: float = 0.01, eta: float = 1.0):
    pl.seed_everything(0, verbose=False)
    dm = ToyBanditDataModule(mu=MU, std=S, c=C, batch_size=256, eval_samples=4000, seed=0)
    model = TRQAM(
        obs_dim=1, action_dim=1, horizon=1, actor_hidden_dims=[64] * 4, critic_hidden_dims=[8], num_critics=1,
        analytic_critic=True, bc_warmup_steps=warmup, lr=1e-3, dual_update=dual_update, eps_kl=eps_kl, eta=eta,
    )  # fmt: skip
    lam_trace = []

    class Trace(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            lam_trace.append((trainer.global_step, pl_module.dual.lam.item(), pl_module.dual.kl_ema.item()))

    trainer = pl.Trainer(
        max_steps=steps, val_check_interval=steps, check_val_every_n_epoch=None, logger=False, callbacks=[Trace()],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, dm)
    return model, trainer.callback_metrics, lam_trace


def test_fixed_lambda_tilts_the_mean_to_the_closed_form():
    model, metrics, _ = train(dual_update=False)
    lam_eff = model.dual.lam_eff.item()
    assert lam_eff == pytest.approx(3.0)
    shift = S**2 * C / lam_eff
    # 25% of the shift: K = 10 alone moves the discrete optimum by +18% (verify gaussian-linear --num-steps 10),
    # plus a BC fit of the base that is not exact after 1000 steps; Monte Carlo error (4000 samples) is ~5%.
    assert metrics["eval/action_mean"].item() == pytest.approx(MU + shift, abs=0.25 * shift)
    # and clearly away from the untilted base mean
    assert metrics["eval/action_mean"].item() > MU + 0.5 * shift


def test_dual_descent_holds_the_kl_average_at_the_budget():
    eps_kl = 0.01  # well below the unconstrained KL (~0.045 continuous, ~0.07 at K = 10)
    model, metrics, trace = train(dual_update=True, eps_kl=eps_kl)
    late = [ema for step, _, ema in trace if step > 2000]
    # Settled: the average over the last 500 steps within 10% of the budget. Single values carry the noise of
    # one batch's KL estimate through the rho = 0.1 average (seen here: 0.0099..0.0121), so each within 25%.
    assert abs(sum(late) / len(late) - eps_kl) < 0.1 * eps_kl, sum(late) / len(late)
    assert all(abs(ema - eps_kl) < 0.25 * eps_kl for ema in late), (min(late), max(late))
    assert model.dual.lam.item() > 1.5  # lambda rose from 1 to shrink the control
    lam_eff = model.dual.lam_eff.item()
    # a larger lambda_eff means a smaller tilt than the fixed lambda_eff = 3 run's
    assert 0 < metrics["eval/action_mean"].item() < S**2 * C / 3.0
    assert torch.isfinite(torch.tensor(lam_eff))
