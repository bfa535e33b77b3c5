"""OpenMP's wait policy per command: PASSIVE where torch shares the cores (training, serving),
the runtime's default for foreground decoding (sleeping threads cost time at every call)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from speechllama.cli import omp_wait_policy


@pytest.mark.parametrize(
    ("argv", "policy"),
    [
        (["train", "--train", "m.jsonl"], "PASSIVE"),
        (["campaign", "run", "spec.toml"], "PASSIVE"),
        (["serve", "--port", "8000"], "PASSIVE"),
        (["transcribe", "a.wav"], None),
        (["evaluate", "m.jsonl", "--out", "x"], None),
        (["bench", "--manifest", "m.jsonl"], None),
        (["--help"], None),
        ([], None),
    ],
)
def test_policy_per_command(argv: list[str], policy: str | None) -> None:
    assert omp_wait_policy(argv) == policy


def _policy_seen(*argv: str, env: dict[str, str] | None = None) -> str:
    """OMP_WAIT_POLICY as a fresh interpreter sees it after importing the CLI with ``argv``."""
    code = (
        "import sys, os; sys.argv = ['speechllama', *sys.argv[1:]]; import speechllama.cli; "
        "print(os.environ.get('OMP_WAIT_POLICY', '-'))"
    )
    full = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | (env or {})
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                         env=full, check=True)  # fmt: skip
    return out.stdout.strip()


def test_set_before_torch_and_a_user_setting_wins() -> None:
    assert _policy_seen("train", "--help") == "PASSIVE"
    assert _policy_seen("bench", "--help") == "-"
    assert _policy_seen("train", env={"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
