"""``speechllama info``: the table of parameters each multi-token head kind would add, against
the closed-form counts of each kind and the registry's own report, with the model's kind marked
and K = max(the model's K, 4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_transcribe import SENTENCES, make_checkpoint

from speechllama.checkpoint import save_checkpoint
from speechllama.cli import main
from speechllama.cli.info import heads_report
from speechllama.model.config import HeadsConfig, preset
from speechllama.model.heads import heads_parameter_report
from speechllama.model.speechllama import SpeechLLaMA
from speechllama.text import train_tokenizer

torch.set_num_threads(1)


def _heads_section(out: str) -> tuple[str, dict[str, tuple[int, str]]]:
    """The header line and {kind: (added, share)} of the heads table in ``info``'s output."""
    lines = out.split("\nheads: ", 1)[1].split("\nconfig:", 1)[0].splitlines()
    rows = {}
    for line in lines[2:]:  # after the header line and the column titles
        *name, added, share = line.split()
        rows[" ".join(name)] = (int(added.replace(",", "")), share)
    return lines[0], rows


def test_info_prints_what_each_head_kind_adds(tmp_path: Path, capsys) -> None:
    ckpt = make_checkpoint(tmp_path)  # tiny preset, next-token (linear, K = 1)
    assert main(["info", str(ckpt)]) == 0
    out = capsys.readouterr().out
    header, rows = _heads_section(out)
    assert header == "linear, K = 1; what each kind adds over the next-token output layer at K = 4:"
    cfg = preset("tiny", 40)
    d, V, k = cfg.decoder.d_model, 40, 4
    assert set(rows) == {"latent", "layer", "medusa", "projection"}
    assert rows["latent"][0] == k * d * d  # the paper's K·d²
    assert rows["projection"][0] == (k - 1) * d * V  # K - 1 more output matrices
    assert rows["medusa"][0] == (k - 1) * cfg.heads.medusa_blocks * (d * d + d)
    block = SpeechLLaMA(cfg.replace(heads=HeadsConfig("layer", 2))).heads.added_parameters()
    assert rows["layer"][0] == (k - 1) * block  # one decoder block per extra head
    total = sum(p.numel() for p in SpeechLLaMA(cfg).parameters())
    for added, share in rows.values():
        assert share == f"{100 * added / total:.1f}%"


def test_the_models_own_kind_is_marked_and_k_is_kept(tmp_path: Path, capsys) -> None:
    tok = train_tokenizer(SENTENCES, tmp_path / "tokenizer.model", vocab_size=40)
    cfg = preset("tiny", tok.vocab_size).replace(heads=HeadsConfig("latent", 6))
    torch.manual_seed(0)
    ckpt = save_checkpoint(SpeechLLaMA(cfg).eval(), tok, tmp_path / "ckpt")
    assert main(["info", str(ckpt)]) == 0
    header, rows = _heads_section(capsys.readouterr().out)
    assert header.startswith("latent, K = 6;") and header.endswith("at K = 6:")
    assert rows["latent (this model)"][0] == 6 * 64 * 64
    expected = heads_parameter_report(cfg, num_heads=6)
    assert {name.split()[0]: added for name, (added, _) in rows.items()} == expected


@pytest.mark.parametrize("total", [0, 1000])
def test_heads_report_without_a_checkpoint(total: int) -> None:
    cfg = preset("tiny", 40)
    k, table = heads_report(cfg, total)
    assert k == 4
    lines = table.splitlines()
    assert lines[0].split() == ["kind", "adds", "of", "model"]
    assert len(lines) == 1 + len(heads_parameter_report(cfg, num_heads=4))
    assert all(line.endswith("-") for line in lines[1:]) == (total == 0)
