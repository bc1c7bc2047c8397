"""`make chaos` must not pass by skipping: a run in which every scenario skipped fails, and says
what is missing (no services needed: the scenarios skip before touching any)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_chaos_run_where_every_scenario_skipped_fails_and_says_why(tmp_path: Path) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("STOCKFLOW_")},
        "STOCKFLOW_STATE_DIR": str(tmp_path),
        "MONGODB_URI": "mongodb://app:s3cret@db.elsewhere:27017/",
        "KAFKA_BOOTSTRAP_SERVERS": "",
        "REDIS_URL": "",
    }
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/chaos", "-m", "chaos", "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    out = result.stdout + result.stderr
    skipped = re.search(r"\b(\d+) skipped", out)
    assert skipped and int(skipped.group(1)) >= 18 and " passed" not in out, out  # every scenario
    assert result.returncode == 1, out
    assert "nothing was proved" in out
    assert "MONGODB_URI=mongodb://app:***@db.elsewhere:27017/ is not this local stack's" in out
    assert "s3cret" not in out
