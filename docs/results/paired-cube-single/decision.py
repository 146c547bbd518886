"""The paired cube-single experiment's decision rule (docs/results.md, "A paired experiment on cube-single"), applied
to the committed per-seed CSV: run from the repository root after `trqam-lit-exp report
configs/experiments/paired-cube-single.yaml --out docs/results/paired-cube-single`. Prints the per-seed table (final
success, path KL, over-optimism) and each rule's outcome, as markdown."""

import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
AGENTS = ("qam-3", "qam-10", "trqam-1", "trqam-3", "qam-kl-1", "qam-kl-3")


def load(path: Path) -> dict:
    """(agent, seed) -> tag -> [(step, value)] in step order, finished runs only."""
    out: dict = defaultdict(lambda: defaultdict(list))
    with open(path) as f:
        for row in csv.DictReader(f):
            if row["finished"] == "1":
                out[(row["agent"], int(row["seed"]))][row["tag"]].append((int(row["step"]), float(row["value"])))
    for tags in out.values():
        for series in tags.values():
            series.sort()
    return out


def finals(runs: dict, agent: str, seed: int) -> dict | None:
    tags = runs.get((agent, seed))
    if not tags or "eval/success" not in tags:
        return None
    return {
        "success": 100 * tags["eval/success"][-1][1],
        "step": tags["eval/success"][-1][0] + 1,
        "kl": statistics.mean(v for _, v in tags["dual/kl"][-5:]),
        "over_optimism": tags["eval/over_optimism"][-1][1],
    }


def main() -> None:
    runs = load(HERE / "seeds.csv")
    bc = load(HERE / "bc" / "seeds.csv") if (HERE / "bc" / "seeds.csv").is_file() else {}
    seeds = sorted({s for _, s in runs})
    table = {(a, s): finals(runs, a, s) for a in AGENTS for s in seeds}
    print("| agent | " + " | ".join(f"seed {s}: success / KL / over-opt." for s in seeds) + " |")
    print("|---|" + "---|" * len(seeds))
    if bc:
        start = {s: 100 * bc[("bc", s)]["eval/success"][-1][1] for s in seeds if ("bc", s) in bc}
        cells = [f"{start[s]:.0f}% / - / -" if s in start else "-" for s in seeds]
        print("| BC checkpoint (start) | " + " | ".join(cells) + " |")
    for a in AGENTS:
        cells = []
        for s in seeds:
            f = table[(a, s)]
            cells.append("-" if f is None else f"{f['success']:.0f}% / {f['kl']:.2f} / {f['over_optimism']:.1f}")
        print(f"| {a} | " + " | ".join(cells) + " |")
    print()

    def both(a: str, b: str) -> list[int]:
        return [s for s in seeds if table[(a, s)] is not None and table[(b, s)] is not None]

    # Rule 1: QAM-10 ends 15+ points below TRQAM-3, with over twice its KL and a larger over-optimism.
    paired = both("qam-10", "trqam-3")
    holds = [s for s in paired if (q := table[("qam-10", s)]) and (t := table[("trqam-3", s)])
             and t["success"] - q["success"] >= 15 and q["kl"] > 2 * t["kl"]
             and q["over_optimism"] > t["over_optimism"]]  # fmt: skip
    against = [s for s in paired if table[("qam-10", s)]["success"] >= table[("trqam-3", s)]["success"]]
    verdict = "supported" if len(holds) >= 3 else "contradicted" if len(against) >= 3 else "not shown at this budget"
    print(f"Rule 1 (trust region vs QAM-10), {len(paired)} paired seeds: holds on seeds {holds}; QAM-10 at or above "
          f"TRQAM-3 on seeds {against}: **{verdict}**.\n")  # fmt: skip
    # Rule 2: the penalty's realised KL drifts above 1.5x its budget while TRQAM's stays within 25% of it.
    for eps, kl_agent, tr_agent in ((3.0, "qam-kl-3", "trqam-3"), (1.0, "qam-kl-1", "trqam-1")):
        paired = both(kl_agent, tr_agent)
        over = [s for s in paired if table[(kl_agent, s)]["kl"] > 1.5 * eps
                and abs(table[(tr_agent, s)]["kl"] - eps) <= 0.25 * eps]  # fmt: skip
        within = [s for s in paired if abs(table[(kl_agent, s)]["kl"] - eps) <= 0.25 * eps]
        verdict = "supported" if len(over) >= 3 else "contradicted" if len(within) >= 3 else "not shown"
        print(f"Rule 2 at eps_KL {eps:g} ({kl_agent} vs {tr_agent}), {len(paired)} paired seeds: penalty KL over "
              f"{1.5 * eps:g} with TRQAM within 25% on seeds {over}; penalty KL within 25% of the budget on seeds "
              f"{within}: **{verdict}**.\n")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
