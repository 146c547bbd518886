"""TRQAM on the toy bandit with the analytic linear critic: the tilted mean and the KL budget (issue 4).

Behaviour N(0, 0.3^2), reward 3a, so the continuous-time optimum is N(s^2 c / lambda_eff, s^2): shift 0.09 at
lambda_eff = 3 and an unconstrained path KL of |c|^2 s^2 / (2 lambda_eff^2) = 0.045.

The logged values checked are read back from the run's TensorBoard event files, as a user sees them.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from helpers import read_scalars
from trqam_lit.agents import TRQAM
from trqam_lit.toy import ToyBanditDataModule

MU, S, C = 0.0, 0.3, 3.0
STEPS, WARMUP = 2500, 1000
# The dual step runs in float32 and TensorBoard stores float32; recomputed here in float64 from the logged values,
# one step differs by the float32 roundings of its 3 operations and of 0.9 and 0.1 (2^-24 = 6e-8 relative each,
# at most ~2e-7 together; measured <= 1.2e-7 over the 1500 steps of test_toy_bandit): allow 4e-7.
F32 = 4e-7


def spec_dual_step(lam: float, ema: float, kl: float, eps_kl: float, eta: float) -> tuple[float, float]:
    """One projected dual-descent step as the spec (section 4) writes it, with TRQAM's default rho = 0.1, KL clip
    2 eps_kl and lambda in [0.01, 100]; written out here rather than calling trqam_lit.dual, so that a change to that
    code is caught. Returns (lambda, KL average)."""
    ema = 0.9 * ema + 0.1 * min(kl, 2.0 * eps_kl)
    return min(max(lam + eta * (ema - eps_kl), 0.01), 100.0), ema


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
    kl, clipped, ema, lam = (dict(scalars[f"dual/{k}"]) for k in ("kl", "kl_clipped", "kl_ema", "lambda"))
    # The dual step ran once per fine-tuning update (logged at step = global_step - 1) ...
    assert sorted(kl) == sorted(clipped) == sorted(ema) == sorted(lam) == list(range(WARMUP, STEPS))
    # ... and is the clipped, averaged, projected recursion fed with the logged KL, from lambda = lam_init = 1 and
    # a KL average of 0. The module steps in float32 and TensorBoard stores float32: one step from the logged
    # previous values, in float64 here, gives the logged next ones to a few float32 roundings (F32).
    prev_lam, prev_ema = 1.0, 0.0
    for step in range(WARMUP, STEPS):
        assert clipped[step] == pytest.approx(min(kl[step], 2 * eps_kl), rel=F32), (step, kl[step], clipped[step])
        exp_lam, exp_ema = spec_dual_step(prev_lam, prev_ema, kl[step], eps_kl, eta)
        assert ema[step] == pytest.approx(exp_ema, rel=F32), (step, ema[step], exp_ema)
        assert lam[step] == pytest.approx(exp_lam, rel=F32), (step, lam[step], exp_lam)
        prev_lam, prev_ema = lam[step], ema[step]
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
