"""The agent registry: every agent it names has its configs, a label of its own, and logs exactly the per-step scalars
its classes declare (read back from a real run's TensorBoard event file)."""

from __future__ import annotations

import glob

import pytest

from helpers import CONFIGS, read_scalars
from trqam_lit import agents
from trqam_lit.agents import AGENTS
from trqam_lit.cli import build_cli

STEPS = 3
# Logged by the CLI's callbacks, not by the agent.
CLI_SCALARS = {"epoch", "perf/steps_per_sec"}


def test_registry_names_every_agent_once_with_its_configs():
    classes = {name: getattr(agents, name) for name in agents.__all__}
    exported = {c for c in classes.values() if isinstance(c, type) and c.label}
    assert set(AGENTS.values()) == exported  # every exported agent is registered, and nothing else
    assert len({c.label for c in AGENTS.values()}) == len(AGENTS)
    for name in AGENTS:
        assert (CONFIGS / "model" / f"{name}.yaml").is_file(), f"configs/model/{name}.yaml is missing"


@pytest.mark.parametrize("name", list(AGENTS))
def test_agent_logs_exactly_its_declared_scalars(name, tmp_path, monkeypatch):
    """A few fine-tuning steps on the toy bandit with a learned critic, every step logged."""
    monkeypatch.chdir(tmp_path)
    cls = AGENTS[name]
    build_cli([
        "fit", "--config", str(CONFIGS / "toy" / "bandit.yaml"), f"--model=trqam_lit.agents.{cls.__name__}",
        f"--trainer.max_steps={STEPS}", "--trainer.log_every_n_steps=1", "--trainer.limit_val_batches=0",
        "--model.init_args.bc_warmup_steps=0", "--model.init_args.analytic_critic=false",
        "--model.init_args.actor_hidden_dims=[16,16]", "--model.init_args.critic_hidden_dims=[16,16]",
        "--data.init_args.batch_size=16", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
    ])  # fmt: skip
    (run,) = glob.glob(str(tmp_path / "runs" / "*" / "version_*"))
    scalars = read_scalars(run)
    assert set(scalars) - CLI_SCALARS == set(cls.logged_scalars())
    for tag in cls.logged_scalars():
        assert [step for step, _ in scalars[tag]] == list(range(STEPS)), tag
