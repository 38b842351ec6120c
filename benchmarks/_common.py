"""Helpers shared by the benchmark scripts: the backend on sys.path, and measurements in a child
process so that each one's peak resident memory is its own."""

import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "LandmarkDetection"))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(script: str, *args: str) -> dict:
    """Run ``script --child ARGS`` and return the JSON object on its last output line (or the error)."""
    result = subprocess.run([sys.executable, script, "--child", *args], capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])
