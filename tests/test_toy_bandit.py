"""TRQAM on the toy bandit with the analytic linear critic: the tilted mean and the KL budget (issue 4).

Behaviour N(0, 0.3^2), reward 3a, so the continuous-time optimum is N(s^2 c / lambda_eff, s^2): shift 0.09 at
lambda_eff = 3 and an unconstrained path KL of |c|^2 s^2 / (2 lambda_eff^2) = 0.045.

The logged values checked are read back from the run's TensorBoard event files, as a user sees them.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from helpers import assert_dual_descent, read_scalars
from trqam_lit.agents import TRQAM
from trqam_lit.data.toy import ToyBanditDataModule

MU, S, C = 0.0, 0.3, 3.0
STEPS, WARMUP = 2500, 1000


def train(log_root, dual_update: bool, eps_kl: float = 0.01, eta: float = 1.0):
    """Fit, logging every step to TensorBoard under ``log_root``; returns the model and the read-back scalars."""
    pl.seed_everything(0, verbose=False)
    dm = ToyBanditDataModule(mu=MU, std=S, c=C, batch_size=256, eval_samples=4000, seed=0)
    model = TRQAM(
        obs_dim=1, action_dim=1, horizon=1, actor_hidden_dims=[64] * 4, critic_hidden_dims=[8], num_critics=1,
        analytic_critic=True, bc_warmup_steps=WARMUP, lr=1e-3, dual_update=dual_update, eps_kl=eps_kl, eta=eta,
    )  # fmt: skip
    logger = TensorBoardLogger(save_dir=log_root, name="toy", default_hp_metric=False)
    trainer = pl.Trainer(
        max_steps=STEPS, val_check_interval=STEPS, check_val_every_n_epoch=None, logger=logger, log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, dm)
    return model, read_scalars(logger.log_dir)


def test_fixed_lambda_tilts_the_mean_to_the_closed_form(tmp_path):
    model, scalars = train(tmp_path, dual_update=False)
    # dual_update=False: lambda is logged at every fine-tuning step and never moves, the KL average is never fed,
    # and no clipped KL is logged (the dual step did not run)
    lam = scalars["dual/lambda"]
    assert [s for s, _ in lam] == list(range(WARMUP, STEPS))
    assert all(v == 1.0 for _, v in lam) and all(v == 0.0 for _, v in scalars["dual/kl_ema"])
    assert "dual/kl_clipped" not in scalars
    lam_eff = model.dual.lam_eff.item()
    assert lam_eff == pytest.approx(3.0)  # lam_scale 3
    ((_, action_mean),) = scalars["eval/action_mean"]  # one evaluation, at the end
    shift = S**2 * C / lam_eff
    # 25% of the shift: K = 10 alone moves the discrete optimum by +18% (verify gaussian-linear --num-steps 10),
    # plus a BC fit of the base that is not exact after 1000 steps; Monte Carlo error (4000 samples) is ~5%.
    assert action_mean == pytest.approx(MU + shift, abs=0.25 * shift)
    # and clearly away from the untilted base mean
    assert action_mean > MU + 0.5 * shift


def test_dual_descent_holds_the_kl_average_at_the_budget(tmp_path):
    eps_kl, eta = 0.01, 1.0  # eps_kl well below the unconstrained KL (~0.045 continuous, ~0.07 at K = 10)
    _, scalars = train(tmp_path, dual_update=True, eps_kl=eps_kl, eta=eta)
    # once per fine-tuning update, the clipped, averaged, projected recursion of the spec fed with the logged KL
    assert_dual_descent(scalars, eps_kl, eta, range(WARMUP, STEPS))
    kl, lam, ema = (dict(scalars[f"dual/{k}"]) for k in ("kl", "lambda", "kl_ema"))
    assert any(v > 2 * eps_kl for v in kl.values())  # the clip was exercised, not only the pass-through
    late = [ema[step] for step in range(2000, STEPS)]
    # Settled: the average over the last 500 steps within 10% of the budget. Single values carry the noise of
    # one batch's KL estimate through the rho = 0.1 average (seen here: 0.0099..0.0121), so each within 25%.
    assert abs(sum(late) / len(late) - eps_kl) < 0.1 * eps_kl, sum(late) / len(late)
    assert all(abs(v - eps_kl) < 0.25 * eps_kl for v in late), (min(late), max(late))
    assert lam[STEPS - 1] > 1.5  # lambda rose from 1 to shrink the control
    ((_, action_mean),) = scalars["eval/action_mean"]
    # a larger lambda_eff means a smaller tilt than the fixed lambda_eff = 3 run's
    assert 0 < action_mean < S**2 * C / 3.0
