"""The verify entry point: its JSON contract, argument checking and plumbing (the math is in test_closed_forms)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from helpers import one_torch_thread  # noqa: F401 (autouse fixture)
from trqam_lit.tools import verify
from trqam_lit.tools.verify import affine_control_field, gaussian_linear, gaussian_quadratic, gaussian_velocity

LINEAR_CONTRACT = [
    "base_terminal_mean",
    "base_terminal_std",
    "adjoint",
    "grid",
    "path_kl",
    "tilted_mean",
    "base_terminal_mean_exact",
    "base_terminal_std_exact",
    "adjoint_exact",
    "path_kl_exact",
    "tilted_mean_exact",
    "base_terminal_mean_rel_err",
    "base_terminal_std_rel_err",
    "adjoint_rel_err",
    "path_kl_rel_err",
    "tilted_mean_rel_err",
]
QUADRATIC_CONTRACT = [
    "tilted_mean",
    "tilted_std",
    "tilted_mean_exact",
    "tilted_std_exact",
    "tilted_mean_rel_err",
    "tilted_std_rel_err",
    "iterations",
    "fixed_point_change",
]


def test_cli_gaussian_linear_k10_prints_one_json_line_with_errors_reported():
    # The one subprocess test: the real entry point. At K = 10 the discretisation errors are 10-30% and must
    # be reported (nonzero), not hidden.
    cmd = [
        sys.executable,
        "-m",
        "trqam_lit.tools.verify",
        *"gaussian-linear --mu 0.2 --s 0.8 --c 1.5 --lam 2 --num-steps 10 --samples 2000 --seed 0".split(),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True, env=env).stdout
    lines = out.strip().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    for key in LINEAR_CONTRACT:
        assert key in rec, key
    assert len(rec["adjoint"]) == len(rec["grid"]) == len(rec["adjoint_exact"]) == 10
    assert rec["grid"] == pytest.approx([i / 10 for i in range(10)])
    errs = {k: rec[k] for k in LINEAR_CONTRACT if k.endswith("_rel_err")}
    assert all(math.isfinite(e) and e > 0 for e in errs.values()), errs
    # K = 10: spec 7 says these quantities are off by 10-70%; the KL (the largest, ~30%) must show it.
    assert max(errs.values()) > 0.1, errs
    assert rec["path_kl_exact"] == pytest.approx(1.5**2 * 0.8**2 / (2 * 2.0**2))
    assert rec["tilted_mean_exact"] == pytest.approx(0.2 + 0.8**2 * 1.5 / 2.0)


def test_quadratic_record_has_contract_fields():
    rec = gaussian_quadratic(mu=0.2, s=0.8, k=2.0, target=0.5, lam=1.0, num_steps=10, samples=500, seed=0)
    for key in QUADRATIC_CONTRACT:
        assert key in rec, key
    json.dumps(rec)  # serialisable as is


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            "gaussian-linear --mu 0 --s 0 --c 1 --lam 1 --num-steps 10 --samples 10".split(),
            "--s: must be > 0",
        ),
        (
            "gaussian-linear --mu 0 --s 1 --c 1 --lam -1 --num-steps 10 --samples 10".split(),
            "--lam: must be > 0",
        ),
        (
            "gaussian-linear --mu 0 --s 1 --c 1 --lam 1 --num-steps 1 --samples 10".split(),
            "--num-steps: must be >= 2",
        ),
        (
            "gaussian-linear --mu 0 --s 1 --c 0 --lam 1 --num-steps 4 --samples 10".split(),
            "--c: must be nonzero",
        ),
        (
            "gaussian-linear --mu x --s 1 --c 1 --lam 1 --num-steps 4 --samples 10".split(),
            "--mu: 'x' is not a valid float",
        ),
        (
            "gaussian-quadratic --mu 0 --s 1 --k 0 --target 1 --lam 1 --num-steps 4 --samples 10".split(),
            "--k: must be > 0",
        ),
        (
            "gaussian-linear --mu 0 --s 1 --c 1 --lam 1 --num-steps 4 --samples 10 --dim 0".split(),
            "--dim: must be >= 1",
        ),
        (
            ["gaussian-linear", "--mu", "0", "--s", "1", "--lam", "1", "--num-steps", "4", "--samples", "10"],
            "the following arguments are required: --c",
        ),
    ],
)
def test_argument_errors_are_clear(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        verify.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_main_in_process_dim_and_solver(capsys):
    # --dim D: the same values on every axis; the torchsde solver gives the fused solver's numbers.
    argv = "gaussian-linear --mu 0.2 --s 0.8 --c 1.5 --lam 2 --num-steps 8 --samples 200 --seed 3 --dim 3".split()
    assert verify.main(argv) == 0
    fused = json.loads(capsys.readouterr().out)
    assert verify.main([*argv, "--solver", "torchsde"]) == 0
    tsde = json.loads(capsys.readouterr().out)
    assert fused["dim"] == 3 and tsde["solver"] == "torchsde"
    for key in ["base_terminal_mean", "base_terminal_std", "path_kl", "tilted_mean"]:
        assert tsde[key] == pytest.approx(fused[key], rel=1e-5, abs=1e-6), key
    assert tsde["adjoint"] == pytest.approx(fused["adjoint"], rel=1e-5, abs=1e-7)
    assert verify.main([*argv, "--no-antithetic"]) == 0
    iid = json.loads(capsys.readouterr().out)
    assert fused["antithetic"] and not iid["antithetic"]
    # i.i.d. draws: the same quantities up to Monte Carlo error (600 values, std 0.8: 4 SE ~ 0.13)
    assert iid["base_terminal_mean"] == pytest.approx(fused["base_terminal_mean"], abs=0.15)
    assert iid["adjoint"] == pytest.approx(fused["adjoint"], rel=1e-5, abs=1e-7)  # deterministic either way


def test_chunking_does_not_change_the_means(monkeypatch):
    # Antithetic pairs make the Gaussian-linear means exact functions of the discretisation, so a different
    # chunking (different draws) must give the same means to float32 rounding.
    args = dict(mu=0.3, s=1.2, c=-0.8, lam=0.7, num_steps=16, samples=600, seed=1)
    one = gaussian_linear(**args)
    monkeypatch.setattr(verify, "CHUNK_ELEMENTS", 16 * 100)
    many = gaussian_linear(**args)
    for key in ["base_terminal_mean", "tilted_mean", "tilted_sde_mean", "path_kl"]:
        assert many[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key


def test_gaussian_velocity_is_the_conditional_mean_of_the_target():
    # v(x, t) = E[a - x0 | x_t = x] for x_t = (1 - t) x0 + t a, a ~ N(mu, s^2): regress a - x0 on [x_t, 1] at a
    # few t. Tolerance 0.02: the least-squares coefficients' standard error at 200k samples is ~0.003.
    gen = torch.Generator().manual_seed(0)
    mu, s, n = 0.4, 1.3, 200_000
    v = gaussian_velocity(mu, s)
    for t in [0.0, 0.3, 0.7, 0.95]:
        x0 = torch.randn(n, generator=gen, dtype=torch.float64)
        a = mu + s * torch.randn(n, generator=gen, dtype=torch.float64)
        xt = (1 - t) * x0 + t * a
        feats = torch.stack([xt, torch.ones_like(xt)], dim=1)
        coef = torch.linalg.lstsq(feats, (a - x0)[:, None]).solution.squeeze(1)
        probe = torch.tensor([[-1.0], [0.0], [1.5]], dtype=torch.float64)
        pred = coef[0] * probe + coef[1]
        assert v(None, probe, t) == pytest.approx(pred, abs=0.02)


@pytest.mark.parametrize("dim", [1, 3])
def test_affine_control_field_broadcasts_over_the_time_shapes_the_project_uses(dim):
    # FlowSDE passes a 0-dim grid time, adjoint_matching_objective a (K, 1, 1) column, euler_ode a float;
    # a (B, 1) column must work too. All must pick the same per-step affine map.
    K, B = 5, 4
    theta = torch.randn(K, dim + 1, dim, generator=torch.Generator().manual_seed(0))
    v_base = gaussian_velocity(0.1, 0.9)
    v = affine_control_field(v_base, theta)
    xs = torch.randn(K, B, dim, generator=torch.Generator().manual_seed(1))
    grid = torch.arange(K, dtype=torch.float32) / K
    stacked = v(None, xs, grid.reshape(K, 1, 1))
    for i in range(K):
        expect = v_base(None, xs[i], grid[i]) + xs[i] @ theta[i, :dim] + theta[i, dim]
        assert stacked[i] == pytest.approx(expect, abs=1e-5)
        assert v(None, xs[i], grid[i]) == pytest.approx(expect, abs=1e-5)
        assert v(None, xs[i], i / K) == pytest.approx(expect, abs=1e-5)
        assert v(None, xs[i], grid[i].expand(B, 1)) == pytest.approx(expect, abs=1e-5)
