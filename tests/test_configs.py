"""configs/ as users compose it: every `trqam-lit fit|validate|test` command the docs show parses and instantiates,
every agent x domain composition of the paper configs does, every grid names existing files, and no config file is
left untested. Also the run name the CLI gives a run whose config names none."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from helpers import CONFIGS, REPO, run_cli
from trqam_lit.agents import AGENTS
from trqam_lit.cli import build_cli, run_name
from trqam_lit.tools.experiment import Grid

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted(CONFIGS.rglob("*.yaml"))]
DOMAINS = sorted(p.stem for p in (CONFIGS / "data").glob("*.yaml"))
BASELINES = ("qam", "qam-f", "qam-e", "fql", "ifql", "dsrl", "cgql")  # spec baselines.md: per-domain values
SUBCOMMAND = re.compile(r"trqam-lit (fit|validate|test) ")


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) for every `trqam-lit fit|validate|test` line in the README, docs/ and the configs' headers
    (continuation lines joined). Commands with placeholders (``<agent>``, ``$seed``, ``...``) are left out."""
    found = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            match = SUBCOMMAND.search(line)
            if not match:
                continue
            text = line[match.start() :]
            j = i
            while text.rstrip().endswith("\\") and j + 1 < len(lines):
                j += 1
                text = text.rstrip()[:-1] + " " + lines[j].lstrip("# ").strip()
            text = text.split("`")[0].split("  #")[0].strip()  # inline code ends at a backtick; a comment
            if any(mark in text for mark in ("<", "$", "...", "|")) or re.search(r"\s[A-Z]+(\s|$)", text):
                continue  # a placeholder (<agent>, $seed, ..., CKPT, X) or the subcommands' list
            found.append((f"{path.relative_to(REPO)}:{i + 1}", text))
    return found


COMMANDS = documented_commands()
# A paper-settings run: the agent, the domain, a baseline's per-domain values (docs/cli.md, "Configs").
COMPOSED = [(agent, domain) for agent in AGENTS for domain in DOMAINS]


def composition(agent: str, domain: str) -> list[Path]:
    files = [CONFIGS / "model" / f"{agent}.yaml", CONFIGS / "data" / f"{domain}.yaml"]
    per_domain = CONFIGS / "model" / agent / f"{domain}.yaml"
    return files + [per_domain] if per_domain.is_file() else files


def cli_args(command: str) -> list[str]:
    """The command's arguments for an in-process, CPU-only instantiation: no subcommand (``run=False``), no checkpoint
    to read, and the CPU trainer preset in place of the GPU / DDP ones (the next test parses those)."""
    words = shlex.split(command)[2:]
    out = []
    skip = False
    for word in words:
        if skip:
            skip = False
            continue
        if word == "--print_config":
            continue
        if word in ("--ckpt_path", "--model.init_args.init_from"):
            skip = True
            continue
        if word.startswith(("--ckpt_path=", "--model.init_args.init_from=")):
            continue
        word = re.sub(r"configs/trainer/(gpu|ddp)\.yaml$", "configs/trainer/cpu.yaml", word)
        out.append(str(REPO / word) if word.startswith("configs/") else word)  # the docs' paths: from the repo root
    return out


def instantiate(args: list[str]):
    cli = build_cli(args, run=False)
    model, dm = cli.model, cli.datamodule
    assert model.hparams.obs_dim == dm.obs_dim and model.hparams.action_dim == dm.chunk_dim
    assert model.hparams.horizon == dm.horizon and model.hparams.discount == dm.discount
    return cli


def test_the_docs_show_commands_of_every_kind():
    # The extraction itself: it finds the README's usage lines, multi-line commands and the configs' headers.
    where = {w.split(":")[0] for w, _ in COMMANDS}
    assert {"README.md", "docs/cli.md", "docs/reproduction.md", "docs/online.md", "configs/quickstart.yaml"} <= where
    assert any("--data.init_args.env_name cube-double-play-singletask-task3-v0" in c for _, c in COMMANDS)
    assert len(COMMANDS) >= 15


@pytest.mark.parametrize("command", [c for _, c in COMMANDS], ids=[w for w, _ in COMMANDS])
def test_every_documented_command_parses_and_instantiates(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = cli_args(command)
    if any(a.endswith("help") for a in args):  # --help, --model.help CLASS: prints and exits, without an error
        with pytest.raises(SystemExit) as exit_:
            build_cli(args, run=False)
        assert exit_.value.code in (0, None) and "usage" in capsys.readouterr().out.lower()
        return
    instantiate(args)


@pytest.mark.parametrize("agent,domain", COMPOSED, ids=[f"{a}-{d}" for a, d in COMPOSED])
def test_every_agent_and_domain_compose(agent, domain, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = composition(agent, domain)
    if agent in BASELINES:  # the docs' rule: a baseline always adds its per-domain file
        assert len(files) == 3, f"configs/model/{agent}/{domain}.yaml is missing"
    args = [a for f in [CONFIGS / "trainer" / "cpu.yaml", *files] for a in ("--config", str(f))]
    # Small networks: the composition (keys, classes, links) is what is checked, not the paper's widths.
    cli = instantiate([*args, "--model.init_args.actor_hidden_dims=[8]", "--model.init_args.critic_hidden_dims=[8]"])
    spec = yaml.safe_load(files[-1].read_text()) if len(files) == 3 else {}
    expected = spec.get("model", {}).get("class_path") or yaml.safe_load(files[0].read_text())["model"]["class_path"]
    assert type(cli.model).__name__ == expected.rsplit(".", 1)[-1]
    for key, value in spec.get("model", {}).get("init_args", {}).items():
        assert cli.model.hparams[key] == value, key  # the per-domain file wins over the agent's
    if "discount" in spec.get("data", {}).get("init_args", {}):
        assert cli.datamodule.discount == spec["data"]["init_args"]["discount"]
    assert cli.datamodule.env_name.startswith(domain)


@pytest.mark.parametrize("preset", ["gpu", "ddp"])
def test_gpu_and_ddp_presets_parse(preset, tmp_path):
    # Parse only (--print_config): instantiating the gpu preset needs a GPU, which CI never has.
    files = [*composition("trqam", "cube-double"), CONFIGS / "trainer" / f"{preset}.yaml"]
    proc = run_cli(["fit", *(a for f in files for a in ("--config", str(f))), "--print_config"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "accelerator: " + ("gpu" if preset == "gpu" else "auto") in proc.stdout


def is_grid(path: Path) -> bool:
    """A `trqam-lit-exp` grid file (agents x tasks x seeds), not a `trqam-lit` config."""
    return "agents" in (yaml.safe_load(path.read_text()) or {})


GRIDS = sorted(p for p in CONFIGS.rglob("*.yaml") if is_grid(p))


def grid_configs() -> set[Path]:
    return {(REPO / c).resolve() for grid in GRIDS for r in Grid.load(grid).runs for c in r.config}


@pytest.mark.parametrize("grid", GRIDS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_grid_loads_and_its_configs_instantiate(grid, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # grids name configs relative to the repository root
    agents = {}
    for run in Grid.load(grid).runs:
        agents.setdefault(run.agent, run)
    monkeypatch.chdir(tmp_path)
    for run in agents.values():
        args = run.fit_args(resume=False)[1:]
        args = [str(REPO / a) if a.startswith("configs/") else a for a in args]
        instantiate([a for a in args if not a.startswith(("--trainer.logger", "--checkpoint.dirpath"))])


def test_every_config_file_is_exercised_by_these_tests(monkeypatch):
    monkeypatch.chdir(REPO)
    used = {(CONFIGS / "trainer" / "cpu.yaml").resolve()}
    for _, command in COMMANDS:
        words = shlex.split(command)
        used |= {(REPO / words[i + 1]).resolve() for i, w in enumerate(words) if w == "--config"}
    used |= {f.resolve() for agent, domain in COMPOSED for f in composition(agent, domain)}
    used |= grid_configs() | {(REPO / "configs" / "trainer" / f"{p}.yaml").resolve() for p in ("gpu", "ddp")}
    untested = sorted(
        str(p.relative_to(REPO)) for p in CONFIGS.rglob("*.yaml") if not is_grid(p) and p.resolve() not in used
    )
    assert not untested, f"config files no documented command, composition or grid uses: {untested}"


def test_a_run_is_named_after_its_agent_and_task(tmp_path, monkeypatch):
    assert run_name("trqam_lit.agents.TRQAM", "trqam_lit.data.OGBenchDataModule", "scene-play-singletask-task2-v0") == (
        "trqam-scene-play-task2"
    )
    assert (
        run_name("trqam_lit.agents.qam_f.QAMF", "x.OGBenchDataModule", "cube-double-play-v0")
        == "qam-f-cube-double-play"
    )
    assert run_name("trqam_lit.agents.TRQAM", "trqam_lit.data.ToyBanditDataModule", None) == "trqam-toy-bandit"
    monkeypatch.chdir(tmp_path)
    files = [CONFIGS / "trainer" / "cpu.yaml", *composition("fql", "scene")]
    small = ["--model.init_args.actor_hidden_dims=[8]", "--model.init_args.critic_hidden_dims=[8]"]
    cli = instantiate([*(a for f in files for a in ("--config", str(f))), *small])
    assert cli.trainer.logger.name == "fql-scene-play-task1"
    named = instantiate(["--config", str(CONFIGS / "quickstart.yaml")])
    assert named.trainer.logger.name == "quickstart"  # a config's own name is kept
