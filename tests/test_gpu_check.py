"""The GPU check end to end on a tiny model and the CPU: every run passes and reports its figures.

On a CPU it runs what a GPU session would, with fp32 in place of fp16/bf16, so a broken path is
found here and not in a GPU session that cannot be debugged.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from tests.conftest import REPO


def test_tiny_gpu_check_on_cpu_reports_every_run(tmp_path):
    env = {**os.environ, "PERSONA_LOG": "WARNING", "CUDA_VISIBLE_DEVICES": ""}  # the CPU path, also on a GPU box
    done = subprocess.run([sys.executable, "-m", "persona.gpu_check", "--size", "tiny", "--steps", "2",
                           "--out", str(tmp_path / "work"), "--json", str(tmp_path / "rows.json")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    report = json.loads((tmp_path / "rows.json").read_text())
    rows = {(row["stage"], row["quant"], row["precision"]): row for row in report["rows"]}
    assert {("sft", "none", "fp32"), ("sft", "nf4", "fp32"), ("pairs", "none", "fp32"), ("reward", "none", "fp32"),
            ("ppo", "none", "fp32")} == set(rows)
    for row in rows.values():
        assert row["error"] is None and row["tokens_per_s"] > 0 and row["peak_memory_mb"] > 0, row
    assert all(rows[key]["steps"] == 2 for key in rows if key[0] != "pairs")
    assert report["versions"]["torch"] and report["versions"]["bitsandbytes"]

    assert re.search(r"^sft +none +fp32 +adamw_torch +2 ", done.stdout, re.MULTILINE), done.stdout
    assert re.search(r"^sft +nf4 +fp32 +adamw_torch +2 ", done.stdout, re.MULTILINE), done.stdout
    assert re.search(r"^ppo +none +fp32 ", done.stdout, re.MULTILINE), done.stdout
    assert "fp16, bf16: skipped, no CUDA GPU" in done.stdout
    assert "5 runs passed, 0 failed" in done.stdout
