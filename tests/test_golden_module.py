"""The recorded official update through the real LightningModule and Trainer (hooks, clip, polyak, Adam, dual).

tests/test_golden.py runs the pure functions in the reference's order by hand; this test lets Lightning run
them: training_step -> backward -> clip -> polyak -> Adam -> dual step, with the recorded weights, Adam state,
lambda, KL average and random draws, and compares every parameter and buffer after the step.
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from golden import actor_param_map, critic_param_map, flax_to_torch, load, t
from trqam_lit.agents import QAM, TRQAM

NETS = {"actor_fast": "v_ft", "actor_slow": "v_bc", "target_actor_slow": "v_base", "critic": "critic",
        "target_critic": "target_critic"}  # fmt: skip


def recorded_agent(agent: str):
    arrays, meta = load(agent)
    cfg = meta["config"]
    B, H, act = arrays["batch/actions"].shape
    cls = TRQAM if agent == "trqam" else QAM
    extra = {"eps_kl": cfg["kl_budget"]} if agent == "trqam" else {"inv_temp": cfg["inv_temp"]}
    draws = {
        "critic/next_noise": t(arrays["critic/next_noise"])[:, 0],
        "bc/x0": t(arrays["bc/x0"]),
        "bc/t": t(arrays["bc/t"]),
        "am/x0": t(arrays["draw/03"]),
        "am/eps": torch.stack([t(arrays[f"draw/{i:02d}"]) for i in range(4, 4 + cfg["flow_steps"])]),
    }

    class Recorded(cls):
        def draw(self, name, *shape, uniform=False):
            value = draws[name]
            return value[: shape[0]].reshape(shape).to(self.device)  # the SDE uses K-1 of the K eps draws

    model = Recorded(
        obs_dim=arrays["batch/observations"].shape[1], action_dim=H * act, horizon=H, discount=cfg["discount"],
        actor_hidden_dims=cfg["actor_hidden_dims"], actor_layer_norm=cfg["actor_layer_norm"],
        critic_hidden_dims=cfg["value_hidden_dims"], critic_layer_norm=cfg["value_layer_norm"],
        num_critics=cfg["num_qs"], flow_steps=cfg["flow_steps"], rho_q=cfg["rho"], lr=cfg["lr"], tau=cfg["tau"],
        **extra,
    )  # fmt: skip
    maps = {}
    for flax_name, attr in NETS.items():
        net = getattr(model, attr)
        maps[flax_name] = (critic_param_map if "critic" in flax_name else actor_param_map)(net, flax_name)
    with torch.no_grad():
        for net_map in maps.values():
            for leaf, (param, tr) in net_map.items():
                param.copy_(flax_to_torch(arrays[f"params_before/{leaf}"], tr))
        if agent == "trqam":
            model.dual.lam.fill_(float(arrays["dual/lam_before"]))
            model.dual.kl_ema.fill_(float(arrays["dual/kl_ema_before"]))
    batch = {
        "observations": t(arrays["batch/observations"]),
        "actions": t(arrays["batch/actions"]).reshape(B, -1),
        "rewards": t(arrays["batch/rewards"])[:, -1],
        "masks": t(arrays["batch/masks"])[:, -1],
        "valid": t(arrays["batch/valid"])[:, -1],
        "next_observations": t(arrays["batch/next_observations"])[:, -1],
    }
    return model, maps, batch, arrays, meta


class AdamState(pl.Callback):
    """Sets the recorded Adam moments and count before the one training step."""

    def __init__(self, maps, arrays, count: int) -> None:
        self.maps, self.arrays, self.count = maps, arrays, count

    def on_train_start(self, trainer, pl_module) -> None:
        (opt,) = trainer.optimizers
        for flax_name in ("critic", "actor_slow", "actor_fast"):
            for leaf, (param, tr) in self.maps[flax_name].items():
                opt.state[param] = {
                    "step": torch.tensor(float(self.count)),
                    "exp_avg": flax_to_torch(self.arrays[f"adam_mu_before/{leaf}"], tr),
                    "exp_avg_sq": flax_to_torch(self.arrays[f"adam_nu_before/{leaf}"], tr),
                }


@pytest.mark.parametrize("agent", ["trqam", "qam"])
def test_one_trainer_step_reproduces_the_recorded_update(agent):
    model, maps, batch, arrays, meta = recorded_agent(agent)
    trainer = pl.Trainer(
        max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1,
        callbacks=[AdamState(maps, arrays, meta["state_set_by_harness"]["adam_count"])],
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=DataLoader([batch], batch_size=None))
    assert model.grad_norm.item() == pytest.approx(float(arrays["grad_global_norm"]), rel=1e-4)
    for flax_name, net_map in maps.items():
        target = flax_name.startswith("target")
        for leaf, (param, tr) in net_map.items():
            got = (param.T if tr else param).detach().numpy()
            np.testing.assert_allclose(
                got, arrays[f"params_after/{leaf}"], rtol=0 if target else 1e-4, atol=2e-7 if target else 1e-6,
                err_msg=leaf,
            )  # fmt: skip
    if agent == "trqam":
        assert model.dual.lam.item() == pytest.approx(float(arrays["dual/lam_after"]), rel=1e-6)
        assert model.dual.kl_ema.item() == pytest.approx(float(arrays["dual/kl_ema_after"]), rel=1e-6)
