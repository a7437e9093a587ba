"""The GPU scripts under bench/ on this CPU machine: their syntax, and the set-up they share (bench/gpu_env.sh)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GPU_SCRIPTS = sorted(REPO.glob("bench/gpu_*.sh"))


def run_bash(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("path", GPU_SCRIPTS, ids=lambda p: p.name)
def test_gpu_script_parses(path: Path):
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_gpu_scripts_share_the_environment_setup():
    sourcing = [p.name for p in GPU_SCRIPTS if "source bench/gpu_env.sh" in p.read_text()]
    assert sourcing == ["gpu_all.sh", "gpu_throughput.sh"]


def test_gpu_env_sets_folders_environment_and_log(tmp_path: Path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {"PATH": "/usr/bin:/bin", "OUT": str(out), "HOME": str(tmp_path)}
    script = (f"set -uo pipefail; WORK={work} LOG_NAME=summary.log; source bench/gpu_env.sh; "
              'log "step one"; echo "PY=$PY OUT_DIR=$OUT_DIR HF=$HF_HUB_OFFLINE TF=$TRANSFORMERS_OFFLINE"')
    result = run_bash(script, env)
    assert result.returncode == 0, result.stderr
    assert out.is_dir() and work.is_dir()
    assert f"OUT_DIR={out}" in result.stdout and "HF=1 TF=1" in result.stdout
    assert "PY=/" in result.stdout  # an absolute python3
    assert re.fullmatch(r"\[\d+ s\] step one\n", (out / "summary.log").read_text())


@pytest.mark.parametrize("missing", ["WORK", "LOG_NAME"])
def test_gpu_env_refuses_without_its_inputs(tmp_path: Path, missing: str):
    given = {"WORK": str(tmp_path / "work"), "LOG_NAME": "summary.log"}
    del given[missing]
    assignments = " ".join(f"{k}={v}" for k, v in given.items())
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out"), "HOME": str(tmp_path)}
    result = run_bash(f"{assignments}; source bench/gpu_env.sh; echo reached", env)
    assert result.returncode != 0
    assert f"set {missing} before sourcing bench/gpu_env.sh" in result.stderr
    assert "reached" not in result.stdout
