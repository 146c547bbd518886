"""`trqam-lit export`: a trained policy as one file that acts with torch alone (no trqam-lit, no Lightning).

The file is a ``torch.export`` program (``.pt2``) of the agent's acting policy at the checkpoint's step (the BC
policy during a BC warm-up, the fine-tuned one after it), with a JSON description stored inside it::

    import json, torch
    extra = {"trqam_lit.json": ""}
    policy = torch.export.load("policy.pt2", extra_files=extra).module()
    meta = json.loads(extra["trqam_lit.json"])
    noise = torch.randn(obs.shape[0], meta["chunk_dim"])  # meta["noise_shape"], "batch" the batch size
    chunk = policy(obs, noise)  # (B, horizon * act_dim) in [-1, 1]; reshape to (B, horizon, act_dim)

``obs`` is the environment's float32 observation batch (B, obs_dim) as the agent saw it in training (Robomimic:
normalised; ``meta["observation_normalization"]`` holds the statistics and the formula); ``noise`` is
the flow's starting noise, standard normal, so a fixed noise gives a fixed action chunk (the same numbers as the
agent's own ``policy_actions``). Any batch size works. ``load_policy`` does the above and draws the noise.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from trqam_lit import __version__
from trqam_lit.math.flow import ACTION_CLIP
from trqam_lit.training.atomic import atomic_write

FORMAT = "trqam-lit-policy/1"
META = "trqam_lit.json"


class ActingPolicy(nn.Module):
    """``forward(obs, noise) -> action chunk``: ``agent.policy_actions`` with the acting phase fixed.

    Holds a fresh copy of the agent (its networks, no Trainer, no optimizer) stripped to the networks the acting
    policy calls (an access to anything removed fails the export, never the file). Whether fine-tuning has started
    (``policy_from_bc``, a buffer the agents read with ``bool()``) becomes a Python constant, so the program has no
    data-dependent branch.
    """

    def __init__(self, agent: nn.Module) -> None:
        super().__init__()
        hparams = {k: v for k, v in dict(agent.hparams).items() if not k.startswith("_")}
        hparams["init_from"] = None  # the weights come from the agent itself
        copy = type(agent)(**hparams)
        copy.load_state_dict({k: v.detach().cpu() for k, v in agent.state_dict().items()})
        copy.eval().requires_grad_(False)
        if hparams.get("analytic_critic"):
            copy.analytic_q = _analytic_critic_refused  # the DataModule's function, not in the agent: only an error
        self.noise_shape = noise_shape_with_batch(copy)
        used = _children_called(copy, self.noise_shape)
        fine_tuned = bool(copy.policy_from_bc)
        copy._buffers.clear()  # the agent's own state (step counters, seeds, lambda): not the policy's
        copy.policy_from_bc = fine_tuned
        for name, _ in list(copy.named_children()):
            if name not in used:
                setattr(copy, name, None)  # an access would fail the export: only unused networks go
        self.agent, self.fine_tuned, self.networks = copy, fine_tuned, sorted(used)

    def forward(self, obs: Tensor, noise: Tensor) -> Tensor:
        return self.agent.policy_actions(obs, noise)


def _analytic_critic_refused(*_: Tensor) -> Tensor:
    raise ValueError(
        "this policy acts through its critic, and its run used the DataModule's analytic critic (analytic_critic: "
        "true, toy domains), a function of the DataModule that a policy file cannot hold"
    )


def noise_shape_with_batch(agent: nn.Module) -> list[int | str]:
    """The noise the acting policy takes, with the batch axis as "batch": (batch, A), or (N, batch, A) for IFQL."""
    two, three = agent.acting_noise_shape(2), agent.acting_noise_shape(3)
    return ["batch" if a != b else a for a, b in zip(two, three, strict=True)]


def _children_called(agent: nn.Module, noise_shape: list[int | str]) -> set[str]:
    """The agent's top-level networks that one acting call uses."""
    called: set[str] = set()
    hooks = [  # on every layer: a network may be used through a method of its own, not its forward
        m.register_forward_pre_hook(lambda *_, n=n: called.add(n))
        for n, child in agent.named_children()
        for m in child.modules()
    ]
    try:
        with torch.no_grad():
            agent.policy_actions(*_example_inputs(agent, noise_shape))
    finally:
        for hook in hooks:
            hook.remove()
    return called


def _sized(shape: Sequence[int | str], batch: int) -> list[int]:
    return [batch if d == "batch" else int(d) for d in shape]


def _example_inputs(agent: nn.Module, noise_shape: list[int | str], batch: int = 2) -> tuple[Tensor, Tensor]:
    return torch.zeros(batch, agent.hparams.obs_dim), torch.zeros(_sized(noise_shape, batch))


def export_policy(agent: nn.Module, path: str | Path, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``agent``'s acting policy to ``path`` (a ``.pt2`` file); returns its description (stored inside).

    ``info`` adds entries to the description (where the weights came from). Raises ``ValueError`` for an agent
    whose acting policy needs the DataModule (an analytic critic).
    """
    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"the policy file's name must end in .pt2 (torch.export's package format), got {path}")
    policy = ActingPolicy(agent)
    hp = policy.agent.hparams
    obs_dim, chunk_dim, horizon = int(hp.obs_dim), int(hp.action_dim), int(hp.horizon)
    batch = torch.export.Dim("batch", min=1)
    noise_axis = policy.noise_shape.index("batch")
    with torch.no_grad():
        program = torch.export.export(policy, _example_inputs(policy.agent, policy.noise_shape),
                                      dynamic_shapes=({0: batch}, {noise_axis: batch}))  # fmt: skip
    meta = {
        "format": FORMAT,
        "agent": type(agent).__name__,
        "policy": "fine-tuned" if policy.fine_tuned else "BC",
        "networks": policy.networks,
        "obs_dim": obs_dim,
        "horizon": horizon,
        "act_dim": chunk_dim // horizon,
        "chunk_dim": chunk_dim,
        "noise_shape": policy.noise_shape,
        "noise": "standard normal; the same noise gives the same action chunk",
        "draws_inside": policy.agent.acting_draws_noise,  # from torch's global generator (QAM-E's edit)
        "flow_steps": int(hp.flow_steps),
        "action_clip": ACTION_CLIP,
        "trqam_lit_version": __version__,
        "torch_version": torch.__version__,
        **(info or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, suffix=".pt2") as partial:  # torch.export.save wants a .pt2 name
        torch.export.save(program, partial, extra_files={META: json.dumps(meta, indent=1)})
    return meta


class LoadedPolicy:
    """An exported policy: ``policy(obs)`` draws the noise and returns action chunks (B, horizon, act_dim)."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"policy file not found: {path}")
        extra = {META: ""}
        try:
            self.module = torch.export.load(path, extra_files=extra).module()
        except Exception as err:  # torch's errors for a foreign or truncated file name neither
            raise ValueError(f"{path} is not a readable exported policy ({type(err).__name__}: {err})") from None
        if not extra[META]:
            raise ValueError(f"{path} is a torch.export program but not a trqam-lit policy (no {META} inside)")
        self.meta = json.loads(extra[META])
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{path}: policy format {self.meta.get('format')!r}, this trqam-lit reads {FORMAT!r}")

    def __call__(self, obs: Tensor, noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        obs = torch.as_tensor(obs, dtype=torch.float32)
        if obs.dim() != 2 or obs.shape[1] != self.meta["obs_dim"]:
            raise ValueError(f"obs must be (batch, {self.meta['obs_dim']}), got {tuple(obs.shape)}")
        if noise is None:
            noise = torch.randn(_sized(self.meta["noise_shape"], obs.shape[0]), generator=generator)
        chunk = self.module(obs, noise)
        return chunk.reshape(obs.shape[0], self.meta["horizon"], self.meta["act_dim"])


def load_policy(path: str | Path) -> LoadedPolicy:
    """Read a policy written by ``export_policy`` / ``trqam-lit export``."""
    return LoadedPolicy(path)


def export_checkpoint(ckpt_path: str | Path, out: str | Path) -> dict[str, Any]:
    """The acting policy of a ``trqam-lit fit`` checkpoint, written to ``out``; returns its description."""
    from trqam_lit.agents import FlowAgent
    from trqam_lit.training.checkpoint import check_checkpoint_file

    check_checkpoint_file(ckpt_path, lightning=True)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    class_path = (ckpt.get("hyper_parameters") or {}).get("_class_path", "")
    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name, None) if module.startswith("trqam_lit.") else None
    if not (isinstance(cls, type) and issubclass(cls, FlowAgent)):
        raise ValueError(f"{ckpt_path} does not name a trqam-lit agent ({class_path or 'no class path'}): "
                         "export reads checkpoints written by `trqam-lit fit`")  # fmt: skip
    agent = cls.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=False)
    data = ckpt.get("datamodule_hyper_parameters") or {}
    info = {"checkpoint": str(ckpt_path), "global_step": int(ckpt.get("global_step", -1))}
    if data.get("env_name"):  # the OGBench dataset, whose single-task environment evaluates the policy
        info["env_name"] = data["env_name"]
    for entry in ckpt.values():  # a DataModule's entry (Lightning keys it by the class name)
        if isinstance(entry, dict) and "observation_normalization" in entry:
            info["observation_normalization"] = entry["observation_normalization"]  # Robomimic: obs in the formula
    return export_policy(agent, out, info)


def main(argv: Sequence[str] | None = None) -> None:
    """``trqam-lit export CKPT [-o OUT]``."""
    parser = argparse.ArgumentParser(
        prog="trqam-lit export",
        description="Write a checkpoint's acting policy to one .pt2 file that needs only torch to act "
        '(docs/cli.md, "Exporting a policy").',
    )
    parser.add_argument("ckpt_path", help="a trqam-lit fit checkpoint (e.g. runs/.../checkpoints/last.ckpt)")
    parser.add_argument("-o", "--out", default=None, help="output file (default: the checkpoint's path with .pt2)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.ckpt_path).with_suffix(".pt2")
    try:
        meta = export_checkpoint(args.ckpt_path, out)
    except (FileNotFoundError, ValueError) as err:
        print(f"trqam-lit export: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"trqam-lit export: {meta['agent']} {meta['policy']} policy (step {meta['global_step']}) -> {out}")
    print(f"  obs ({', '.join(['batch', str(meta['obs_dim'])])}), noise ({', '.join(map(str, meta['noise_shape']))})"
          f" -> action chunk (batch, {meta['horizon']} x {meta['act_dim']})")  # fmt: skip


__all__ = ["ActingPolicy", "LoadedPolicy", "export_checkpoint", "export_policy", "load_policy", "main"]

if __name__ == "__main__":
    main(sys.argv[1:])
