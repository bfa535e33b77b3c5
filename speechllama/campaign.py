"""The accuracy campaign: one fixed, cheap training protocol, one run per lever, one row each.

Every run trains the same preset from scratch for the same number of optimizer steps with the
same seed, tokenizer and encoder-output cache; only the row's training-data filter and extra
``speechllama train`` arguments differ, so the WER differences between rows are the levers'.

The spec is a TOML file (``recipes/synthetic/conf/campaign.toml``)::

    [protocol]                 # fixed for every run (see ``Protocol``)
    preset = "small"
    steps = 600
    ...
    [[eval]]                   # sets scored after training, greedy, optionally capped
    set = "synth-heldout"
    limit = 200
    [[run]]                    # one per row of the table
    name = "espeak-only"
    lever = "voices"
    filter = "engines=espeak-ng"
    extra = ["--no-spec-augment"]

Each run lives in ``EXP/NAME/`` (train.jsonl, model/, eval/SET/); finished runs are rows of
``EXP/results.jsonl`` and are skipped when the campaign is started again, and an interrupted
run continues from its last checkpoint (``train --resume``; ``evaluate`` resumes too). Training
runs in a subprocess, so one run that crashes costs that run only; evaluation errors are
caught the same way.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from speechllama.resultlog import read_rows as read_log
from speechllama.resultlog import replace_rows

RESULTS = "results.jsonl"


class CampaignError(ValueError):
    """A bad spec or data folder: a one-line message naming the file and the problem."""


@dataclass(frozen=True)
class EvalSet:
    """A data set scored after each run; ``limit`` caps the utterances (first N) for cost."""

    name: str
    limit: int | None = None


@dataclass(frozen=True)
class Protocol:
    """What every run shares. ``train``: the data sets the filters choose from (``DATA/SET/
    manifest.jsonl``); ``exclude``: sets whose audio is never trained on (the locked set);
    ``plot``: the eval sets (real speech) that the report's figure shows."""

    preset: str = "small"
    steps: int = 600
    lr: float = 2e-3
    warmup: int = 150
    seed: int = 0
    max_duration: float = 120.0
    dev: str = "dev"
    dev_utterances: int = 100
    train: tuple[str, ...] = ("train",)
    exclude: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    evals: tuple[EvalSet, ...] = ()
    plot: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunSpec:
    """One row: ``filter`` chooses the training utterances (see ``select``), ``extra`` are
    added to the protocol's ``speechllama train`` arguments."""

    name: str
    lever: str
    filter: str = "all"
    extra: tuple[str, ...] = field(default_factory=tuple)


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(shlex.split(value))
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CampaignError(f"{where}: expected a list of strings, got {value!r}")
    return tuple(value)


def load_spec(path: str | os.PathLike[str]) -> tuple[Protocol, list[RunSpec]]:
    """The protocol and the runs of a campaign TOML file (see the module docstring)."""
    try:
        spec = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CampaignError(f"{path}: {exc}") from exc
    raw = dict(spec.get("protocol", {}))
    for key in ("train", "exclude", "extra", "plot"):
        if key in raw:
            raw[key] = _strings(raw[key], f"{path}: protocol.{key}")
    evals = tuple(EvalSet(str(e["set"]), e.get("limit")) for e in spec.get("eval", []))
    try:
        protocol = Protocol(**raw, evals=evals)
    except TypeError as exc:
        raise CampaignError(f"{path}: [protocol]: {exc}") from exc
    runs = []
    for i, row in enumerate(spec.get("run", [])):
        if "name" not in row or "lever" not in row:
            raise CampaignError(f"{path}: run #{i + 1} needs a name and a lever")
        extra = _strings(row.get("extra", []), f"{path}: run {row['name']}.extra")
        runs.append(RunSpec(str(row["name"]), str(row["lever"]), str(row.get("filter", "all")),
                            extra))  # fmt: skip
    names = [r.name for r in runs]
    if len(set(names)) != len(names) or not runs:
        raise CampaignError(f"{path}: needs at least one run, with distinct names")
    return protocol, runs


def engine(row: dict[str, Any]) -> str:
    """The speech source of a manifest row: the TTS engine of ``voice`` ("flite/awb" ->
    "flite"), else ``source`` (FSDD rows: "fsdd")."""
    voice = row.get("voice")
    if isinstance(voice, str) and "/" in voice:
        return voice.split("/", 1)[0]
    return str(row.get("source", "unknown")).split(" ", 1)[0]


def read_rows(manifest: Path) -> list[dict[str, Any]]:
    """A manifest's JSON rows with absolute audio paths (relative ones are relative to the
    manifest's folder), so a filtered copy written elsewhere still finds its audio."""
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise CampaignError(f"{manifest}: {exc.strerror or exc}") from exc
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CampaignError(f"{manifest}:{n}: not JSON: {exc.msg}") from exc
        path = Path(row["audio_filepath"])
        if not path.is_absolute():
            row["audio_filepath"] = str((manifest.parent / path).resolve())
        rows.append(row)
    return rows


def select(rows: list[dict[str, Any]], spec: str, seed: int, where: str) -> list[dict[str, Any]]:
    """The rows a filter keeps, in their manifest order. Terms, all applied: ``all``;
    ``engines=a,b`` (see ``engine``); ``hours=H`` (a seeded random subset of about H hours,
    the same subset for the same rows and seed, so learning-curve points nest)."""
    kept = rows
    for term in spec.split():
        key, _, value = term.partition("=")
        if key == "all":
            continue
        if key == "engines":
            wanted = set(value.split(","))
            kept = [r for r in kept if engine(r) in wanted]
        elif key == "hours":
            order = list(range(len(kept)))
            random.Random(seed).shuffle(order)
            budget, chosen = float(value) * 3600.0, set()
            for i in order:
                if budget < float(kept[i]["duration"]):
                    break
                budget -= float(kept[i]["duration"])
                chosen.add(i)
            kept = [r for i, r in enumerate(kept) if i in chosen]
        elif key != "add":  # add=SET is resolved by training_rows
            raise CampaignError(f"{where}: unknown filter term {term!r}")
    if not kept:
        raise CampaignError(f"{where}: filter {spec!r} keeps no utterance")
    return kept


def manifest_path(data: Path, name: str) -> Path:
    """A spec's set name -> ``DATA/NAME/manifest.jsonl``; a name ending in ``.jsonl`` is a
    manifest path itself (e.g. the part of a training set whose encoder outputs are cached)."""
    return Path(name) if name.endswith(".jsonl") else data / name / "manifest.jsonl"


def training_rows(protocol: Protocol, run: RunSpec, data: Path) -> list[dict[str, Any]]:
    """The run's training utterances: the filter over the protocol's ``train`` sets plus any
    ``add=SET`` sets (unfiltered, e.g. ``add=fsdd-train``), minus every ``exclude`` set."""
    added = [t.partition("=")[2] for t in run.filter.split() if t.startswith("add=")]
    rows = [r for s in protocol.train for r in read_rows(manifest_path(data, s))]
    rows = select(rows, run.filter, protocol.seed, f"run {run.name}")
    rows += [r for s in added for r in read_rows(manifest_path(data, s))]
    banned = {r["audio_filepath"] for s in protocol.exclude
              for r in read_rows(manifest_path(data, s))}  # fmt: skip
    return [r for r in rows if r["audio_filepath"] not in banned]


def load_results(exp: Path) -> list[dict[str, Any]]:
    return read_log(exp / RESULTS)[0]


@dataclass(frozen=True)
class Settings:
    """Where and how: ``exp`` the campaign folder, ``data`` the data folder, ``device`` for
    evaluation (training picks a GPU by itself), ``command`` how to start ``speechllama train``
    (default: this Python's ``-m speechllama``)."""

    data: Path
    exp: Path
    tokenizer: Path
    cache_dir: Path | None = None
    device: str = "cpu"
    threads: int | None = None
    command: tuple[str, ...] = (sys.executable, "-m", "speechllama")


def train_args(protocol: Protocol, run: RunSpec, s: Settings, manifest: Path) -> list[str]:
    """The ``speechllama train`` arguments of one run (the protocol's, then the row's)."""
    out = s.exp / run.name / "model"
    args = [
        "train", "--train", str(manifest), "--dev", str(manifest_path(s.data, protocol.dev)),
        "--tokenizer", str(s.tokenizer), "--preset", protocol.preset, "--out", str(out),
        "--max-steps", str(protocol.steps), "--warmup", str(protocol.warmup),
        "--lr", str(protocol.lr), "--seed", str(protocol.seed),
        "--max-duration", str(protocol.max_duration),
        "--eval-every", str(protocol.steps), "--eval-utterances", str(protocol.dev_utterances),
        "--save-every", str(protocol.steps), "--keep-last", "1", "--log-every", "50",
        "--cache-dir", str(s.cache_dir or s.exp / "encoder_cache"), "--no-progress", "--resume",
    ]  # fmt: skip
    if s.threads:
        args += ["--threads", str(s.threads)]
    return args + list(protocol.extra) + list(run.extra)


def _call(s: Settings, args: Sequence[str], log: Path) -> int:
    """Run speechllama with ``args`` in a subprocess (a crash costs this run only), its output
    appended to ``log``; the exit code."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as f:
        f.write("+ " + shlex.join([*s.command, *args]) + "\n")
        f.flush()
        return subprocess.run([*s.command, *args], stdout=f, stderr=subprocess.STDOUT).returncode


def _dev_ce(model_dir: Path) -> float | None:
    """The last dev cross-entropy the training loop logged."""
    ce = None
    for row in read_log(model_dir / "metrics.jsonl")[0]:  # a killed run may end in a torn line
        if row.get("event") == "eval" and "dev_ce" in row:
            ce = float(row["dev_ce"])
    return ce


def source_wers(manifest: Path, hypotheses: Path) -> dict[str, float]:
    """WER per ``source`` of the manifest (its first word: "LJSpeech-1.1 (via ...)" ->
    "LJSpeech-1.1"), from the per-utterance error counts of ``evaluate``'s hypotheses.jsonl."""
    label = {str(Path(r["audio_filepath"]).resolve()): str(r.get("source", "?")).split(" ", 1)[0]
             for r in read_rows(manifest)}  # fmt: skip
    errors: dict[str, list[int]] = {}
    for line in hypotheses.read_text("utf-8").splitlines():
        row = json.loads(line) if line.strip() else {}
        if "words" not in row:
            continue  # a failed utterance
        e = errors.setdefault(label.get(str(Path(row["audio_filepath"]).resolve()), "?"), [0, 0])
        e[0] += row["substitutions"] + row["deletions"] + row["insertions"]
        e[1] += row["words"]
    return {k: e / max(n, 1) for k, (e, n) in sorted(errors.items())}


def evaluate(protocol: Protocol, run: RunSpec, s: Settings, ckpt: Path) -> dict[str, Any]:
    """Greedy WER of ``ckpt`` on every eval set (``wer``), per source where a set has more
    than one (``by_source``), and the teacher-forced cross-entropy of the references (``ce``,
    nats per token, head 1): at a cheap budget every run's WER sits near 90%, while the CE still
    ranks the levers. In this process (decoding raises, it does not crash), with ``evaluate``'s
    files in ``EXP/NAME/eval/SET/`` so a killed evaluation resumes."""
    import torch

    from speechllama.decoding.options import DecodingOptions
    from speechllama.evaluate import HYPOTHESES, evaluate_manifest
    from speechllama.transcribe import load_model

    if s.threads:
        torch.set_num_threads(s.threads)
    model = load_model(ckpt, device=s.device)
    wer: dict[str, float] = {}
    ce: dict[str, float] = {}
    by_source: dict[str, dict[str, float]] = {}
    for ev in protocol.evals:
        manifest = s.data / ev.name / "manifest.jsonl"
        out = s.exp / run.name / "eval" / ev.name
        summary = evaluate_manifest(model, manifest, DecodingOptions(strategy="greedy"),
                                    out_dir=out, limit=ev.limit)  # fmt: skip
        if summary["failed"]:
            raise CampaignError(f"run {run.name}: {summary['failed']} utterance(s) of {ev.name} "
                                f"failed to decode, see {out / HYPOTHESES}")  # fmt: skip
        wer[ev.name] = float(summary["wer"])
        ce[ev.name] = float(summary["head_ce"][0])
        sources = source_wers(manifest, out / HYPOTHESES)
        if len(sources) > 1:
            by_source[ev.name] = sources
    return {"wer": wer, "ce": ce, "by_source": by_source}


def run_one(protocol: Protocol, run: RunSpec, s: Settings) -> dict[str, Any]:
    """Train (or continue) and evaluate one run; its results row."""
    from speechllama.checkpoint import list_checkpoints

    rows = training_rows(protocol, run, s.data)
    manifest = s.exp / run.name / "train.jsonl"
    replace_rows(manifest, rows)
    start = time.monotonic()
    code = _call(s, train_args(protocol, run, s, manifest), s.exp / run.name / "train.log")
    seconds = time.monotonic() - start
    model = s.exp / run.name / "model"
    ckpts = list_checkpoints(model)
    if code != 0 or not ckpts:
        raise CampaignError(f"run {run.name}: training failed (exit {code}), see "
                            f"{s.exp / run.name / 'train.log'}")  # fmt: skip
    scores = evaluate(protocol, run, s, ckpts[-1])
    return {
        "name": run.name,
        "lever": run.lever,
        "filter": run.filter,
        "extra": shlex.join(run.extra),
        "utterances": len(rows),
        "hours": round(sum(float(r["duration"]) for r in rows) / 3600.0, 3),
        "steps": protocol.steps,
        "preset": protocol.preset,
        "seed": protocol.seed,
        "train_seconds": round(seconds, 1),
        "checkpoint": str(ckpts[-1]),
        "dev_ce": _dev_ce(model),
        **scores,
    }


def missing_scores(protocol: Protocol, row: dict[str, Any]) -> list[str]:
    """What a finished run's row lacks under ``protocol``: eval sets added to the spec after it
    ran (their WER), and the cross-entropies of rows from before CE was recorded."""
    lacking = [ev.name for ev in protocol.evals if ev.name not in row.get("wer", {})]
    if "ce" not in row:
        lacking.append("the cross-entropies")
    return lacking


def run_campaign(
    protocol: Protocol,
    runs: Sequence[RunSpec],
    s: Settings,
    only: Sequence[str] = (),
    say: Callable[[str], None] = print,
) -> int:
    """Every run not in ``EXP/results.jsonl`` yet (or only those named in ``only``), in spec
    order; each finished run's row is added at once. The number of runs that failed."""
    unknown = set(only) - {r.name for r in runs}
    if unknown:
        raise CampaignError(f"no run named {', '.join(sorted(unknown))} in the spec")
    failed = 0
    for run in runs:
        if only and run.name not in only:
            continue
        done = next((row for row in load_results(s.exp) if row["name"] == run.name), None)
        lacking = [] if done is None else missing_scores(protocol, done)
        if done is not None and not lacking:
            say(f"campaign: {run.name}: done before, skipped")
            continue
        if done is not None:  # a set added to the spec, or a row from before CE was recorded
            say(f"campaign: {run.name}: done before, adding {', '.join(lacking)}")
            try:  # decoding resumes from EXP/NAME/eval: only new sets and the CE pass run
                scores = evaluate(protocol, run, s, Path(done["checkpoint"]))
            except (ValueError, OSError, RuntimeError) as exc:
                say(f"campaign: error: {exc}")
                failed += 1
                continue
            rows = load_results(s.exp)  # again: another campaign process may have added rows
            replace_rows(s.exp / RESULTS, [{**r, **scores} if r["name"] == run.name else r
                                           for r in rows])  # fmt: skip
            continue
        say(f"campaign: {run.name} ({run.lever}: {run.filter} {shlex.join(run.extra)})")
        try:
            row = run_one(protocol, run, s)
        except (ValueError, OSError, RuntimeError) as exc:  # CampaignError is a ValueError
            say(f"campaign: error: {exc}")
            failed += 1
            continue
        replace_rows(s.exp / RESULTS, [*load_results(s.exp), row])
        wers = " ".join(f"{k} {100 * v:.1f}%" for k, v in row["wer"].items())
        say(f"campaign: {run.name}: {row['hours']} h, {row['train_seconds']:.0f} s | WER {wers}")
    return failed
