"""`trqam-lit-exp report`: a grid's TensorBoard scalars aggregated over seeds, as a CSV, a markdown table and plots.

Every number comes from the runs' own event files, read back with TensorBoard's reader. A step logged twice (a
run killed after a checkpoint and resumed logs the steps since that checkpoint again) keeps its last value.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import yaml

from trqam_lit.tools.grid import Grid, Run

# tag -> (plot title, y-axis label, scale applied to the logged value, log y-axis)
PLOTS = {
    "eval/success": ("evaluation success", "success rate (% of episodes)", 100.0, False),
    "eval/return": ("evaluation return", "return per episode (sum of rewards)", 1.0, False),
    "dual/kl": ("path KL of every agent vs budget", "path KL estimate (nats per chunk step)", 1.0, False),
    "dual/kl_ema": ("path KL average vs budget", "KL average (nats per chunk step)", 1.0, False),
    "dual/lambda": ("trust-region parameter", "lambda (dimensionless)", 1.0, False),
    "actor/am_loss": ("adjoint-matching loss", "L_AM (batch mean, log scale)", 1.0, True),
    "actor/adj_max": ("largest adjoint entry", "max |adjoint at t=1| (log scale)", 1.0, True),
    "critic/q_mean": ("critic's mean Q on the batch", "Q (batch mean)", 1.0, False),
    "eval/over_optimism": ("critic over-optimism", "Q(s0, a0) - realised discounted return", 1.0, False),
}
TABLE_TAGS = ("eval/success", "eval/return")
BUDGET_TAGS = ("dual/kl", "dual/kl_ema")
BC_AGENT = "bc"  # a grid agent of this name is drawn as a reference line on the evaluation plots

Series = dict[int, float]  # step -> value


def read_run(run_dir: Path) -> dict[str, Series]:
    """tag -> {step: value} of one run directory's event files (the last write of a step wins)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out: dict[str, Series] = {}
    for tag in acc.Tags()["scalars"]:
        events = sorted(acc.Scalars(tag), key=lambda e: e.wall_time)
        out[tag] = {e.step: float(e.value) for e in events}
    return out


def budget_of(run: Run) -> float | None:
    """The run's eps_kl, from the config LightningCLI saved beside its events (None for agents without one)."""
    path = run.run_dir / "config.yaml"
    if not path.is_file():
        return None
    config = yaml.safe_load(path.read_text()) or {}
    value = ((config.get("model") or {}).get("init_args") or {}).get("eps_kl")
    return float(value) if value is not None else None


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one seed)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


FINAL_WINDOW = 5  # training scalars are one batch's estimate: their final value averages the last few logged


def final_value(tag: str, series: Series) -> float:
    """An evaluation's last value; for a training scalar the mean of its last FINAL_WINDOW logged values."""
    steps = sorted(series)
    window = steps[-1:] if tag.startswith("eval/") else steps[-FINAL_WINDOW:]
    return sum(series[s] for s in window) / len(window)


def aggregate(grid: Grid) -> tuple[list[dict], dict, dict, dict, list[dict]]:
    """(rows step by step, final values per (agent, task, tag), eps_kl per (agent, task), the last logged step of
    each unfinished run by name, every logged value of every run: agent, task, seed, tag, step, value).

    The rows count every run that logged a step (a report made while the grid runs shows how far each got); the final
    values come from finished runs only: an unfinished run's last evaluation is not its final one.
    """
    per: dict[tuple[str, str, str], list[Series]] = defaultdict(list)
    final: dict[tuple[str, str, str], list[Series]] = defaultdict(list)
    budgets: dict[tuple[str, str], float] = {}
    unfinished: dict[str, int | str] = {}
    per_seed: list[dict] = []
    for run in grid.runs:
        if not run.run_dir.is_dir():
            continue
        scalars = read_run(run.run_dir)
        for tag, series in sorted(scalars.items()):
            per[(run.agent, run.task, tag)].append(series)
            base = {"agent": run.agent, "task": run.task, "seed": run.seed, "tag": tag, "finished": run.finished}
            per_seed += [{**base, "step": step, "value": value} for step, value in sorted(series.items())]
            if run.finished:
                final[(run.agent, run.task, tag)].append(series)
        if not run.finished:
            unfinished[run.name] = max((step for series in scalars.values() for step in series), default="none logged")
        if (eps := budget_of(run)) is not None:
            budgets[(run.agent, run.task)] = eps
    rows, finals = [], {}
    for (agent, task, tag), seeds in sorted(per.items()):
        for step in sorted({s for series in seeds for s in series}):
            values = [series[step] for series in seeds if step in series]
            mean, std = mean_std(values)
            rows.append({"agent": agent, "task": task, "tag": tag, "step": step, "mean": mean, "std": std,
                         "min": min(values), "max": max(values), "seeds": len(values)})  # fmt: skip
        finals[(agent, task, tag)] = [final_value(tag, series) for series in final[(agent, task, tag)] if series]
    return rows, finals, budgets, unfinished, per_seed


def write_csv(rows: list[dict], path: Path) -> None:
    fields = ["agent", "task", "tag", "step", "mean", "std", "min", "max", "seeds"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{row[k]:.6g}" if k in ("mean", "std", "min", "max") else row[k] for k in fields})


def write_seed_csv(per_seed: list[dict], path: Path) -> None:
    """Every logged value of every run (``finished`` 0 for a run still going): each number of a report can be
    recomputed from this file."""
    fields = ["agent", "task", "seed", "tag", "step", "value", "finished"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in per_seed:
            writer.writerow({**row, "value": f"{row['value']:.9g}", "finished": int(row["finished"])})


def domain_of(task: str) -> str:
    """A task named ``<domain>/<task>`` belongs to ``<domain>``; any other name is its own domain."""
    return task.split("/", 1)[0]


def markdown_table(grid: Grid, finals: dict, unfinished: dict[str, int | str]) -> str:
    """Final evaluation per agent (rows) and task (columns): mean +- std over seeds (number of seeds); with several
    tasks, the paper's aggregation after them: per domain the mean of its tasks' seed means, then ``all``, the mean of
    the domain means (a cell only when every task of it has finished seeds)."""
    agents, tasks = grid.agents, grid.tasks
    domains = sorted({domain_of(t) for t in tasks}, key=lambda d: [domain_of(t) for t in tasks].index(d))
    grouped = len(tasks) > 1
    extra = ([f"{d} (mean)" for d in domains] if len(domains) < len(tasks) else []) + (["all"] if grouped else [])
    lines = []
    for tag in TABLE_TAGS:
        title, _, scale, _ = PLOTS[tag]
        fmt = ".1f" if scale == 100.0 else ".3g"  # success in %, returns of any scale
        lines += [f"### Final {title} ({'%' if scale == 100.0 else 'mean'}, mean ± std over seeds (seeds))", ""]
        lines += ["| agent | " + " | ".join([*tasks, *extra]) + " |", "|---|" + "---|" * (len(tasks) + len(extra))]
        for agent in agents:
            cells, task_means = [], {}
            for task in tasks:
                values = finals.get((agent, task, tag))
                if not values:
                    cells.append("–")
                    continue
                mean, std = mean_std([v * scale for v in values])
                task_means[task] = mean
                cells.append(f"{mean:{fmt}} ± {std:{fmt}} ({len(values)})")
            domain_means = {}
            for d in domains:
                members = [t for t in tasks if domain_of(t) == d]
                if all(t in task_means for t in members):
                    domain_means[d] = sum(task_means[t] for t in members) / len(members)
            if len(domains) < len(tasks):
                cells += [f"{domain_means[d]:{fmt}}" if d in domain_means else "–" for d in domains]
            if grouped:
                done = len(domain_means) == len(domains)
                cells.append(f"{sum(domain_means.values()) / len(domains):{fmt}}" if done else "–")
            lines.append(f"| {agent} | " + " | ".join(cells) + " |")
        lines.append("")
    if unfinished:
        left_out = ", ".join(f"{name} (last step {step})" for name, step in unfinished.items())
        lines += ["Not finished (left out of the final values): " + left_out, ""]
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:  # the tools' extra
        raise ImportError("the report's plots need matplotlib: pip install 'trqam-lit[tools]'") from err

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _seeds(n: int) -> str:
    return f"{n} seed{'s' if n != 1 else ''}"


def _figure(lines: int):
    """A figure for ``lines`` curves: more than 4 get a wider figure with the legend beside the axes."""
    return _pyplot().subplots(figsize=(6, 3.6) if lines <= 4 else (8.5, 3.9), dpi=100)


def _save(fig, ax, title: str, xlabel: str, ylabel: str, path: Path) -> Path:
    """Labels, grid and legend, then the PNG; closes the figure."""
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(ax.get_legend_handles_labels()[0]) > 4:  # beside the axes: over them it would hide the curves
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def plot(
    rows: list[dict],
    budgets: dict,
    out_dir: Path,
    grid_name: str,
    order: Sequence[str] = (),
    finals: dict | None = None,
) -> list[Path]:
    """One PNG per (task, plotted tag): one line per agent (in ``order``, the grid's) with the seeds' min-max band
    (never outside what a seed logged: no success band below 0%); budgets as dashed lines on the KL plots; a log
    y-axis for the adjoint quantities; a grid agent named ``bc`` as a dotted reference line (its final value) on the
    evaluation plots of the other agents."""
    by: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["tag"] in PLOTS:
            by[(row["task"], row["tag"])][row["agent"]].append(row)
    rank = {agent: i for i, agent in enumerate(order)}
    written = []
    for (task, tag), agents in sorted(by.items()):
        title, ylabel, scale, log = PLOTS[tag]
        bc_final = (finals or {}).get((BC_AGENT, task, tag)) if tag.startswith("eval/") else None
        if bc_final and set(agents) != {BC_AGENT}:
            agents = {a: p for a, p in agents.items() if a != BC_AGENT}
        fig, ax = _figure(len(agents))
        band = 0.2 if len(agents) <= 4 else 0.1  # many overlapping bands: lighter, so the lines stay visible
        drawn_budgets: set[float] = set()
        for agent, points in sorted(agents.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0])):
            if log:
                points = [p for p in points if p["min"] > 0]
                if not points:
                    continue
            steps = [p["step"] for p in points]
            mean = [p["mean"] * scale for p in points]
            seeds = max(p["seeds"] for p in points)
            (line,) = ax.plot(steps, mean, label=f"{agent} ({_seeds(seeds)})", marker="o" if len(steps) < 30 else None)
            if seeds > 1:
                low, high = [p["min"] * scale for p in points], [p["max"] * scale for p in points]
                ax.fill_between(steps, low, high, color=line.get_color(), alpha=band)
            if tag in BUDGET_TAGS and (eps := budgets.get((agent, task))) is not None and eps not in drawn_budgets:
                drawn_budgets.add(eps)
                ax.axhline(eps, color=line.get_color(), linestyle="--", linewidth=1, label=f"budget eps_KL = {eps:g}")
        if bc_final and set(agents) != {BC_AGENT}:
            value = sum(bc_final) / len(bc_final) * scale
            ax.axhline(value, color="0.35", linestyle=":", linewidth=1.2, label=f"BC, final ({_seeds(len(bc_final))})")
        if log and ax.lines:
            ax.set_yscale("log")
        path = out_dir / f"{task.replace('/', '_')}_{tag.replace('/', '_')}.png"
        xlabel = "training step (optimizer updates)"
        written.append(_save(fig, ax, f"{grid_name} / {task}: {title}", xlabel, ylabel, path))
    return written


SWEEP_TAGS = ("eval/return", "eval/action_mean", "dual/kl")


def _task_values(grid: Grid) -> dict[str, float] | None:
    """Task name -> number when every task is named by a number (a sweep, e.g. over a critic error size)."""
    try:
        return {r.task: float(r.task) for r in grid.runs}
    except ValueError:
        return None


def plot_sweep(grid: Grid, finals: dict, budgets: dict, out_dir: Path) -> list[Path]:
    """For a grid whose tasks are numbers: the final value of each quantity against the task's number."""
    xs = _task_values(grid)
    if xs is None:
        return []
    labels = {  # tag -> (title, y-axis label)
        "eval/return": ("final evaluation return", "return (true reward)"),
        "eval/action_mean": ("final mean action", "mean action"),
        "dual/kl": ("final path KL (mean of last 5 logged)", "path KL (nats / chunk step)"),
    }
    written = []
    for tag in SWEEP_TAGS:
        fig, ax = _figure(len(grid.agents))
        plotted = False
        for agent in grid.agents:
            points = [(xs[t], mean_std(v)) for (a, t, g), v in finals.items() if a == agent and g == tag and v]
            if not points:
                continue
            points.sort()
            seeds = max(len(v) for (a, _, g), v in finals.items() if a == agent and g == tag)
            bar = ax.errorbar([p[0] for p in points], [p[1][0] for p in points], yerr=[p[1][1] for p in points],
                              marker="o", capsize=3, label=f"{agent} ({_seeds(seeds)})")  # fmt: skip
            eps = {budgets.get((agent, t)) for t in xs} - {None}
            if tag == "dual/kl" and len(eps) == 1:
                ax.axhline(eps.pop(), color=bar.lines[0].get_color(), linestyle="--", linewidth=1,
                           label=f"{agent} budget eps_KL")  # fmt: skip
            plotted = True
        if not plotted:
            _pyplot().close(fig)
            continue
        if tag == "dual/kl":  # the KL spans an order of magnitude or more across error sizes
            ax.set_yscale("log")
        title, ylabel = f"{grid.name}: {labels[tag][0]}", labels[tag][1]
        path = out_dir / f"sweep_{tag.replace('/', '_')}.png"
        written.append(_save(fig, ax, title, "task value (e.g. critic error size delta)", ylabel, path))
    return written


def report(grid: Grid, out_dir: Path) -> dict[str, Path | list[Path]]:
    """Writes ``scalars.csv`` (per step: mean, std, min, max over seeds), ``seeds.csv`` (every run's values),
    ``table.md`` and the PNGs into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, finals, budgets, unfinished, per_seed = aggregate(grid)
    if not rows:
        raise ValueError(f"no TensorBoard scalars found under the runs of grid '{grid.name}' (run it first)")
    write_csv(rows, out_dir / "scalars.csv")
    write_seed_csv(per_seed, out_dir / "seeds.csv")
    (out_dir / "table.md").write_text(markdown_table(grid, finals, unfinished))
    plots = plot(rows, budgets, out_dir, grid.name, grid.agents, finals) + plot_sweep(grid, finals, budgets, out_dir)
    return {"csv": out_dir / "scalars.csv", "seeds": out_dir / "seeds.csv", "table": out_dir / "table.md",
            "plots": plots}  # fmt: skip
