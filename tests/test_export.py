"""`trqam_lit.tools.export`: a policy file that acts with torch alone and gives the agent's own action chunks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import trqam_lit.agents as agents
from trqam_lit.math.flow import sample_actions
from trqam_lit.tools.export import META, export_checkpoint, export_policy, load_policy

SMALL = dict(obs_dim=5, action_dim=6, horizon=2, actor_hidden_dims=[16, 16], critic_hidden_dims=[16, 16], num_critics=2)


@pytest.fixture(autouse=True)
def _default_gemm_kernel(monkeypatch):
    # the file is compared bitwise with the agent's own acting; an exported program always carries ATen's GEMMs
    # (trqam_lit.math.gemm), so the agent's networks must not be forced onto oneDNN here
    monkeypatch.delenv("TRQAM_GEMM", raising=False)


def perturbed(agent: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight moved by a random amount, so that networks copied from one another (v_bc, v_base, v_ft) differ
    and a file acting with the wrong one gives other numbers."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in agent.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return agent


def noise_for(meta: dict, batch: int, seed: int = 1) -> torch.Tensor:
    shape = [batch if d == "batch" else d for d in meta["noise_shape"]]
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(agents.AGENTS))  # every agent exports
def test_the_file_gives_the_agents_own_action_chunks_at_any_batch_size(tmp_path, name):
    agent = perturbed(agents.AGENTS[name](**SMALL)).eval()
    name = type(agent).__name__
    meta = export_policy(agent, tmp_path / "policy.pt2")
    policy = load_policy(tmp_path / "policy.pt2")
    assert policy.meta == meta and meta["agent"] == name and meta["policy"] == "fine-tuned"
    assert (meta["obs_dim"], meta["horizon"], meta["act_dim"]) == (5, 2, 3)
    for batch in (1, 7):  # exported with batch 2: the batch axis is dynamic
        obs = torch.randn(batch, 5, generator=torch.Generator().manual_seed(batch))
        noise = noise_for(meta, batch)
        torch.manual_seed(0)  # QAM-E's edit draws its eps from the global generator, in the file as in the agent
        expected = agent.act(obs, noise)
        torch.manual_seed(0)
        chunk = policy(obs, noise)
        assert chunk.shape == (batch, 2, 3)
        assert torch.equal(chunk.reshape(batch, 6), expected)  # the same float32 operations: bit for bit
        assert chunk.abs().max() <= 1.0
    # only the networks the policy calls are in the file (no critics, targets or optimizer state for the TRQAM family)
    assert {key.split(".")[1] for key in policy.module.state_dict()} == set(meta["networks"])


def test_ifql_noise_carries_its_n_candidates_and_the_critic_picks_one(tmp_path):
    agent = perturbed(agents.IFQL(**SMALL, best_of_n=4)).eval()
    meta = export_policy(agent, tmp_path / "p.pt2")
    assert meta["noise_shape"] == [4, "batch", 6] and meta["networks"] == ["critic", "v_bc"]
    obs, noise = torch.randn(3, 5), noise_for(meta, 3)
    candidates = sample_actions(agent.v_bc, obs, noise, agent.flow_steps)  # (4, 3, 6)
    with torch.no_grad():
        q = agent.critic(obs.repeat(4, 1), candidates.reshape(12, 6)).reshape(-1, 4, 3).min(dim=0).values
    best = q.argmax(dim=0)
    assert best.tolist() != [0, 0, 0]  # the first candidate is not always the answer
    chunk = load_policy(tmp_path / "p.pt2")(obs, noise).reshape(3, 6)
    assert torch.equal(chunk, candidates[best, torch.arange(3)])
    assert torch.equal(chunk, agent.act(obs, noise))


def test_during_the_bc_warmup_the_file_acts_with_v_bc(tmp_path):
    agent = perturbed(agents.TRQAM(**SMALL, bc_warmup_steps=10)).eval()
    assert not bool(agent.policy_from_bc)
    meta = export_policy(agent, tmp_path / "p.pt2")
    assert meta["policy"] == "BC" and meta["networks"] == ["v_bc"]
    obs, noise = torch.randn(4, 5), torch.randn(4, 6)
    chunk = load_policy(tmp_path / "p.pt2")(obs, noise).reshape(4, 6)
    assert torch.equal(chunk, sample_actions(agent.v_bc, obs, noise, agent.flow_steps))
    assert not torch.equal(chunk, sample_actions(agent.v_ft, obs, noise, agent.flow_steps))


def test_loading_and_acting_needs_torch_alone(tmp_path):
    agent = perturbed(agents.TRQAM(**SMALL)).eval()
    export_policy(agent, tmp_path / "p.pt2")
    obs, noise = torch.randn(3, 5), torch.randn(3, 6)
    torch.save({"obs": obs, "noise": noise}, tmp_path / "inputs.pt")
    script = f"""
import json, sys, torch
extra = {{"{META}": ""}}
policy = torch.export.load("p.pt2", extra_files=extra).module()
meta = json.loads(extra["{META}"])
inputs = torch.load("inputs.pt")
torch.save(policy(inputs["obs"], inputs["noise"]), "out.pt")
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("trqam_lit", "lightning", "torchsde", "ogbench"))
print(json.dumps({{"agent": meta["agent"], "loaded": loaded}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"agent": "TRQAM", "loaded": []}
    assert torch.equal(torch.load(tmp_path / "out.pt"), agent.act(obs, noise))


def test_what_cannot_be_exported_or_read_is_refused_with_a_reason(tmp_path):
    with pytest.raises(ValueError, match="acts through its critic, and its run used the DataModule's analytic"):
        export_policy(agents.IFQL(**SMALL, analytic_critic=True), tmp_path / "i.pt2")
    with pytest.raises(ValueError, match=r"must end in .pt2 \(torch.export's package format\)"):
        export_policy(agents.TRQAM(**SMALL), tmp_path / "t.bin")
    export_policy(agents.TRQAM(**SMALL, analytic_critic=True), tmp_path / "t.pt2")  # acts without a critic: fine
    (tmp_path / "t.pt2").unlink()
    assert not list(tmp_path.iterdir())  # nothing written for a refused export
    export_policy(agents.TRQAM(**SMALL), tmp_path / "p.pt2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.pt2"]  # no partial file left beside it
    policy = load_policy(tmp_path / "p.pt2")
    with pytest.raises(ValueError, match=r"obs must be \(batch, 5\), got \(3, 4\)"):
        policy(torch.zeros(3, 4))
    with pytest.raises(FileNotFoundError, match="policy file not found"):
        load_policy(tmp_path / "missing.pt2")
    (tmp_path / "junk.pt2").write_bytes(b"not a policy")
    with pytest.raises(ValueError, match="is not a readable exported policy"):
        load_policy(tmp_path / "junk.pt2")
    program = torch.export.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),))
    torch.export.save(program, tmp_path / "other.pt2")
    with pytest.raises(ValueError, match="not a trqam-lit policy"):
        load_policy(tmp_path / "other.pt2")
    foreign = {"pytorch-lightning_version": "2.5", "hyper_parameters": {"_class_path": "os.path.join"}}
    torch.save(foreign, tmp_path / "foreign.ckpt")
    with pytest.raises(ValueError, match=r"does not name a trqam-lit agent \(os.path.join\)"):
        export_checkpoint(tmp_path / "foreign.ckpt", tmp_path / "f.pt2")


def test_a_file_of_another_format_version_is_refused(tmp_path):
    export_policy(agents.TRQAM(**SMALL), tmp_path / "p.pt2")
    extra = {META: ""}
    program = torch.export.load(tmp_path / "p.pt2", extra_files=extra)
    meta = json.loads(extra[META])
    torch.export.save(
        program, tmp_path / "v2.pt2", extra_files={META: json.dumps({**meta, "format": "trqam-lit-policy/2"})}
    )
    with pytest.raises(
        ValueError, match="policy format 'trqam-lit-policy/2', this trqam-lit reads 'trqam-lit-policy/1'"
    ):
        load_policy(tmp_path / "v2.pt2")


def test_without_noise_the_loaded_policy_draws_it_in_the_files_shape_from_the_generator(tmp_path):
    agent = perturbed(agents.IFQL(**SMALL, best_of_n=4)).eval()
    export_policy(agent, tmp_path / "p.pt2")
    policy, obs = load_policy(tmp_path / "p.pt2"), torch.randn(3, 5)
    chunk = policy(obs, generator=torch.Generator().manual_seed(3))
    assert chunk.shape == (3, 2, 3)
    assert torch.equal(chunk, policy(obs, torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(3))))


def test_what_the_description_says_about_noise_drawn_inside(tmp_path):
    assert export_policy(agents.QAME(**SMALL), tmp_path / "e.pt2")["draws_inside"] is True
    assert export_policy(agents.TRQAM(**SMALL), tmp_path / "t.pt2")["draws_inside"] is False


def test_a_crash_while_writing_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    agent = perturbed(agents.TRQAM(**SMALL)).eval()
    export_policy(agent, tmp_path / "p.pt2")
    before = (tmp_path / "p.pt2").read_bytes()

    def crash(program, f, **kwargs):
        open(f, "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch.export, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        export_policy(agent, tmp_path / "p.pt2")
    assert (tmp_path / "p.pt2").read_bytes() == before
    assert sorted(f.name for f in tmp_path.iterdir()) == ["p.pt2"]  # and the half-written one is removed
    obs, noise = torch.randn(2, 5), torch.randn(2, 6)
    assert torch.equal(load_policy(tmp_path / "p.pt2")(obs, noise).reshape(2, 6), agent.act(obs, noise))


def test_a_checkpoint_naming_a_class_outside_trqam_lit_is_refused_without_importing_it(tmp_path, monkeypatch):
    (tmp_path / "sideeffect_mod.py").write_text("class A:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.save({"pytorch-lightning_version": "2.5", "hyper_parameters": {"_class_path": "sideeffect_mod.A"}},
               tmp_path / "other.ckpt")  # fmt: skip
    with pytest.raises(ValueError, match=r"does not name a trqam-lit agent \(sideeffect_mod.A\)"):
        export_checkpoint(tmp_path / "other.ckpt", tmp_path / "o.pt2")
    assert "sideeffect_mod" not in sys.modules
