"""docs/results.md quotes the outputs of the scripts under docs/results/ that read only committed CSVs: each script is
rerun here and every line it prints must stand in results.md verbatim, so a number edited by hand, or a CSV
regenerated without updating the text, fails."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["docs/results/paired-cube-single/decision.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_output_is_quoted_in_results_md(script):
    out = subprocess.run([sys.executable, script], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines, f"{script} printed nothing"
    doc = (ROOT / "docs" / "results.md").read_text()
    missing = [line for line in lines if line not in doc]
    assert not missing, f"lines of {script}'s output not in docs/results.md:\n" + "\n".join(missing)
