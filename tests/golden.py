"""The recorded official updates (tests/fixtures/golden: every agent) loaded into the project's networks, and the
harness of the golden tests: recorded draws, batch, Adam state, one real Trainer step, tolerances."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from trqam_lit.math.nets import CriticEnsemble, LogParam, OneStepPolicy, StateValue, TanhGaussianPolicy, VelocityField
from trqam_lit.math.targets import polyak_update

GOLDEN_DIR = Path(__file__).parent / "fixtures" / "golden"


def load(agent: str) -> tuple[dict[str, np.ndarray], dict]:
    arrays = dict(np.load(GOLDEN_DIR / f"{agent}-update.npz"))
    meta = json.loads((GOLDEN_DIR / f"{agent}-update.json").read_text())
    return arrays, meta


def t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=np.float32).copy())


def dense_param_map(mlp, prefix: str, transpose: bool) -> dict[str, tuple[torch.nn.Parameter, bool]]:
    """flax leaf name -> (torch parameter, transpose?) for the ``Dense_i`` then ``LayerNorm_i`` leaves of an MLP
    (``hidden``, ``out``, ``norms``) under ``prefix``; ``transpose``: the kernels are flax's (in, out)."""
    out = {}
    for i, lin in enumerate([*mlp.hidden, mlp.out]):
        out[f"{prefix}/Dense_{i}/kernel"] = (lin.weight, transpose)
        out[f"{prefix}/Dense_{i}/bias"] = (lin.bias, False)
    if mlp.norms is not None:
        for i, ln in enumerate(mlp.norms):
            out[f"{prefix}/LayerNorm_{i}/scale"] = (ln.weight, False)
            out[f"{prefix}/LayerNorm_{i}/bias"] = (ln.bias, False)
    return out


def actor_param_map(net: VelocityField, prefix: str) -> dict[str, tuple[torch.nn.Parameter, bool]]:
    """flax leaf name -> (torch parameter, transpose?) for a velocity field."""
    return dense_param_map(net.mlp, f"{prefix}/mlp", transpose=True)


def critic_param_map(net: CriticEnsemble, prefix: str) -> dict[str, tuple[torch.nn.Parameter, bool]]:
    """A critic ensemble: kernels (E, in, out) both sides; CGQL's Q(s, a, t) is an ActorVectorField (flax ``mlp``)."""
    return dense_param_map(net, f"{prefix}/mlp" if net.time_input else f"{prefix}/value_net", transpose=False)


def value_param_map(net: StateValue, prefix: str) -> dict[str, tuple[torch.nn.Parameter, bool]]:
    """A state value net (IFQL's ``value``: flax ``value_net``, no ensemble axis, kernels (in, out))."""
    return dense_param_map(net.mlp, f"{prefix}/value_net", transpose=True)


# The recorded networks of each baseline agent: flax module name -> attribute of the LightningModule.
AGENT_NETS = {
    "fql": {"actor_bc_flow": "v_bc", "actor_onestep_flow": "mu", "critic": "critic", "target_critic": "target_critic"},
    "ifql": {"actor_flow": "v_bc", "value": "value", "critic": "critic", "target_critic": "target_critic"},
}
# QAM-F / QAM-E: QAM's networks (the records' target_actor_fast is never used) and the variant's own
_QAM_NETS = {"actor_fast": "v_ft", "actor_slow": "v_bc", "target_actor_slow": "v_base", "critic": "critic"}
_QAM_NETS["target_critic"] = "target_critic"
AGENT_NETS["trqam"] = AGENT_NETS["qam"] = _QAM_NETS
AGENT_NETS["qam-f"] = {**_QAM_NETS, "one_step_actor": "mu"}
AGENT_NETS["qam-e"] = {**_QAM_NETS, "edit_actor": "edit_policy", "edit_alpha": "edit_alpha"}
AGENT_NETS["dsrl"] = {"actor_bc_flow": "v_bc", "target_actor_bc_flow": "v_base", "actor": "actor", "alpha": "alpha",
                      "z_critic": "z_critic", "critic": "critic", "target_critic": "target_critic"}  # fmt: skip
# The networks the reference's optimizer trains (every other recorded network is a polyak target).
AGENT_ONLINE = {"fql": ("critic", "actor_bc_flow", "actor_onestep_flow"), "ifql": ("critic", "actor_flow", "value")}
AGENT_ONLINE["trqam"] = AGENT_ONLINE["qam"] = ("critic", "actor_slow", "actor_fast")
AGENT_ONLINE["qam-f"] = ("critic", "actor_slow", "actor_fast", "one_step_actor")
AGENT_ONLINE["qam-e"] = ("critic", "actor_slow", "actor_fast", "edit_actor", "edit_alpha")
AGENT_ONLINE["dsrl"] = ("critic", "z_critic", "actor_bc_flow", "actor", "alpha")
# CGQL: the time-conditioned critic Q(s, a, t) (flax module ``mlp``) and its target, the BC flow and its target
AGENT_NETS["cgql"] = {"actor": "v_bc", "target_actor": "v_base", "critic": "critic", "target_critic": "target_critic"}
AGENT_ONLINE["cgql"] = ("critic", "actor")


def qam_e_param_map(net: TanhGaussianPolicy | LogParam, prefix: str) -> dict[str, torch.nn.Parameter]:
    """QAM-E's edit policy (flax ``TanhNormal``: ``MLP_0`` then the two heads) or its temperature (``LogParam``)."""
    if isinstance(net, LogParam):
        return {f"{prefix}/log_value": (net.log_value, False)}
    out = {}
    for i, lin in enumerate(net.hidden):
        out[f"{prefix}/MLP_0/Dense_{i}/kernel"] = (lin.weight, True)
        out[f"{prefix}/MLP_0/Dense_{i}/bias"] = (lin.bias, False)
    for head, lin in (("OutputDenseMean", net.mean), ("OutputDenseLogStd", net.log_std)):
        out[f"{prefix}/{head}/kernel"] = (lin.weight, True)
        out[f"{prefix}/{head}/bias"] = (lin.bias, False)
    return out


def param_maps(owner, nets: dict[str, str]) -> dict[str, dict]:
    """flax network name -> {flax leaf name: (torch parameter, transpose?)} for the attributes ``nets`` names."""
    maps = {}
    for flax_name, attr in nets.items():
        net = getattr(owner, attr)
        if isinstance(net, (TanhGaussianPolicy, LogParam)):
            maps[flax_name] = qam_e_param_map(net, flax_name)
            continue
        if isinstance(net, StateValue):
            maps[flax_name] = value_param_map(net, flax_name)
            continue
        maps[flax_name] = (critic_param_map if isinstance(net, CriticEnsemble) else actor_param_map)(net, flax_name)
    return maps


def load_params(maps: dict[str, dict], arrays: dict[str, np.ndarray], group: str = "params_before") -> None:
    """Copy the recorded ``group`` (params_before / params_after) into the mapped torch parameters."""
    with torch.no_grad():
        for net_map in maps.values():
            for leaf, (param, tr) in net_map.items():
                value = flax_to_torch(arrays[f"{group}/{leaf}"], tr)
                assert value.shape == param.shape, (leaf, value.shape, param.shape)
                param.copy_(value)


def record_shapes(arrays: dict[str, np.ndarray], meta: dict) -> dict:
    """obs_dim, the flattened chunk dim and the network options of a record, for building its networks."""
    cfg = meta["config"]
    act = arrays["batch/actions"]
    return {
        "obs_dim": arrays["batch/observations"].shape[-1],
        "action_dim": act.shape[1] * act.shape[2],
        "hidden_dims": tuple(cfg["actor_hidden_dims"]),
        "layer_norm": cfg["actor_layer_norm"],
    }


def velocity_field(arrays: dict[str, np.ndarray], meta: dict) -> VelocityField:
    return VelocityField(**record_shapes(arrays, meta))


def onestep_policy(arrays: dict[str, np.ndarray], meta: dict) -> OneStepPolicy:
    return OneStepPolicy(**record_shapes(arrays, meta))


def critic_ensemble(arrays: dict[str, np.ndarray], meta: dict, time_input: bool = False) -> CriticEnsemble:
    cfg, shapes = meta["config"], record_shapes(arrays, meta)
    return CriticEnsemble(shapes["obs_dim"], shapes["action_dim"], cfg["num_qs"], tuple(cfg["value_hidden_dims"]),
                          layer_norm=cfg["value_layer_norm"], time_input=time_input)  # fmt: skip


def state_value(arrays: dict[str, np.ndarray], meta: dict) -> StateValue:
    cfg = meta["config"]
    return StateValue(record_shapes(arrays, meta)["obs_dim"], tuple(cfg["value_hidden_dims"]), cfg["value_layer_norm"])


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
        load_params(self.maps, arrays, group)

    def leaves(self, net: str):
        """(flax leaf name, torch parameter, transpose?) for one recorded network."""
        for leaf, (param, tr) in self.maps[net].items():
            yield leaf, param, tr


# ---- hyperparameters: everything the tests build comes from the record ----------------------------------------------

# The reference's constants that its config does not hold: optax.adam(lr) with its defaults (b1 0.9, b2 0.999,
# eps 1e-8, eps_root 0) and optax.clip_by_global_norm(max_norm=1.0) when config clip_grad (agents/trqam.py, qam.py).
OPTAX_ADAM = {"betas": (0.9, 0.999), "eps": 1e-8}
GRAD_CLIP_NORM = 1.0


def check_reference_config(agent: str, cfg: dict) -> None:
    """The code paths of the reference this port implements: any other switch would make the record another method."""
    assert cfg["agent_name"] == ("qam" if agent in ("qam-f", "qam-e") else agent)
    expected = {"action_chunking": True, "bc_only": False, "best_of_n": 1, "clip_adj": True, "clip_grad": True,
                "target_actor": True, "use_target_grad": True}  # fmt: skip
    if agent == "fql":  # no adjoint, no clip option (plain optax.adam), no target actor
        expected = {"action_chunking": True, "bc_only": False, "best_of_n": 1}
    if agent == "ifql":  # no adjoint, no clip option, no target actor; best-of-N (num_samples) is its acting
        expected = {"action_chunking": True, "bc_only": False}
    if agent == "cgql":  # the LINEX mode, one time-conditioned critic, guidance by the target actor, no clip option
        expected = {"action_chunking": True, "bc_only": False, "best_of_n": 1, "mode": "linex", "separate": False,
                    "target_guidance": True}  # fmt: skip
    if agent == "qam-f":  # QAM with the one-step policy only
        assert cfg["fql_alpha"] > 0
        expected.update(edit_scale=0.0, residual=False)
    if agent == "qam-e":  # QAM with the edit policy only; its target entropy from the multiplier (create())
        assert cfg["edit_scale"] > 0
        expected.update(fql_alpha=0.0, residual=False)
        A = cfg["action_dim"] * cfg["horizon_length"]
        expected["edit_target_entropy"] = -cfg["edit_target_entropy_multiplier"] * A
    if agent == "qam":
        expected.update(edit_scale=0.0, fql_alpha=0.0, residual=False)  # plain QAM: no edit policy, no FQL term
    if agent == "dsrl":  # no adjoint, no clip option; the TARGET BC flow is steered; target entropy from the multiplier
        A = cfg["action_dim"] * cfg["horizon_length"]
        expected = {"action_chunking": True, "bc_only": False, "best_of_n": 1, "use_target_latent": True,
                    "target_entropy": -cfg["target_entropy_multiplier"] * A}  # fmt: skip
    for key, value in expected.items():
        assert cfg[key] == value, (key, cfg[key], value)


def dual_hparams(cfg: dict) -> dict:
    """The dual step's hyperparameters in :func:`trqam_lit.math.dual.dual_step`'s names, from the reference config."""
    return {
        "eps_kl": cfg["kl_budget"],
        "eta": cfg["eta_lambda"],
        "rho": cfg["kl_ema_coef"],  # weight of the new (clipped) KL estimate in its average
        "kl_clip": cfg["kl_clip_coef"],
        "lam_min": cfg["lambda_min"],
        "lam_max": cfg["lambda_max"],
    }


# Options of the project that have no counterpart in the reference and no effect on one finite update: a test may
# leave them at their defaults. Every other constructor argument must be passed from the record (checked).
# no effect on the numbers (gemm_backend: the GEMM kernel, the same products to float32 rounding)
NEUTRAL_HPARAMS = frozenset({"max_nonfinite_steps", "compile_step", "gemm_backend"})


def agent_hparams(agent: str, arrays: dict[str, np.ndarray], meta: dict) -> dict:
    """Every constructor argument of TRQAM / QAM / FQL / IFQL, from the record's config and harness state."""
    cfg = meta["config"]
    check_reference_config(agent, cfg)
    B, H, act = arrays["batch/actions"].shape
    assert (B, H, act) == (cfg["batch_size"], cfg["horizon_length"], cfg["action_dim"])
    ob_dims = cfg["ob_dims"] or arrays["batch/observations"].shape[1:]  # null in the IFQL record: set from the batch
    assert arrays["batch/observations"].shape == (B, *ob_dims)
    kwargs = {
        "obs_dim": ob_dims[0],
        "action_dim": cfg["action_dim"] * cfg["horizon_length"],  # action chunking: the flattened chunk
        "horizon": cfg["horizon_length"],
        "discount": cfg["discount"],
        "actor_hidden_dims": tuple(cfg["actor_hidden_dims"]),
        "actor_layer_norm": cfg["actor_layer_norm"],
        "critic_hidden_dims": tuple(cfg["value_hidden_dims"]),
        "critic_layer_norm": cfg["value_layer_norm"],
        "num_critics": cfg["num_qs"],
        "flow_steps": cfg["flow_steps"],
        "rho_q": cfg["rho"],
        "lr": cfg["lr"],
        "tau": cfg["tau"],
        # project-only switches, at the values that run the reference's algorithm
        "analytic_critic": False,
        "init_from": None,
        "bc_warmup_steps": 0,
    }
    if agent == "fql":
        kwargs.update(alpha=cfg["alpha"], grad_clip_norm=None)  # plain optax.adam: no clip
        return kwargs
    if agent == "ifql":
        kwargs.update(kappa=cfg["kappa"], best_of_n=cfg["num_samples"], grad_clip_norm=None)  # no clip
        return kwargs
    if agent == "dsrl":
        multiplier = cfg["target_entropy_multiplier"]
        kwargs.update(noise_scale=cfg["noise_scale"], target_entropy_multiplier=multiplier, grad_clip_norm=None)
        return kwargs
    if agent == "cgql":
        kwargs.update(inv_temp=cfg["inv_temp"], guidance_coef=cfg["guidance_coef"], noisy_coef=cfg["noisy_coef"],
                      isd_clip=cfg["isd_clip"], grad_clip_norm=None)  # fmt: skip
        return kwargs
    kwargs.update(grad_clip_norm=GRAD_CLIP_NORM, sde_solver="fused")
    if agent == "trqam":
        dual = dual_hparams(cfg)
        kwargs.update(
            eps_kl=dual["eps_kl"], eta=dual["eta"], kl_ema_rho=dual["rho"], kl_clip=dual["kl_clip"],
            lam_min=dual["lam_min"], lam_max=dual["lam_max"], lam_scale=cfg["lam_scale"],
            lam_init=float(arrays["dual/lam_before"]), dual_form="reference", dual_update=True,
        )  # fmt: skip
    else:
        kwargs["inv_temp"] = cfg["inv_temp"]
    if agent == "qam-f":
        kwargs["fql_alpha"] = cfg["fql_alpha"]
    if agent == "qam-e":
        multiplier = cfg["edit_target_entropy_multiplier"]
        kwargs.update(edit_scale=cfg["edit_scale"], edit_target_entropy_multiplier=multiplier)
    return kwargs


# ---- random draws ------------------------------------------------------------------------------------------------


def recorded_draws(arrays: dict[str, np.ndarray], cfg: dict) -> dict[str, torch.Tensor]:
    """The recorded draws under the names of FlowAgent.draw, with the shapes the project's functions take.

    Each must be the corresponding ``draw/NN`` in call order and have the shape the reference drew; the only
    reshapes are the documented ones: the critic's best_of_n axis (1) is dropped, and the K per-step SDE draws are
    stacked into (K, B, A) (the K-th is unused by the reference: the last step is the noiseless base ODE step).
    """
    B, A, K = cfg["batch_size"], cfg["action_dim"] * cfg["horizon_length"], cfg["flow_steps"]
    if cfg["agent_name"] == "qam" and (cfg["fql_alpha"] > 0 or cfg["edit_scale"] > 0):
        return qam_variant_draws(arrays, cfg)
    if cfg["agent_name"] == "dsrl":
        return dsrl_draws(arrays, cfg)
    if cfg["agent_name"] == "cgql":
        return cgql_draws(arrays, cfg)
    if cfg["agent_name"] == "ifql":  # the BC loss's x_0 and t are its only draws
        for name, draw, shape in (("bc/x0", "draw/00", (B, A)), ("bc/t", "draw/01", (B, 1))):
            assert arrays[name].shape == shape, (name, arrays[name].shape, shape)
            np.testing.assert_array_equal(arrays[name], arrays[draw], err_msg=f"{name} is not {draw}")
        assert "draw/02" not in arrays, "more draws recorded than the update makes"
        return {"bc/x0": t(arrays["bc/x0"]), "bc/t": t(arrays["bc/t"])}
    named = {"critic/next_noise": ("draw/00", (B, 1, A)), "bc/x0": ("draw/01", (B, A)), "bc/t": ("draw/02", (B, 1))}
    if cfg["agent_name"] == "fql":  # then only the one-step policy's z, shared by the distillation and Q terms
        named["distill/noise"] = ("draw/03", (B, A))
    for name, (draw, shape) in named.items():
        assert arrays[name].shape == shape, (name, arrays[name].shape, shape)
        np.testing.assert_array_equal(arrays[name], arrays[draw], err_msg=f"{name} is not {draw}")
    assert cfg["best_of_n"] == 1
    if cfg["agent_name"] == "fql":
        assert "draw/04" not in arrays, "more draws recorded than the update makes"
        return {
            "critic/next_noise": t(arrays["critic/next_noise"])[:, 0],
            "bc/x0": t(arrays["bc/x0"]),
            "bc/t": t(arrays["bc/t"]),
            "actor/noise": t(arrays["distill/noise"]),
        }
    am = [arrays[f"draw/{i:02d}"] for i in range(3, 4 + K)]  # x_0, then eps_0..eps_{K-1}
    assert f"draw/{4 + K:02d}" not in arrays, "more draws recorded than the update makes"
    assert all(d.shape == (B, A) for d in am), [d.shape for d in am]
    return {
        "critic/next_noise": t(arrays["critic/next_noise"])[:, 0],
        "bc/x0": t(arrays["bc/x0"]),
        "bc/t": t(arrays["bc/t"]),
        "am/x0": t(am[0]),
        "am/eps": torch.stack([t(d) for d in am[1:]]),
    }


def cgql_draws(arrays: dict[str, np.ndarray], cfg: dict) -> dict[str, torch.Tensor]:
    """CGQL's recorded draws (see recorded_draws): the next action's ODE noise (its best_of_n axis of 1 dropped), the
    noisy critic's t and noise, then the BC loss's x_0 and t."""
    B, A = cfg["batch_size"], cfg["action_dim"] * cfg["horizon_length"]
    order = {"critic/next_noise": (B, 1, A), "noisy/t": (B, 1), "noisy/noise": (B, A), "bc/x0": (B, A), "bc/t": (B, 1)}
    assert f"draw/{len(order):02d}" not in arrays and f"draw/{len(order) - 1:02d}" in arrays, "draw count"
    out = {}
    for i, (name, shape) in enumerate(order.items()):
        value = arrays[f"draw/{i:02d}"]
        assert value.shape == shape, (name, value.shape, shape)
        if name in arrays:  # the readable alias the record gives it
            np.testing.assert_array_equal(arrays[name], value, err_msg=name)
        out[name] = t(value)
    assert cfg["best_of_n"] == 1
    out["critic/next_noise"] = out["critic/next_noise"][:, 0]
    return out


UNIFORM_DRAWS = frozenset({"bc/t"})  # jax.random.uniform in the record; every other draw is jax.random.normal


def recorded_draw(draws: dict[str, torch.Tensor], uniform_names=UNIFORM_DRAWS, flow_steps: int | None = None):
    """A ``draw_source`` (trqam_lit.agents.draws.RandomStreams) ``(name, shape, uniform) -> Tensor`` that hands out
    the recorded draw by name; a draw of another shape or kind fails instead of being reshaped. With ``flow_steps`` K,
    an ``am/eps`` asked for as K-1 steps gets the documented slice (the reference's K-th per-step draw is never used).
    """

    def draw(name: str, shape: tuple[int, ...], uniform: bool) -> torch.Tensor:
        value = draws[name]
        assert uniform == (name in uniform_names), f"{name}: uniform={uniform} but the record drew the other kind"
        if flow_steps is not None and name == "am/eps" and tuple(shape) == (flow_steps - 1, *value.shape[1:]):
            value = value[: flow_steps - 1]
        assert tuple(shape) == value.shape, f"{name}: asked for {tuple(shape)}, recorded {tuple(value.shape)}"
        return value

    return draw


# ---- comparing one update's changes -------------------------------------------------------------------------------


def assert_change_close(
    after: torch.Tensor | np.ndarray,
    before: np.ndarray,
    recorded_after: np.ndarray,
    rtol: float,
    atol: float,
    what: str,
) -> None:
    """(after - before) against the recorded (after - before), elementwise, in float64 of the float32 values.

    Comparing the change rather than the values is what makes the test see a step of size ~lr on weights of size
    ~1: the tolerance is set against the change's own scale (see the callers for the numbers).
    """
    if torch.is_tensor(after):
        after = after.detach().cpu().numpy()
    before = np.asarray(before, dtype=np.float32)
    assert after.shape == before.shape == recorded_after.shape, (what, after.shape, before.shape, recorded_after.shape)
    got = after.astype(np.float64) - before.astype(np.float64)
    expected = recorded_after.astype(np.float64) - before.astype(np.float64)
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol, err_msg=f"change of {what}")


def update_tolerance(recorded_after: np.ndarray, target: bool = False) -> dict[str, float]:
    """Tolerance on one leaf's change over the update (parameters, targets, Adam moments).

    The recorded change is the difference of two float32 values of the leaf's size, so it is known only to about one
    ulp of the leaf's largest value (<= 1.2e-7 for the weights here, |w| <= 1.33): the atol is counted in those ulps.
    Trained leaves and Adam moments: rtol 1e-3 of the recorded change, 10x the spec's float32 agreement of 1e-4 (the
    gradients agree to ~1e-5), and 4 ulps (our float32 update lands within 0.9 ulp on every leaf). Targets
    (``target=True``): tau * online_old + (1 - tau) * target_old has no gradient in it, and the record matches it
    exactly, so 1 ulp and no rtol; the post-step mix, tau * (p_new - p_old) <= 2.5e-6 away, fails it.
    """
    ulp = float(np.spacing(np.abs(recorded_after).astype(np.float32).max()))
    return {"rtol": 0.0, "atol": ulp} if target else {"rtol": 1e-3, "atol": 4.0 * ulp}


def qam_variant_draws(arrays: dict[str, np.ndarray], cfg: dict) -> dict[str, torch.Tensor]:
    """QAM-F's and QAM-E's recorded draws under FlowAgent.draw's names (see recorded_draws).

    In call order: the critic's next-action noise (QAM-E: then its edit eps), BC x_0 and t, the K + 1 AM draws, then
    QAM-F's one-step noise z, or QAM-E's flow noise and edit eps. tfp's tanh-Gaussian draws its normals action axis
    first, (A, B[, 1]): the eps of sample (b, d) is draw[d, b], so the documented moveaxis(draw, 0, -1) puts them in
    the (B, A) layout of the project's draws.
    """
    B, A, K = cfg["batch_size"], cfg["action_dim"] * cfg["horizon_length"], cfg["flow_steps"]
    edit = cfg["edit_scale"] > 0
    order = ["critic/next_noise", *(["critic/next_edit_eps"] if edit else []), "bc/x0", "bc/t"]
    order += ["am/x0", *(f"am/eps{i}" for i in range(K))]  # eps_K-1 is unused by the reference (the base ODE step)
    order += ["edit/base_noise", "edit/eps"] if edit else ["fql/noise"]
    assert f"draw/{len(order):02d}" not in arrays and f"draw/{len(order) - 1:02d}" in arrays, "draw count"
    drawn = {name: arrays[f"draw/{i:02d}"] for i, name in enumerate(order)}
    shapes = {"critic/next_noise": (B, 1, A), "critic/next_edit_eps": (A, B, 1), "bc/t": (B, 1), "edit/eps": (A, B)}
    for name, value in drawn.items():
        assert value.shape == shapes.get(name, (B, A)), (name, value.shape)
        if name in arrays:  # the readable alias the record gives it
            np.testing.assert_array_equal(arrays[name], value, err_msg=name)
    out = {
        "critic/next_noise": t(drawn["critic/next_noise"])[:, 0],
        "bc/x0": t(drawn["bc/x0"]),
        "bc/t": t(drawn["bc/t"]),
        "am/x0": t(drawn["am/x0"]),
        "am/eps": torch.stack([t(drawn[f"am/eps{i}"]) for i in range(K)]),
    }
    if not edit:
        out["actor/noise"] = t(drawn["fql/noise"])
        return out
    out["critic/next_edit_eps"] = t(np.moveaxis(drawn["critic/next_edit_eps"], 0, -1))[:, 0]
    out["edit/noise"] = t(drawn["edit/base_noise"])
    out["edit/eps"] = t(np.moveaxis(drawn["edit/eps"], 0, -1))
    return out


def dsrl_draws(arrays: dict[str, np.ndarray], cfg: dict) -> dict[str, torch.Tensor]:
    """DSRL's recorded draws under FlowAgent.draw's names (see recorded_draws).

    In call order: the noise policy's eps' at s' (the critic's next action), the latent distillation's z, BC x_0 and
    t, then the noise policy's eps at s. The two tanh-Gaussian draws are tfp's, action axis first ((A, B, 1) with the
    critic's best_of_n axis, and (A, B)): moveaxis(draw, 0, -1) gives the (B, A) layout of the project's draws.
    """
    B, A = cfg["batch_size"], cfg["action_dim"] * cfg["horizon_length"]
    order = {"critic/next_latent_eps": (A, B, 1), "distill/noise": (B, A), "bc/x0": (B, A), "bc/t": (B, 1),
             "actor/eps": (A, B)}  # fmt: skip
    assert f"draw/{len(order):02d}" not in arrays, "more draws recorded than the update makes"
    drawn = {name: arrays[f"draw/{i:02d}"] for i, name in enumerate(order)}
    for name, shape in order.items():
        assert drawn[name].shape == shape, (name, drawn[name].shape, shape)
        np.testing.assert_array_equal(arrays[name], drawn[name], err_msg=name)  # the readable alias
    assert cfg["best_of_n"] == 1
    return {
        "critic/next_noise": t(np.moveaxis(drawn["critic/next_latent_eps"], 0, -1))[:, 0],
        "distill/noise": t(drawn["distill/noise"]),
        "bc/x0": t(drawn["bc/x0"]),
        "bc/t": t(drawn["bc/t"]),
        "actor/eps": t(np.moveaxis(drawn["actor/eps"], 0, -1)),
    }


def assert_params_and_adam_match(
    arrays: dict[str, np.ndarray],
    opt: torch.optim.Optimizer,
    maps: dict[str, dict[str, tuple[torch.Tensor, bool]]],
    targets: tuple[str, ...],
    moment_tolerance=None,
    check_count: bool = True,
) -> None:
    """Every recorded parameter's change, and each trained one's Adam moments (and step count), against the record.

    ``maps``: network -> {record leaf: (parameter, transposed)}; ``targets``: networks that are polyak targets (no Adam
    state). ``moment_tolerance(leaf, key, recorded_after)`` widens the moments' tolerance (default update_tolerance).
    """
    for name, net_map in maps.items():
        for leaf, (p, tr) in net_map.items():
            before, after = arrays[f"params_before/{leaf}"], arrays[f"params_after/{leaf}"]
            tol = update_tolerance(after, target=name in targets)
            assert_change_close(p.T if tr else p, before, after, **tol, what=f"param {leaf}")
            if name in targets:
                continue
            state = opt.state[p]
            if check_count:
                assert int(state["step"]) == int(arrays["adam_count_after"]), (leaf, state["step"])
            for key, rec in (("exp_avg", "adam_mu"), ("exp_avg_sq", "adam_nu")):
                got = state[key].T if tr else state[key]
                before, after = arrays[f"{rec}_before/{leaf}"], arrays[f"{rec}_after/{leaf}"]
                tol = moment_tolerance(leaf, key, after) if moment_tolerance else update_tolerance(after)
                assert_change_close(got, before, after, **tol, what=f"{key} {leaf}")


# ---------------------------------------------------------------- the harness of the golden Trainer-step tests

RTOL = 1e-4


def close(actual: torch.Tensor, expected: np.ndarray, what: str, rtol: float = RTOL, atol: float = 1e-5) -> None:
    actual = actual.detach().float().cpu().numpy()
    expected = np.asarray(expected, dtype=np.float32)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


def recorded_batch(a: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The batch as the DataModule hands it to an agent: the chunk flattened, the chunk's last reward/mask/valid/s'."""
    B = a["batch/actions"].shape[0]
    return {
        "observations": t(a["batch/observations"]),
        "actions": t(a["batch/actions"]).reshape(B, -1),
        "rewards": t(a["batch/rewards"])[:, -1],
        "masks": t(a["batch/masks"])[:, -1],
        "valid": t(a["batch/valid"])[:, -1],
        "next_observations": t(a["batch/next_observations"])[:, -1],
    }


def random_batch(B: int = 5, obs: int = 4, act: int = 6) -> dict[str, torch.Tensor]:
    """A small seeded batch for gradient-isolation and acting tests."""
    gen = torch.Generator().manual_seed(1)
    return {
        "observations": torch.randn(B, obs, generator=gen),
        "actions": torch.rand(B, act, generator=gen) * 2 - 1,
        "rewards": -torch.rand(B, generator=gen),
        "masks": torch.ones(B),
        "valid": torch.ones(B),
        "next_observations": torch.randn(B, obs, generator=gen),
    }


def capture_calls(net: torch.nn.Module) -> list:
    """(inputs..., output, whether the output carries a graph) of every forward call of ``net``."""
    calls = []

    def hook(module, args, out):
        calls.append((*(x.detach() if torch.is_tensor(x) else x for x in args), out.detach(), out.requires_grad))

    net.register_forward_hook(hook)
    return calls


def set_adam_state(opt: torch.optim.Optimizer, maps: dict[str, dict], online, arrays, count: float) -> None:
    """The recorded Adam moments (``adam_mu_before`` / ``adam_nu_before``) and ``count`` as ``opt``'s state of every
    parameter of the ``online`` networks."""
    for flax_name in online:
        for leaf, (param, tr) in maps[flax_name].items():
            opt.state[param] = {
                "step": torch.tensor(float(count)),
                "exp_avg": flax_to_torch(arrays[f"adam_mu_before/{leaf}"], tr),
                "exp_avg_sq": flax_to_torch(arrays[f"adam_nu_before/{leaf}"], tr),
            }


def adam_state_callback(maps, arrays, online, count: int):
    """A callback that sets the recorded Adam moments and count of the ``online`` networks before the one step."""
    import lightning.pytorch as pl

    class AdamState(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            (opt,) = trainer.optimizers
            set_adam_state(opt, maps, online, arrays, count)

    return AdamState()


def one_trainer_step(model, maps, batch, arrays, online, count: int, precision: str = "32-true"):
    """One real Trainer step of ``model`` on the recorded batch, from the recorded Adam state; returns the Trainer."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    trainer = pl.Trainer(
        max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1, precision=precision,
        callbacks=[adam_state_callback(maps, arrays, online, count)],
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=DataLoader([batch], batch_size=None))
    return trainer


def assert_reference_adam(opt: torch.optim.Optimizer, cfg: dict, maps: dict[str, dict], online) -> None:
    """The reference's optax.adam(lr) (no weight decay) over exactly the ``online`` networks' parameters."""
    assert opt.defaults["lr"] == cfg["lr"] and opt.defaults["betas"] == OPTAX_ADAM["betas"]
    assert opt.defaults["eps"] == OPTAX_ADAM["eps"] and opt.defaults["weight_decay"] == 0
    assert not opt.defaults["amsgrad"] and not opt.defaults["maximize"]
    trained = {id(p) for group in opt.param_groups for p in group["params"]}
    assert trained == {id(p) for name in online for p, _ in maps[name].values()}


def keep_output(model, method: str, attr: str | tuple[str, int]) -> None:
    """Wrap ``model.<method>`` on the instance (its class is untouched) so that each call keeps its output on the
    model as ``attr``, or for ``(attr, index)`` one element of a tuple output."""
    name, index = (attr, None) if isinstance(attr, str) else attr
    original = getattr(model, method)  # the bound method of the class

    def kept(*args, **kwargs):
        out = original(*args, **kwargs)
        setattr(model, name, out if index is None else out[index])
        return out

    setattr(model, method, kept)


def recorded_agent_of(cls: type, record: str, keep: dict, make_draw=None, agent: str | None = None, **overrides):
    """Agent ``cls`` as the record ``record`` starts its update, ready for one Trainer step.

    Built with the record's hyperparameters (``agent_hparams``, then ``overrides``; every one of them set, nothing else
    but NEUTRAL_HPARAMS) and weights. Its ``draw_source`` is ``make_draw(arrays, config)`` (default: ``recorded_draw``
    of ``recorded_draws`` with the record's flow_steps), and ``model.draw_calls`` lists the names it was asked for.
    Each method named in ``keep`` keeps its output on the model (keep_output): method -> attribute, or (attribute,
    index) for one element of a tuple output. The model is of class ``cls`` itself. Returns (model, maps, batch,
    arrays, meta).
    """
    arrays, meta = load(record)
    hparams = {**agent_hparams(agent or record, arrays, meta), **overrides}
    make_draw = make_draw or (lambda a, cfg: recorded_draw(recorded_draws(a, cfg), flow_steps=cfg["flow_steps"]))
    draw = make_draw(arrays, meta["config"])
    model = cls(**hparams)
    assert type(model) is cls  # no subclass: the recorded draws and kept outputs are set on the instance
    assert set(model.hparams) - set(hparams) <= NEUTRAL_HPARAMS, sorted(set(model.hparams) - set(hparams))
    assert {k: model.hparams[k] for k in hparams} == hparams
    model.draw_calls = []

    def draw_source(name: str, shape: tuple[int, ...], uniform: bool) -> torch.Tensor:
        value = draw(name, shape, uniform)
        model.draw_calls.append(name)
        return value.to(model.device)

    model.draw_source = draw_source
    for method, attr in keep.items():
        keep_output(model, method, attr)
    maps = param_maps(model, AGENT_NETS[agent or record])
    load_params(maps, arrays)
    return model, maps, recorded_batch(arrays), arrays, meta


# ---------------------------------------------------------------- the harness of the by-hand updates (pure functions)


def load_checked(record: str, agent: str | None = None) -> tuple[dict[str, np.ndarray], dict, dict]:
    """(arrays, meta, config) of ``record``, its config checked to take the code paths of ``agent`` (default: the
    record's) in the reference (check_reference_config)."""
    arrays, meta = load(record)
    check_reference_config(agent or record, meta["config"])
    return arrays, meta, meta["config"]


def recorded_networks(agent: str, arrays: dict[str, np.ndarray], **nets: torch.nn.Module):
    """(namespace, maps): the networks ``nets`` under the agent's attribute names, with the record's
    ``params_before`` loaded, and their param_maps (flax names of AGENT_NETS[agent])."""
    namespace = SimpleNamespace(**nets)
    maps = param_maps(namespace, AGENT_NETS[agent])
    load_params(maps, arrays)
    return namespace, maps


def reference_adam_step(params, maps: dict[str, dict], online, arrays, meta: dict) -> torch.optim.Adam:
    """One step of the reference's optax.adam(lr) on ``params``, from the recorded Adam state (moments and count) of
    the ``online`` networks' parameters; returns the optimizer."""
    opt = torch.optim.Adam(params, lr=meta["config"]["lr"], **OPTAX_ADAM)
    count = float(meta["state_set_by_harness"]["adam_count"])
    assert count == float(arrays["adam_count_before"])
    set_adam_state(opt, maps, online, arrays, count)
    opt.step()
    return opt


def step_by_hand(up, agent: str, polyak: tuple[tuple[str, str], ...], clip: float | None = None) -> None:
    """The step of a by-hand update ``up`` (``nets``, ``maps``, ``cfg``, ``arrays``, ``meta``) after its loss
    ``up.total``, kept on ``up``: backward; the online networks' gradients by leaf (``grads``: network -> {leaf:
    gradient}) and the targets' (``target_grads``); their global norm (``grad_norm``), then the clip to ``clip`` if
    given; polyak of each (target, online) pair (flax names) with the pre-step weights; Adam (``opt``)."""
    nets, online = {flax: getattr(up.nets, attr) for flax, attr in AGENT_NETS[agent].items()}, AGENT_ONLINE[agent]
    params = [p for name in online for p in nets[name].parameters()]
    up.total.backward()
    up.grads = {name: {leaf: p.grad.clone() for leaf, (p, _) in up.maps[name].items()} for name in online}
    up.target_grads = [p.grad for name, net in nets.items() if name not in online for p in net.parameters()]
    if clip is None:
        up.grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    else:
        up.grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm=clip)
    for target, source in polyak:
        polyak_update(nets[target], nets[source], up.cfg["tau"])
    up.opt = reference_adam_step(params, up.maps, online, up.arrays, up.meta)
