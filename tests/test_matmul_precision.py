"""Opt-in reduced internal precision for float32 matmuls (``callbacks.MatmulPrecision``, issue 10 lever 5), and the
warning for ``bf16-mixed`` on a CPU that would emulate it.

The flag's mechanics (checked values, set during training, restored after, nothing cast) are tested on any CPU. That
``bf16`` really rounds the products, and that a network trained with the AM loss under it still reaches the closed
form's tilted mean (method.md section 7), need a CPU with AMX and skip elsewhere: on an AVX512-BF16 CPU without AMX
oneDNN's bf16 math mode was measured to change nothing (float32 rounding, the float32 kernel).
"""

from __future__ import annotations

import contextlib
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

import trqam_lit.training.hardware as hardware
from helpers import CONFIGS, one_torch_thread, run_cli  # noqa: F401 (autouse fixture)
from trqam_lit.agents import TRQAM
from trqam_lit.data.toy import ToyBanditDataModule
from trqam_lit.training.callbacks import MatmulPrecision

needs_amx = pytest.mark.skipif(not hardware.cpu_has_amx(), reason="oneDNN's bf16 math mode needs a CPU with AMX")


@contextlib.contextmanager
def cpu_matmul_precision(value: str):
    before = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = value
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before


def toy_fit(callback: pl.Callback | None, steps: int = 3, probe: pl.Callback | None = None, **trainer) -> TRQAM:
    pl.seed_everything(0)
    dm = ToyBanditDataModule(action_dim=2, batch_size=32, eval_samples=16, c=3.0)
    model = TRQAM(obs_dim=dm.obs_dim, action_dim=dm.chunk_dim, horizon=dm.horizon, discount=dm.discount,
                  actor_hidden_dims=(16, 16), critic_hidden_dims=(16, 16), num_critics=2)  # fmt: skip
    trainer = pl.Trainer(max_steps=steps, limit_val_batches=0, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", logger=False,
                         callbacks=[c for c in (callback, probe) if c is not None], **trainer)  # fmt: skip
    trainer.fit(model, datamodule=dm)
    return model


def test_precision_values_and_devices_are_checked():
    before = torch.backends.mkldnn.matmul.fp32_precision
    with pytest.raises(ValueError, match="precision must be"):
        MatmulPrecision("medium")
    with pytest.raises(ValueError, match="is the CUDA setting"):
        toy_fit(MatmulPrecision("tf32"))
    assert torch.backends.mkldnn.matmul.fp32_precision == before


def test_bf16_on_a_cpu_without_amx_raises(monkeypatch):
    before = torch.backends.mkldnn.matmul.fp32_precision
    monkeypatch.setattr(hardware, "cpu_has_amx", lambda: False)
    with pytest.raises(ValueError, match="needs a CPU with AMX"):
        toy_fit(MatmulPrecision("bf16"))
    assert torch.backends.mkldnn.matmul.fp32_precision == before


@pytest.mark.parametrize("precision", ["ieee", "bf16"])
def test_the_setting_holds_during_training_and_is_restored_after(monkeypatch, precision):
    before = torch.backends.mkldnn.matmul.fp32_precision
    monkeypatch.setattr(hardware, "cpu_has_amx", lambda: True)  # the flag itself, on any CPU

    class Probe(pl.Callback):
        seen: list[str] = []

        def on_train_batch_start(self, *args) -> None:
            self.seen.append(torch.backends.mkldnn.matmul.fp32_precision)

    probe = Probe()
    model = toy_fit(MatmulPrecision(precision), probe=probe)
    assert probe.seen == [precision] * 3
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    assert all(p.dtype == torch.float32 for p in model.parameters())  # nothing is cast, unlike bf16-mixed


def test_the_cli_adds_it_from_the_command_line(tmp_path):
    # The form docs/cli.md gives, through the real LightningCLI; a wrong value is a clear parse error.
    args = [
        "fit",
        "--config",
        str(CONFIGS / "toy" / "bandit.yaml"),
        "--trainer.callbacks+=trqam_lit.training.callbacks.MatmulPrecision",
    ]
    proc = run_cli([*args, "--trainer.callbacks.precision=tf32", "--print_config"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = "- class_path: trqam_lit.training.callbacks.MatmulPrecision\n    init_args:\n      precision: tf32"
    assert expected in proc.stdout
    proc = run_cli([*args, "--trainer.callbacks.precision=fp8", "--print_config"], cwd=tmp_path)
    assert proc.returncode != 0 and "fp8" in proc.stderr


@needs_amx
def test_bf16_really_rounds_the_matmul_inputs_and_accumulates_in_float32():
    # A float32 GEMM of the step's size (64 x 256 x 256) under the flag: off the float32 result by bf16 rounding of
    # its inputs (a few u = 2^-9 of the output's scale, relative per product, averaging over 256 terms), not by
    # rounding of the output or the accumulator. Expected a few 1e-3 of max |out| (not yet run: no AMX CPU so
    # far); allow 2^-7.
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 256, generator=gen), torch.randn(256, 256, generator=gen) / 16
    ref = x.double() @ w.double()
    with cpu_matmul_precision("bf16"):
        low = nn.functional.linear(x, w.T.contiguous())
    assert low.dtype == torch.float32
    exact_fp32 = float(((x @ w).double() - ref).abs().max())
    err = float((low.double() - ref).abs().max())
    assert err > 100 * exact_fp32  # really reduced
    assert err <= 2.0**-7 * float(ref.abs().max())
    rounded = x.bfloat16().double() @ w.bfloat16().double()  # what bf16 inputs with an exact accumulator give
    assert float((low.double() - rounded).abs().max()) <= 1e-4 * float(ref.abs().max())


@needs_amx
def test_network_trained_with_am_loss_under_bf16_matmul_reaches_tilted_mean():
    # tests/test_closed_forms.py::test_network_trained_with_am_loss_reaches_tilted_mean with every matmul at bf16
    # internal precision (the residual MLP's forward, the AM loss's backward, the ODE): the same bounds hold, 3% of
    # the shift against the discrete AM optimum and the K = 16 discretisation bias against mu + s^2 c / lambda_eff.
    from test_closed_forms import train_am_network_and_check_tilted_mean

    with cpu_matmul_precision("bf16"):
        train_am_network_and_check_tilted_mean()


@pytest.mark.parametrize("native", [False, True])
def test_bf16_mixed_on_a_cpu_that_would_emulate_it_warns(monkeypatch, native):
    monkeypatch.setattr(hardware, "cpu_has_bf16_gemm", lambda: native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        toy_fit(None, steps=1, precision="bf16-mixed")
    emulated = [w for w in caught if "without native bf16" in str(w.message)]
    assert len(emulated) == (0 if native else 1)
