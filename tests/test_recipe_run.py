"""recipes/synthetic/run.sh: the dry run lists every stage's commands with the config's values,
markers skip finished stages, --stage/--stop-stage select, the MWER stage is guarded, and the
script itself holds no hyper-parameter (all of them live in conf/small.sh)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "recipes" / "synthetic" / "run.sh"
CONF = ROOT / "recipes" / "synthetic" / "conf" / "small.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(*args: str, env: dict[str, str] | None = None, dry: bool = True):
    full = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME")}
    full.update(env or {})
    if dry:
        full["DRY_RUN"] = "1"
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full, timeout=60
    )


def _commands(out: str) -> list[str]:
    return [line[2:] for line in out.splitlines() if line.startswith("+ ")]


def _assert_commands(cmds: list[str], patterns: list[str]) -> None:
    """Every pattern matches one of the printed commands."""
    for pattern in patterns:
        assert any(re.search(pattern, c) for c in cmds), pattern


def test_dry_run_lists_every_stage_with_the_config_values(tmp_path):
    exp = tmp_path / "exp"
    p = _run("--data", "D", "--exp", str(exp))
    assert p.returncode == 0, p.stderr
    for n in range(1, 8):
        assert f"Stage {n}: " in p.stderr
    cmds = _commands(p.stdout)
    want = [
        r"prepare\.sh D --hours 50 ",
        r"cat D/train/manifest\.jsonl D/fsdd-train/manifest\.jsonl > .*/train\.jsonl",
        r"tokenizer train --text D/text/train\.txt --vocab-size 1024 ",
        r"train --train .*--preset small --max-steps 6400 --warmup 300 --lr 2e-3 --out .*/nt$",
        r"train --train .*--init .*/nt/best --heads 4 --head-kind latent .*--out .*/mtp$",
        r"train --train .*--init .*/mtp/best --mwer --mwer-nbest 4 .*--out .*/mwer$",
        r"evaluate D/synth-heldout/manifest\.jsonl --model .*/mwer/best --decoding greedy ",
        r"bench --manifest D/real-smoke/manifest\.jsonl --model .*/mwer/best ",
        r"scripts/peers\.py --data D --model .*/mwer/best ",
        r"scripts/peers\.py --systems pocketsphinx-digits fsdd-test=D/fsdd-test/manifest\.jsonl ",
        r"export .*/mwer/best --dtype float16$",
    ]
    _assert_commands(cmds, want)
    assert all(
        "--resume" in c and "--save-every 200" in c and "--eval-every 400" in c
        and "--augment --cache-copies 2" in c  # the campaign's waveform augmentation, adopted
        for c in cmds
        if " train --train " in c
    )  # fmt: skip
    evaluations = [c for c in cmds if " evaluate " in c]
    assert len(evaluations) == 3 * 4  # 3 sets x greedy, threshold, verify, beam
    assert not exp.exists()  # a dry run runs nothing


def test_markers_stage_range_and_overrides(tmp_path):
    exp = tmp_path / "exp"
    (exp / ".done").mkdir(parents=True)
    (exp / ".done" / "stage-3").write_text("earlier\n")
    p = _run("--exp", str(exp), "--stop-stage", "4", env={"MTP_STEPS": "7"})
    assert p.returncode == 0, p.stderr
    assert "Stage 3: done before" in p.stderr
    assert not any("--preset" in c for c in _commands(p.stdout))
    assert any("--max-steps 7 " in c for c in _commands(p.stdout))
    assert "Stage 5" not in p.stderr and "Stage 6" not in p.stderr
    only = _run("--exp", str(exp), "--stage", "7", "--stop-stage", "7")
    assert [c.split()[1] for c in _commands(only.stdout)] == ["export"]
    assert "mtp/best" in only.stdout  # no MWER model: the multi-token one ships


def test_help_and_bad_arguments():
    p = _run("--help")
    assert p.returncode == 0 and "Usage:" in p.stderr and "DRY_RUN=1" in p.stderr
    assert _run("--bogus").returncode != 0
    assert "no such config" in _run("--conf", "/nonexistent.sh").stderr


def test_real_run_writes_markers_and_guards_mwer(tmp_path):
    """Stages 2, 5 and 7 for real with a stand-in speechllama that logs its arguments and whose
    `train --help` lacks --mwer."""
    log = tmp_path / "calls.log"
    fake = tmp_path / "speechllama"
    fake.write_text(
        f'#!/bin/sh\necho "$*" >> "{log}"\n'
        'case "$*" in "train --help") echo "usage: train --resume";; esac\n'
    )
    fake.chmod(0o755)
    exp = tmp_path / "exp"
    args = ("--exp", str(exp), "--speechllama", str(fake), "--stage", "5", "--stop-stage", "5")
    p = _run(*args, dry=False)
    assert p.returncode == 0, p.stderr
    assert "no 'train --mwer'" in p.stderr and not (exp / ".done" / "stage-5").exists()
    p = _run("--exp", str(exp), "--speechllama", str(fake), "--stage", "7", dry=False)
    assert p.returncode == 0, p.stderr
    assert (exp / ".done" / "stage-7").is_file()
    assert log.read_text().splitlines()[-1] == f"export {exp}/mtp/best --dtype float16"
    calls = len(log.read_text().splitlines())
    again = _run("--exp", str(exp), "--speechllama", str(fake), "--stage", "7", dry=False)
    assert "Stage 7: done before" in again.stderr
    assert len(log.read_text().splitlines()) == calls


@pytest.mark.parametrize(("mwer_wer", "ships"), [(0.52, "mtp"), (0.48, "mwer")])
def test_mwer_ships_only_when_its_dev_wer_is_no_worse(tmp_path, mwer_wer, ships):
    """Stage 7 exports MWER's model only when its best dev WER is at most stage 4's."""
    log = tmp_path / "calls.log"
    fake = tmp_path / "speechllama"
    fake.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\n')
    fake.chmod(0o755)
    exp = tmp_path / "exp"
    for run, wers in (("mtp", [0.55, 0.4955]), ("mwer", [mwer_wer])):
        (exp / run / "best").mkdir(parents=True)
        rows = [{"event": "train", "step": 1}] + [{"event": "eval", "dev_wer": w} for w in wers]
        (exp / run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = _run("--exp", str(exp), "--speechllama", str(fake), "--stage", "7", dry=False)
    assert p.returncode == 0, p.stderr
    assert log.read_text().splitlines()[-1] == f"export {exp}/{ships}/best --dtype float16"
    assert ("MWER raised dev WER (0.4955 -> 0.52)" in p.stderr) == (ships == "mtp")


def test_smollm_conf_trains_adapter_then_lora_then_heads(tmp_path):
    """conf/smollm.sh: no tokenizer stage (the LLM's own), the adapter alone with the LLM's
    head, then LoRA from that, heads from the LoRA model, no MWER, exported beside the default."""
    p = _run(
        "--data", "D", "--exp", str(tmp_path / "exp"), "--conf", str(CONF.parent / "smollm.sh")
    )
    assert p.returncode == 0, p.stderr
    assert "no tokenizer to train" in p.stderr and "no MWER fine-tuning" in p.stderr
    cmds = _commands(p.stdout)
    assert not any("tokenizer" in c for c in cmds)
    want = [
        r"train --train .*--preset smollm --heads 1 --head-kind linear --bf16 .*--out .*/nt$",
        r"--init .*/nt/best --model-set decoder\.lora_rank=4 .*--model-set ctc_tied=true "
        r".*--ctc-weight 0\.3 --out .*/nt_lora$",
        r"--init .*/nt_lora/best --heads 4 --head-kind latent .*--no-hidden-cache --out .*/mtp$",
        r"evaluate D/real-smoke/manifest\.jsonl --model .*/mtp/best ",
        r"export .*/mtp/best --dtype float16 --out .*/speechllama/models/smollm$",
    ]
    _assert_commands(cmds, want)
    assert not any("--augment" in c or "--cache-copies" in c for c in cmds)


def test_every_hyper_parameter_lives_in_the_config():
    script, conf = SCRIPT.read_text(), CONF.read_text()
    defined = set(re.findall(r'^: "\$\{([A-Z_]+):=', conf, flags=re.M))
    environment = {"DRY_RUN", "OMP_WAIT_POLICY", "BASH_SOURCE"}
    used = set(re.findall(r"\$\{?([A-Z][A-Z_]+)\b", script)) - environment
    assert used <= defined, used - defined
    assert defined <= used, f"unused in run.sh: {defined - used}"
    # No option of a command is given a literal number in the script.
    assert not re.findall(
        r"--[a-z-]+ [0-9][0-9.e-]*(?=[\s\\]|$)", script.split("set -euo pipefail", 1)[1]
    )


def test_self_distilled_heads_relabel_train_and_dev_then_feed_mwer(tmp_path):
    exp = tmp_path / "exp"
    p = _run("--data", "D", "--exp", str(exp), "--stage", "4", "--stop-stage", "7",
             env={"SD_STEPS": "9"})  # fmt: skip
    assert p.returncode == 0, p.stderr
    cmds = _commands(p.stdout)
    _assert_commands(cmds, [
        r"evaluate .*/train\.jsonl --model .*/mtp/best --decoding greedy --no-head-accuracy .*"
        r"--out .*/mtp_sd/labels-train$",
        r"evaluate D/dev/manifest\.jsonl --model .*/mtp/best .*--out .*/mtp_sd/labels-dev$",
        r"data relabel .*/train\.jsonl .*/mtp_sd/labels-train --out .*/mtp_sd/train\.jsonl$",
        r"data relabel D/dev/manifest\.jsonl .*/mtp_sd/labels-dev --out .*/mtp_sd/dev\.jsonl$",
        r"train --train .*/mtp_sd/train\.jsonl .*--dev .*/mtp_sd/dev\.jsonl --init .*/mtp/best "
        r"--heads 4 --head-kind latent --max-steps 9 --warmup 50 --lr 5e-4 "
        r"--freeze encoder adapter decoder --out .*/mtp_sd$",
        r"train --train .*--init .*/mtp_sd/best --mwer ",
    ])  # fmt: skip
    order = [i for i, c in enumerate(cmds) if "mtp_sd" in c or "--mwer" in c]
    assert "--mwer" in cmds[order[-1]]  # MWER starts from the self-distilled heads
    plain = _commands(_run("--exp", str(exp), "--stage", "4", "--stop-stage", "5").stdout)
    assert not any("mtp_sd" in c for c in plain)
