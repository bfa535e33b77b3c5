"""Try every bad input of issue 8 against the real command line and print a Markdown table.

Usage (about two minutes on a shared 2-core CPU; nothing is downloaded)::

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python scripts/bad_input_audit.py \
        [--model CKPT_DIR] [--work /tmp/speechllama_audit] > table.md

Without ``--model`` a randomly initialised ``tiny`` checkpoint is saved under ``--work`` (its
transcripts are noise, but every error path and the memory bounds are exercised); with a trained
checkpoint the transcripts of the resampled and down-mixed copies of one real utterance can be
compared with the original's. Each audio input runs ``speechllama transcribe FILE`` in its own
process and reports the exit code, the first error line (or the transcript), wall time and the
process's peak resident memory. Then come the manifest cases (``speechllama data validate``
and ``speechllama evaluate --skip-bad``), the SIGKILL rounds (``transcribe --output`` and
``evaluate`` killed at random moments, re-run, compared with an uninterrupted run) and the
untrusted checkpoints (``speechllama transcribe --model`` on doctored copies).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

REPO = Path(__file__).resolve().parents[1]
SPEECH = Path("/work/shared/data/real_en_smoke/ljspeech/LJ001-0002.wav")
SENTENCES = [
    "in being comparatively modern",
    "the quick brown fox jumps over the lazy dog",
    "printing in the only sense with which we are at present concerned",
    "a stitch in time saves nine",
]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from speechllama.cli import main; sys.exit(main())",
            *args]  # fmt: skip


def no_root(argv: list[str]) -> list[str]:
    """Root reads any file: drop the capabilities that let it, so file modes apply."""
    if os.geteuid() != 0:
        return argv
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", *argv]


def run(argv: list[str]) -> dict:
    """Run ``argv``; exit code, output, seconds and peak RSS (MiB, from wait4)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {
            "rc": proc.returncode,
            "out": out.read().decode(errors="replace"),
            "err": err.read().decode(errors="replace"),
            "seconds": time.perf_counter() - t0,
            "rss": usage.ru_maxrss / 1024,
        }


def speech() -> tuple[np.ndarray, int]:
    if SPEECH.is_file():
        wave, rate = sf.read(SPEECH, dtype="float32")
        return wave, rate
    rate = 16000
    t = np.arange(int(1.9 * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(
        np.float32
    ), rate


def make_inputs(root: Path) -> list[tuple[str, Path, str]]:
    """(name, path, what a correct outcome is) for every bad audio input."""
    root.mkdir(parents=True, exist_ok=True)
    wave, rate = speech()
    at16 = soxr.resample(wave, rate, 16000)
    cases: list[tuple[str, Path, str]] = []

    def add(name: str, path: Path, expect: str) -> None:
        cases.append((name, path, expect))

    add("reference: the speech at 16 kHz", root / "speech16k.wav", "transcript")
    sf.write(root / "speech16k.wav", at16, 16000)
    add("missing path", root / "nope.wav", "error")
    (root / "adir.wav").mkdir(exist_ok=True)
    add("a directory", root / "adir.wav", "error")
    noperm = root / "noperm.wav"
    sf.write(noperm, at16, 16000)
    noperm.chmod(0)
    add("no read permission (mode 000)", noperm, "error")
    (root / "empty.wav").write_bytes(b"")
    add("zero bytes", root / "empty.wav", "error")
    (root / "text.wav").write_text("this is not audio\n" * 20)
    add("text file renamed .wav", root / "text.wav", "error")
    sf.write(root / "full.flac", at16, 16000)
    data = (root / "full.flac").read_bytes()
    (root / "truncated.flac").write_bytes(data[: len(data) // 2])
    add("truncated FLAC (half the bytes)", root / "truncated.flac", "error")
    sf.write(root / "full.wav", at16, 16000)
    data = (root / "full.wav").read_bytes()
    (root / "truncated.wav").write_bytes(data[: len(data) // 2])
    add("truncated WAV (half the bytes)", root / "truncated.wav", "error")
    bad = at16.copy()
    bad[1000] = np.nan
    sf.write(root / "nan.wav", bad, 16000, subtype="FLOAT")
    add("NaN sample (float WAV)", root / "nan.wav", "error")
    bad[1000] = np.inf
    sf.write(root / "inf.wav", bad, 16000, subtype="FLOAT")
    add("infinite sample (float WAV)", root / "inf.wav", "error")
    sf.write(root / "zeros.wav", np.zeros(3 * 16000, np.float32), 16000)
    add("pure digital silence, 3 s", root / "zeros.wav", "empty")
    hiss = 1e-4 * np.random.default_rng(0).standard_normal(3 * 16000)
    sf.write(root / "hiss.wav", hiss.astype(np.float32), 16000)
    add("near silence (-80 dBFS hiss), 3 s", root / "hiss.wav", "empty")
    sf.write(root / "short.wav", at16[4000:4160], 16000)
    add("0.01 s clip", root / "short.wav", "error or transcript")
    for sr in (8000, 44100, 48000):
        sf.write(root / f"speech{sr}.wav", soxr.resample(at16, 16000, sr), sr)
        add(f"{sr / 1000:g} kHz", root / f"speech{sr}.wav", "same as reference")
    sf.write(root / "stereo.wav", np.stack([at16, at16], 1), 16000)
    add("stereo", root / "stereo.wav", "same as reference")
    six = np.stack([at16 if c in (0, 1, 2) else 0.01 * at16 for c in range(6)], 1)
    sf.write(root / "six.wav", six, 16000)
    add("6-channel (5.1)", root / "six.wav", "transcript")
    long = root / "two_hours.wav"
    sparse_long_wav(long, 7200.0, [(600.0, at16), (3600.0, at16), (7100.0, at16)])
    add("2-hour file (silence + 3 utterances)", long, "3 segments")
    return cases


def sparse_long_wav(path: Path, seconds: float, clips: list[tuple[float, np.ndarray]]) -> None:
    """A 16 kHz PCM16 WAV of ``seconds`` of digital silence (a sparse file: it costs no disk)
    with ``clips`` (float samples) written at their offsets."""
    frames = int(seconds * 16000)
    fmt = struct.pack("<HHIIHH", 1, 1, 16000, 32000, 2, 16)
    header = b"RIFF" + struct.pack("<I", 36 + 2 * frames) + b"WAVEfmt " + struct.pack("<I", 16)
    with path.open("wb") as f:
        f.write(header + fmt + b"data" + struct.pack("<I", 2 * frames))
        f.truncate(44 + 2 * frames)
        for start, clip in clips:
            f.seek(44 + 2 * int(start * 16000))
            f.write((np.clip(clip, -1, 1) * 32767).astype("<i2").tobytes())


def make_model(root: Path) -> Path:
    import torch

    from speechllama.checkpoint import save_checkpoint
    from speechllama.model.config import preset
    from speechllama.model.speechllama import SpeechLLaMA
    from speechllama.text import train_tokenizer

    tok = train_tokenizer(SENTENCES * 4, root / "tok" / "tokenizer.model", vocab_size=40)
    torch.manual_seed(0)
    model = SpeechLLaMA(preset("tiny", tok.vocab_size)).eval()
    return save_checkpoint(model, tok, root / "ckpt", meta={"note": "random weights (audit)"})


def first_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[0] if lines else ""


def cell(text: str, limit: int = 150) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def audio_rows(cases: list[tuple[str, Path, str]], model: Path, root: Path) -> list[str]:
    rows = [
        "| input | expected | exit | what happened | decoder calls, tokens | s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, path, expect in cases:
        out = root / "one.jsonl"
        out.unlink(missing_ok=True)
        argv = cli("transcribe", str(path), "--model", str(model), "--threads", "1", "-o", str(out))
        r = run(no_root(argv) if "permission" in name else argv)
        cost = "-"
        if r["rc"] == 0:
            line = r["out"].split("\n", 1)[0]
            text = line.split("\t", 1)[1].strip() if "\t" in line else ""
            what = f"transcript: {text!r}" if text else "empty transcript"
            row = jsonl(out)[0]
            cost = f"{row['decoder_calls']}, {row['tokens']}"
        else:
            what = first_line(r["err"])
        what = what.replace(str(root) + "/", "")
        spent = f"{r['seconds']:.1f} | {r['rss']:.0f}"
        rows.append(f"| {name} | {expect} | {r['rc']} | {cell(what)} | {cost} | {spent} |")
    return rows


def manifest_rows(model: Path, root: Path, speech16k: Path) -> list[str]:
    good = {"audio_filepath": str(speech16k), "text": "in being comparatively modern",
            "duration": round(sf.info(speech16k).duration, 3)}  # fmt: skip
    lines = [
        json.dumps(good),
        '{"audio_filepath": "x.wav", "text": "cut short',
        json.dumps({"text": "no path", "duration": 1.0}),
        json.dumps({**good, "id": "u2", "text": "   "}),
        json.dumps({**good, "id": "u3", "text": "caf\u00e9 na\u00efve \u4f60\u597d"}),
        json.dumps({**good, "id": "u4", "text": "\ud800 lone surrogate"}),
        json.dumps({**good, "id": "u3"}),
        json.dumps(good),
    ]
    manifest = root / "bad_manifest.jsonl"
    manifest.write_bytes(("\n".join(lines) + "\n").encode("utf-8", "surrogatepass") + b"\xff\xfe\n")
    rows = ["| command | exit | output (one line per problem) |", "|---|---|---|"]
    for argv in (
        cli("data", "validate", str(manifest)),
        cli("evaluate", str(manifest), "--out", str(root / "eval_bad"), "--model", str(model),
            "--threads", "1"),
        cli("evaluate", str(manifest), "--out", str(root / "eval_skip"), "--model", str(model),
            "--threads", "1", "--skip-bad", "--no-head-accuracy"),
    ):  # fmt: skip
        r = run(argv)
        shown = " / ".join(x for x in (r["out"] + r["err"]).strip().splitlines())
        shown = shown.replace(str(root) + "/", "")
        command = " ".join(a for a in argv[3:] if not a.startswith(str(root)))
        rows.append(f"| {cell(command, 80)} | {r['rc']} | {cell(shown, 900)} |")
    return rows


def kill_rounds(argv: list[str], watch: Path, rounds: int, seed: int) -> tuple[int, str]:
    """Run ``argv`` ``rounds`` times, each SIGKILLed a random 0-0.5 s after ``watch`` has grown
    (so mid-job), checking after each kill that every complete line of ``watch`` is JSON; then
    let it finish. Returns (kills that hit a live process, the last run's stderr)."""
    rng = random.Random(seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    hits = 0
    for _ in range(rounds):
        before = watch.stat().st_size if watch.exists() else 0
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=env, cwd=REPO)  # fmt: skip
        while proc.poll() is None and (not watch.exists() or watch.stat().st_size <= before):
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            hits += 1
        proc.wait()
        data = watch.read_bytes() if watch.exists() else b""
        for line in data.split(b"\n")[:-1]:
            json.loads(line)  # raises if a kill left anything but a torn last line
    return hits, run(argv)["err"]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def compare(want: list[dict], got: list[dict], value: str) -> tuple[int, int, int]:
    """(rows lost, rows duplicated, rows whose ``value`` differs) of ``got`` against ``want``,
    both keyed by audio path."""
    ref = {r["audio_filepath"]: r.get(value) for r in want}
    seen = {r["audio_filepath"]: r.get(value) for r in got}
    lost = len(set(ref) - set(seen))
    return lost, len(got) - len(seen), sum(seen.get(k) != v for k, v in ref.items())


def batch_rows(model: Path, root: Path, cases: list[tuple[str, Path, str]]) -> list[str]:
    """transcribe --output and evaluate, each killed 3 times mid-job and then finished,
    against an uninterrupted run."""
    files = [str(p) for name, p, _ in cases if "permission" not in name and "2-hour" not in name]
    wave, rate = speech()
    wave = soxr.resample(wave, rate, 16000)
    copies = [root / f"copy{i}.wav" for i in range(24)]
    for i, path in enumerate(copies):
        sf.write(path, wave[: 8000 + 900 * i], 16000)
    files += [str(p) for p in copies]
    base = ["--model", str(model), "--threads", "1", "--batch-size", "1"]
    ref, out = root / "ref.jsonl", root / "killed.jsonl"
    for p in (ref, out):
        p.unlink(missing_ok=True)
    run(cli("transcribe", *files, "-o", str(ref), *base))
    hits, err = kill_rounds(cli("transcribe", *files, "-o", str(out), *base), out, 3, seed=1)
    said = first_line(err) if "skipping" in err else "nothing skipped"
    said = cell(said.replace(str(root) + "/", ""))
    lost, dup, diff = compare(jsonl(ref), jsonl(out), "text")
    rows = [
        "| batch job | SIGKILLs mid-job | rows expected | lost | duplicated | "
        "differ from uninterrupted | the final re-run said |",
        "|---|---|---|---|---|---|---|",
        f"| transcribe --output ({len(files)} files, the bad ones included) | {hits} | "
        f"{len(jsonl(ref))} | {lost} | {dup} | {diff} | {said} |",
    ]
    manifest = root / "copies.jsonl"
    manifest.write_text("".join(
        json.dumps({"audio_filepath": str(p), "text": SENTENCES[0],
                    "duration": sf.info(p).duration}) + "\n" for p in copies))  # fmt: skip
    ev = ["--model", str(model), "--threads", "1", "--batch-size", "1", "--no-head-accuracy"]
    for name in ("ev_ref", "ev_kill"):
        shutil.rmtree(root / name, ignore_errors=True)
    run(cli("evaluate", str(manifest), "--out", str(root / "ev_ref"), *ev))
    killed = cli("evaluate", str(manifest), "--out", str(root / "ev_kill"), *ev)
    hits, err = kill_rounds(killed, root / "ev_kill" / "hypotheses.jsonl", 3, seed=2)
    said = next((x for x in err.splitlines() if "resumed" in x), "nothing resumed")
    want, got = jsonl(root / "ev_ref/hypotheses.jsonl"), jsonl(root / "ev_kill/hypotheses.jsonl")
    lost, dup, diff = compare(want, got, "token_ids")
    wer = [
        json.loads((root / d / "summary.json").read_text())["wer"] for d in ("ev_ref", "ev_kill")
    ]
    what = f"evaluate ({len(copies)} utterances; WER {wer[1]:.4f}, uninterrupted {wer[0]:.4f})"
    rows.append(f"| {what} | {hits} | {len(want)} | {lost} | {dup} | {diff} | {cell(said)} |")
    return rows


def checkpoint_rows(model: Path, root: Path, speech16k: Path) -> list[str]:
    cases = []

    def doctored(name: str, edit) -> None:
        d = root / f"ckpt_{len(cases)}"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(model, d)
        edit(d)
        cases.append((name, d))

    def config(change):
        def edit(d: Path) -> None:
            doc = json.loads((d / "config.json").read_text())
            change(doc)
            (d / "config.json").write_text(json.dumps(doc))

        return edit

    doctored("vocabulary of 10^9", config(lambda d: d["model"]["decoder"].update(vocab_size=10**9)))
    doctored("unknown config key", config(lambda d: d["model"]["decoder"].update(evil="x")))
    doctored(
        "huge but in-limit sizes (d_model 16384, 256 layers)",
        config(lambda d: d["model"]["decoder"].update(d_model=16384, n_layers=256, d_ff=131072)),
    )
    doctored(
        "wrong tensor shapes (d_model 128)",
        config(lambda d: d["model"]["decoder"].update(d_model=128)),
    )

    def pickle_instead(d: Path) -> None:
        (d / "model.safetensors").unlink()
        (d / "model.bin").write_bytes(b"\x80\x04\x95pickle")
        (d / "pytorch_model.bin").write_bytes(b"\x80\x04\x95pickle")

    doctored("weights only as a pickle (model.bin)", pickle_instead)
    doctored("config.json not JSON", lambda d: (d / "config.json").write_text("{'a': eval('1')}"))
    doctored("safetensors truncated", lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:1000]))  # fmt: skip
    rows = ["| checkpoint | exit | what happened | s | peak RSS MiB |", "|---|---|---|---|---|"]
    for name, d in cases:
        r = run(cli("transcribe", str(speech16k), "--model", str(d), "--threads", "1"))
        what = first_line(r["err"]) if r["rc"] else "loaded (!)"
        rows.append(f"| {name} | {r['rc']} | {cell(what.replace(str(root) + '/', ''))} | "
                    f"{r['seconds']:.1f} | {r['rss']:.0f} |")  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="checkpoint dir (default: random tiny)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/speechllama_audit"))
    parser.add_argument(
        "--only", nargs="+", choices=("audio", "manifest", "batch", "checkpoint"),
        default=("audio", "manifest", "batch", "checkpoint"), help="which tables (default: all)",
    )  # fmt: skip
    args = parser.parse_args()
    root = args.work
    root.mkdir(parents=True, exist_ok=True)
    if args.model is None:  # in a child: torch in this process would inflate the children's
        # peak RSS that wait4 reports (a forked child starts with its parent's high-water mark)
        code = f"import sys; sys.path[:0] = {[str(REPO), str(REPO / 'scripts')]!r}; "
        code += f"import bad_input_audit as a; a.make_model(a.Path({str(root)!r}))"
        subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ,
                       "OMP_NUM_THREADS": "1"})  # fmt: skip
    model = args.model or root / "ckpt"
    cases = make_inputs(root / "audio")
    print(f"model: {model if args.model else 'random tiny checkpoint'}\n")
    speech16k = root / "audio" / "speech16k.wav"
    tables = {
        "audio": lambda: audio_rows(cases, model, root / "audio"),
        "manifest": lambda: manifest_rows(model, root, speech16k),
        "batch": lambda: batch_rows(model, root / "audio", cases),
        "checkpoint": lambda: checkpoint_rows(model, root, speech16k),
    }
    for name in args.only:
        print("\n".join(tables[name]()) + "\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
