"""Per-seed late values of the toy-stability grid (docs/results.md, "Stability under critic error"): run from the
repository root after `trqam-lit-exp run configs/experiments/toy-stability.yaml`; writes CSV to stdout
(late_per_seed.csv). Late = the logged values of steps 1600-2400 (the second half of fine-tuning; logged every 50
steps); final = the last evaluation (return, mean action) and the mean of the last 5 logged path-KL estimates."""

import csv
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
from helpers import read_scalars  # noqa: E402

LAM_MIN = 0.01
rows = []
for agent in ("trqam", "qam"):
    for task in ("0.0", "0.5", "1.0", "2.0", "4.0"):
        for seed in (0, 1, 2):
            s = read_scalars(f"runs/toy-stability/{agent}/{task}/seed{seed}")

            def late(tag, s=s):
                return [v for step, v in s.get(tag, []) if step >= 1600]

            row = dict(
                agent=agent, delta=task, seed=seed,
                kl_final=round(statistics.mean(v for _, v in s["dual/kl"][-5:]), 4),
                kl_late=round(statistics.mean(late("dual/kl")), 4),
                final_return=round(s["eval/return"][-1][1], 4),
                final_action_mean=round(s["eval/action_mean"][-1][1], 4),
            )  # fmt: skip
            lam = late("dual/lambda")
            row["lam_late"] = round(statistics.mean(lam), 4) if lam else ""
            row["lam_floor_share"] = round(sum(v <= LAM_MIN + 1e-7 for v in lam) / len(lam), 3) if lam else ""
            rows.append(row)
writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
writer.writeheader()
writer.writerows(rows)
