"""Per-seed late values of the toy-dual grid (docs/results.md, "The toy's dual at the paper's budget scale"): run from
the repository root after `trqam-lit-exp run configs/experiments/toy-dual.yaml`; writes CSV to stdout
(late_per_seed.csv). Late = steps 1600-2400, the second half of fine-tuning; every step is logged."""

import csv
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
from helpers import read_scalars  # noqa: E402

EPS_KL, LAM_MIN = 0.5, 0.01
rows = []
for agent in ("eta0.01", "eta0.001"):
    for task in ("0.0", "4.0"):
        for seed in (0, 1, 2):
            s = read_scalars(f"runs/toy-dual/{agent}/{task}/seed{seed}")

            def late(tag, s=s):
                return [v for step, v in s.get(tag, []) if step >= 1600]

            ema, kl, lam = late("dual/kl_ema"), late("dual/kl"), late("dual/lambda")
            rows.append(dict(
                eta=agent[3:], delta=task, seed=seed, kl_ema_late=round(statistics.mean(ema), 4),
                kl_late=round(statistics.mean(kl), 4), lam_late=round(statistics.mean(lam), 4),
                lam_floor_share=round(sum(v <= LAM_MIN + 1e-7 for v in lam) / len(lam), 3),
                ema_within_10pct_share=round(sum(abs(v - EPS_KL) <= 0.1 * EPS_KL for v in ema) / len(ema), 3),
                final_return=round(s["eval/return"][-1][1], 4), final_action_mean=round(s["eval/action_mean"][-1][1], 4),
                late_steps=len(ema),
            ))
writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
writer.writeheader()
writer.writerows(rows)
