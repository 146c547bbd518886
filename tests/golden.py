"""Load the recorded official TRQAM / QAM update (tests/fixtures/golden) into the project's networks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from trqam_lit.nets import CriticEnsemble, VelocityField

GOLDEN_DIR = Path(__file__).parent / "fixtures" / "golden"


def load(agent: str) -> tuple[dict[str, np.ndarray], dict]:
    arrays = dict(np.load(GOLDEN_DIR / f"{agent}-update.npz"))
    meta = json.loads((GOLDEN_DIR / f"{agent}-update.json").read_text())
    return arrays, meta


def t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=np.float32).copy())


def actor_param_map(net: VelocityField, prefix: str) -> dict[str, torch.nn.Parameter]:
    """flax leaf name -> (torch parameter, transpose?) for a velocity field."""
    out = {}
    for i, lin in enumerate([*net.mlp.hidden, net.mlp.out]):
        out[f"{prefix}/mlp/Dense_{i}/kernel"] = (lin.weight, True)
        out[f"{prefix}/mlp/Dense_{i}/bias"] = (lin.bias, False)
    if net.mlp.norms is not None:
        for i, ln in enumerate(net.mlp.norms):
            out[f"{prefix}/mlp/LayerNorm_{i}/scale"] = (ln.weight, False)
            out[f"{prefix}/mlp/LayerNorm_{i}/bias"] = (ln.bias, False)
    return out


def critic_param_map(net: CriticEnsemble, prefix: str) -> dict[str, torch.nn.Parameter]:
    out = {}
    for i, lin in enumerate([*net.hidden, net.out]):
        out[f"{prefix}/value_net/Dense_{i}/kernel"] = (lin.weight, False)  # (E, in, out) both sides
        out[f"{prefix}/value_net/Dense_{i}/bias"] = (lin.bias, False)
    if net.norms is not None:
        for i, ln in enumerate(net.norms):
            out[f"{prefix}/value_net/LayerNorm_{i}/scale"] = (ln.weight, False)
            out[f"{prefix}/value_net/LayerNorm_{i}/bias"] = (ln.bias, False)
    return out


def flax_to_torch(x: np.ndarray, transpose: bool) -> torch.Tensor:
    x = t(x)
    return x.T.contiguous() if transpose else x


class GoldenNets:
    """The five networks of the recorded agent with its ``params_before`` loaded."""

    def __init__(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        cfg = meta["config"]
        obs_dim = arrays["batch/observations"].shape[-1]
        act = arrays["batch/actions"]
        chunk = act.shape[1] * act.shape[2]
        hid = tuple(cfg["actor_hidden_dims"])
        vhid = tuple(cfg["value_hidden_dims"])

        def actor() -> VelocityField:
            return VelocityField(obs_dim, chunk, hid, layer_norm=cfg["actor_layer_norm"])

        def critic() -> CriticEnsemble:
            return CriticEnsemble(obs_dim, chunk, cfg["num_qs"], vhid, layer_norm=cfg["value_layer_norm"])

        self.v_ft, self.v_bc, self.v_base = actor(), actor(), actor()
        self.critic, self.target_critic = critic(), critic()
        self.maps = {
            "actor_fast": actor_param_map(self.v_ft, "actor_fast"),
            "actor_slow": actor_param_map(self.v_bc, "actor_slow"),
            "target_actor_slow": actor_param_map(self.v_base, "target_actor_slow"),
            "critic": critic_param_map(self.critic, "critic"),
            "target_critic": critic_param_map(self.target_critic, "target_critic"),
        }
        self.load("params_before", arrays)

    def load(self, group: str, arrays: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for net_map in self.maps.values():
                for leaf, (param, tr) in net_map.items():
                    value = flax_to_torch(arrays[f"{group}/{leaf}"], tr)
                    assert value.shape == param.shape, (leaf, value.shape, param.shape)
                    param.copy_(value)

    def leaves(self, net: str):
        """(flax leaf name, torch parameter, transpose?) for one recorded network."""
        for leaf, (param, tr) in self.maps[net].items():
            yield leaf, param, tr
