"""The transcribe / evaluate / info commands: output formats, one-line errors naming each bad
file while the others are still transcribed, non-zero exit codes, --output resume, --help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_transcribe import make_checkpoint, write_wav

from speechllama.cli import main

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def wavs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("wavs")
    return [write_wav(root / f"w{i}.wav", d, seed=i) for i, d in enumerate([0.5, 0.3, 0.8])]


@pytest.mark.parametrize("command", ["transcribe", "evaluate", "info"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: speechllama {command}" in capsys.readouterr().out


def test_help_through_the_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "speechllama", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("transcribe", "evaluate", "info"):
        assert command in out


def test_transcribe_prints_path_tab_text(ckpt, wavs, capsys):
    from speechllama import load_model

    code = main(["transcribe", "--model", str(ckpt), "--threads", "1", *map(str, wavs)])
    captured = capsys.readouterr()
    assert code == 0 and captured.err == ""
    lines = dict(line.split("\t", 1) for line in captured.out.splitlines())
    assert set(lines) == {str(w) for w in wavs}
    expected = load_model(ckpt).transcribe(wavs)
    assert [lines[str(w)] for w in wavs] == [r.text for r in expected]


def test_transcribe_dtype_runs_the_decoder_at_that_precision(ckpt, wavs, capsys):
    from speechllama import load_model

    code = main(["transcribe", "--model", str(ckpt), "--threads", "1", "--dtype", "int8",
                 *map(str, wavs)])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0 and captured.err == ""
    lines = dict(line.split("\t", 1) for line in captured.out.splitlines())
    int8 = load_model(ckpt, precision="int8")
    assert int8.meta["decode_precision"] == "int8"
    assert int8.model.decoder.layers[0].mlp.packed.int8
    assert [lines[str(w)] for w in wavs] == [r.text for r in int8.transcribe(wavs)]
    with pytest.raises(ValueError, match="decode precision 'fp8'"):
        load_model(ckpt, precision="fp8")
    with pytest.raises(SystemExit):
        main(["transcribe", "--model", str(ckpt), "--dtype", "fp8", *map(str, wavs)])


def test_transcribe_stats_go_to_stderr_and_add_up(ckpt, wavs, capsys):
    from speechllama import load_model

    code = main(["transcribe", "--model", str(ckpt), "--threads", "1", "--stats", *map(str, wavs)])
    captured = capsys.readouterr()
    assert code == 0 and len(captured.out.splitlines()) == len(wavs)  # stdout unchanged
    results = load_model(ckpt).transcribe(wavs)
    for wav, r in zip(wavs, results, strict=True):
        assert f"{wav}: {r.decoder_calls} decoder calls, {len(r.tokens)} tokens" in captured.err
    calls, tokens = sum(r.decoder_calls for r in results), sum(len(r.tokens) for r in results)
    assert f"{calls} decoder calls for {tokens} tokens" in captured.err.splitlines()[-1]


def test_bad_files_give_one_line_each_and_the_rest_is_transcribed(ckpt, wavs, tmp_path, capsys):
    missing = tmp_path / "missing.wav"
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    text = tmp_path / "readme.wav"
    text.write_text("not audio at all\n")
    files = [str(wavs[0]), str(missing), str(empty), str(wavs[1]), str(text)]
    code = main(["transcribe", "--model", str(ckpt), "--batch-size", "2", *files])
    captured = capsys.readouterr()
    assert code != 0
    done = [line.split("\t", 1)[0] for line in captured.out.splitlines()]
    assert sorted(done) == sorted([str(wavs[0]), str(wavs[1])])
    errors = captured.err.strip().splitlines()
    for bad in (missing, empty, text):
        mine = [line for line in errors if str(bad) in line]
        assert len(mine) == 1 and mine[0].startswith("speechllama transcribe: error: ")
    assert errors[-1] == "speechllama transcribe: 3 of 5 file(s) failed"
    assert len(errors) == 4  # no tracebacks


def test_output_jsonl_and_resume(ckpt, wavs, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert main(["transcribe", "--model", str(ckpt), "-o", str(out), str(wavs[0])]) == 0
    capsys.readouterr()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1
    assert set(rows[0]) >= {"audio_filepath", "text", "decoder_calls", "tokens", "seconds"}
    assert rows[0]["audio_filepath"] == str(wavs[0]) and rows[0]["decoder_calls"] >= 1
    # a crash left half a line: that file is not "done", and the torn line is cut off so the
    # file stays valid JSONL (see speechllama/resultlog.py)
    with out.open("a") as f:
        f.write('{"audio_filepath": "' + str(wavs[1]))
    files = [str(w) for w in wavs]
    assert main(["transcribe", "--model", str(ckpt), "-o", str(out), *files]) == 0
    captured = capsys.readouterr()
    assert "skipping 1 file(s) already in" in captured.err
    assert sorted(line.split("\t")[0] for line in captured.out.splitlines()) == files[1:]
    lines = out.read_text().splitlines()
    good = [json.loads(line)["audio_filepath"] for line in lines]  # every line parses
    assert sorted(good) == files  # one complete row per file, the torn one gone
    # everything done: nothing transcribed, the model is not even loaded
    assert main(["transcribe", "--model", "/nonexistent", "-o", str(out), *files]) == 0
    assert capsys.readouterr().out == ""


def test_missing_model_is_a_one_line_error(wavs, capsys):
    assert main(["transcribe", "--model", "/no/such/model", str(wavs[0])]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["speechllama transcribe: error: /no/such/model: no such model directory "
                   "or bundled model name"]  # fmt: skip


def test_evaluate_command(ckpt, wavs, tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    rows = [{"audio_filepath": str(w), "text": "hello world", "duration": d}
            for w, d in zip(wavs, [0.5, 0.3, 0.8], strict=True)]  # fmt: skip
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval"
    code = main(["evaluate", str(manifest), "--model", str(ckpt), "--out", str(out),
                 "--limit", "2", "--batch-size", "1"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["utterances"] == 2 and summary["words"] == 4
    assert captured.out.startswith(f"WER {100 * summary['wer']:.2f}% ")
    assert (out / "alignments.txt").exists()
    # a missing file: reported on one line, left out of the score, exit code 1
    rows.append({"audio_filepath": str(tmp_path / "gone.wav"), "text": "x", "duration": 1.0})
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["evaluate", str(manifest), "--model", str(ckpt), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 2 and "gone.wav" in err[0]
    assert json.loads((out / "summary.json").read_text())["failed"] == 1


def test_info_command(ckpt, capsys):
    from speechllama import load_model

    assert main(["info", str(ckpt)]) == 0
    out = capsys.readouterr().out
    model = load_model(ckpt).model
    config = out.split("config:\n", 1)[1].split("\nparameters:", 1)[0]
    assert json.loads(config) == json.loads(json.dumps(model.config.to_dict()))
    table = out.split("parameters:\n", 1)[1].strip().splitlines()
    counts = {}
    for row in table[1:]:
        name, *numbers = row.split()
        counts[name] = [int(n.replace(",", "")) for n in numbers]
    total = sum(p.numel() for p in model.parameters())
    assert counts["total"] == [total, 0, total]  # the tiny preset trains everything
    assert {"encoder", "adapter", "decoder"} <= set(counts)
    assert sum(c[2] for name, c in counts.items() if name != "total") == total
    assert main(["info", "--model", str(ckpt)]) == 0
