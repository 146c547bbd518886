"""The toy's controlled critic error (the stability experiment of docs/results.md) and the report's sweep plots."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trqam_lit.data.toy import AnalyticReward, PerturbedReward, ToyBanditDataModule
from trqam_lit.tools.experiment import Grid, Run
from trqam_lit.tools.report import plot_sweep


@pytest.mark.parametrize("delta", [0.5, 2.0])
def test_the_error_gradient_has_rms_about_delta_and_is_a_fixed_function(delta):
    dm = ToyBanditDataModule(reward="quadratic", k=4.0, target=0.5, critic_error=delta, critic_error_seed=3)
    q = dm.analytic_q()
    assert isinstance(q, PerturbedReward)
    a = (torch.rand(50_000, 1, generator=torch.Generator().manual_seed(0)) * 2 - 1).requires_grad_(True)
    (grad,) = torch.autograd.grad(q.error(a).sum(), a)
    assert grad.pow(2).mean().sqrt().item() == pytest.approx(delta, rel=0.35)  # 32 random features: about delta
    again = ToyBanditDataModule(reward="quadratic", k=4.0, target=0.5, critic_error=delta, critic_error_seed=3)
    torch.testing.assert_close(again.analytic_q()(None, a.detach()), q(None, a.detach()))  # seeded: same function
    true = dm.reward_fn.reward(a.detach())
    torch.testing.assert_close(q(None, a.detach())[0] - true, q.error(a.detach()))


def test_without_error_the_critic_is_the_reward_and_evaluation_always_scores_the_true_reward():
    assert isinstance(ToyBanditDataModule(reward="quadratic").analytic_q(), AnalyticReward)
    dm = ToyBanditDataModule(reward="quadratic", k=4.0, target=0.5, critic_error=4.0, eval_samples=8)
    out = dm.make_evaluator().evaluate(lambda obs: torch.full((obs.shape[0], 1), 0.5))
    assert torch.all(out["return"] == 0.0)  # at the true optimum; the error would move it


def test_a_grid_with_numeric_tasks_gets_final_values_plotted_against_them(tmp_path):
    runs = [Run(agent, task, seed, ("cfg.yaml",), (), tmp_path / agent / task / f"seed{seed}")
            for agent in ("trqam", "qam") for task in ("0.0", "1.0") for seed in (0, 1)]  # fmt: skip
    grid = Grid("sweep", tmp_path, runs)
    finals = {(agent, task, tag): [1.0, 2.0] for agent in ("trqam", "qam") for task in ("0.0", "1.0")
              for tag in ("eval/return", "eval/action_mean", "dual/kl")}  # fmt: skip
    written = plot_sweep(grid, finals, {("trqam", "0.0"): 3.0, ("trqam", "1.0"): 3.0}, tmp_path)
    assert sorted(p.name for p in written) == [
        "sweep_dual_kl.png",
        "sweep_eval_action_mean.png",
        "sweep_eval_return.png",
    ]
    assert all(Path(p).stat().st_size > 10_000 for p in written)
    named = Grid("named", tmp_path, [Run("a", "task1", 0, ("cfg.yaml",), (), tmp_path)])
    assert plot_sweep(named, {("a", "task1", "eval/return"): [1.0]}, {}, tmp_path) == []  # not a sweep
