"""Checkpoints from strangers: only JSON and safetensors are ever read (pickle never, even when
it is the only weights file present); absurd sizes, unknown keys and wrong shapes are refused
before one real tensor is allocated; a fuzzed config is a one-line ``CheckpointError`` or a
model, never a crash; and no source file of the package can run code from its input (no
eval/exec, no shell strings, no pickle loads)."""

from __future__ import annotations

import ast
import copy
import json
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import speechllama
from speechllama import checkpoint as ckpt_module
from speechllama import shadow as shadow_module
from speechllama.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from speechllama.model import speechllama as model_module
from speechllama.model.config import preset
from speechllama.model.speechllama import SpeechLLaMA
from speechllama.text import train_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    tok = train_tokenizer(["the cat sat", "a dog ran home", "we like tea"] * 4,
                          root / "tokenizer.model", vocab_size=24)  # fmt: skip
    torch.manual_seed(0)
    return save_checkpoint(SpeechLLaMA(preset("tiny", tok.vocab_size)).eval(), tok, root / "c")


@pytest.fixture
def copy_of(good: Path, tmp_path: Path):
    def make(edit_config=None) -> Path:
        d = tmp_path / f"c{len(list(tmp_path.iterdir()))}"
        shutil.copytree(good, d)
        if edit_config is not None:
            doc = json.loads((d / "config.json").read_text())
            edit_config(doc)
            (d / "config.json").write_text(json.dumps(doc))
        return d

    return make


@pytest.fixture
def built_on(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The device type each SpeechLLaMA was built on during the test (meta = no memory)."""
    seen: list[str] = []

    class Spy(SpeechLLaMA):
        def __init__(self, *args, **kwargs) -> None:
            seen.append(torch.empty(0).device.type)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(model_module, "SpeechLLaMA", Spy)
    return seen


@pytest.fixture(autouse=True)
def no_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any unpickling during a test is a failure."""

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint loader unpickled something")

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)


def test_a_good_checkpoint_loads_without_pickle(good: Path, built_on: list[str]) -> None:
    dynamo_before = "torch._dynamo" in sys.modules
    model, tok, doc = load_checkpoint(good)
    assert built_on == ["meta", "cpu"] and tok.vocab_size == 24
    # the shape-only build must not drag in torch._dynamo (20 s of imports on a loaded CPU)
    assert dynamo_before or "torch._dynamo" not in sys.modules
    assert doc["model"]["decoder"]["vocab_size"] == model.config.decoder.vocab_size


def test_a_vocabulary_of_a_billion_is_refused_from_the_config(copy_of, built_on) -> None:
    d = copy_of(lambda doc: doc["model"]["decoder"].update(vocab_size=10**9))
    with pytest.raises(CheckpointError, match=r"config\.json: .*vocab_size=1000000000 is outside"):
        load_checkpoint(d)
    assert built_on == []


def test_sizes_inside_each_limit_but_too_big_together_are_refused_unallocated(
    copy_of, built_on
) -> None:
    big = {
        "vocab_size": 1_000_000,
        "d_model": 16384,
        "n_heads": 128,
        "n_kv_heads": 128,
        "n_layers": 48,
        "d_ff": 65536,
    }  # fmt: skip  (about 200 billion parameters)
    d = copy_of(lambda doc: doc["model"]["decoder"].update(big))
    with pytest.raises(CheckpointError, match=r"needs \d+\.\d GiB for its weights, more than"):
        load_checkpoint(d)
    assert built_on == ["meta"]


def test_the_memory_check_counts_every_weight(good: Path, monkeypatch, built_on) -> None:
    need = sum(t.numel() * t.element_size() for t in load_checkpoint(good)[0].state_dict().values())
    built_on.clear()
    monkeypatch.setattr(shadow_module, "memory_bytes", lambda: need - 1)
    with pytest.raises(CheckpointError, match="more than this machine"):
        load_checkpoint(good)
    monkeypatch.setattr(shadow_module, "memory_bytes", lambda: need)
    load_checkpoint(good)
    assert built_on == ["meta", "meta", "cpu"]


@pytest.mark.parametrize(
    "where, change, words",
    [
        ("model", {"evil": 1}, "unknown model config keys"),
        ("decoder", {"evil": 1}, "unknown keys in model config 'decoder'"),
        ("decoder", {"d_model": 128}, r"model\.safetensors: tensor .* has shape"),
        ("decoder", {"n_layers": 3}, r"tensors do not match the model config \(missing"),
        ("encoder", {"kind": "transformer-xl"}, "cannot build this model|encoder"),
        ("heads", {"kind": "nonsense", "num_heads": 2}, "cannot build this model|heads"),
    ],
)
def test_unknown_keys_and_wrong_shapes_are_refused_before_allocating(
    copy_of, built_on, where: str, change: dict, words: str
) -> None:
    def edit(doc: dict) -> None:
        (doc["model"] if where == "model" else doc["model"][where]).update(change)

    with pytest.raises(CheckpointError, match=words) as err:
        load_checkpoint(copy_of(edit))
    assert "config.json" in str(err.value) or "model.safetensors" in str(err.value)
    assert "\n" not in str(err.value) and "cpu" not in built_on


def test_pickles_are_never_read_even_when_they_are_all_there_is(copy_of) -> None:
    d = copy_of()
    weights = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").unlink()
    for name in ("pytorch_model.bin", "model.bin", "model.pt", "model.ckpt"):
        (d / name).write_bytes(pickle.dumps({"weights": weights}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing"):
        load_checkpoint(d)


@pytest.mark.parametrize(
    "content, words",
    [
        ("{" * 100_000 + "}" * 100_000, "not valid JSON"),
        (
            '{"format": "speechllama-checkpoint", "version": 1, "weights": []}',
            "'weights' must be a JSON object",
        ),
        ("[1, 2]", "not a speechllama checkpoint config"),
        (" " * (ckpt_module.MAX_CONFIG_BYTES + 1), "more than a config holds"),
    ],
)
def test_hostile_config_files_are_one_line_errors(copy_of, content: str, words: str) -> None:
    d = copy_of()
    (d / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match=words) as err:
        load_checkpoint(d)
    assert "\n" not in str(err.value)


def test_truncated_weights_are_refused(copy_of) -> None:
    d = copy_of()
    data = (d / "model.safetensors").read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        (d / "model.safetensors").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable"):
            load_checkpoint(d)


_FIXTURE_OK = [HealthCheck.function_scoped_fixture]  # tmp_path is reused: each example rewrites it
_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 10**12), st.floats(allow_nan=True),
    st.text(max_size=6), st.lists(st.integers(0, 9), max_size=3),
)  # fmt: skip


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_fuzzed_configs_load_or_fail_in_one_line(good: Path, tmp_path: Path, data) -> None:
    doc = json.loads((good / "config.json").read_text())
    mutated = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, 3))):
        part = data.draw(st.sampled_from(["encoder", "adapter", "decoder", "heads"]))
        key = data.draw(st.sampled_from(sorted(mutated["model"][part])))
        mutated["model"][part][key] = data.draw(_VALUES)
    d = tmp_path / "fuzz"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(good, d)
    (d / "config.json").write_text(json.dumps(mutated))
    try:
        model, _, _ = load_checkpoint(d)
    except CheckpointError as exc:
        assert "\n" not in str(exc) and str(d) in str(exc)
    else:  # only changes that keep every weight's shape can load
        assert sum(p.numel() for p in model.parameters()) > 0


# --- the package's own code ----------------------------------------------------------------


def _calls(tree: ast.AST):
    """(call node, owner name or "", function name, keyword values) of every call; the owner
    is "" for a bare name (``eval(x)``) and "?" for an attribute of an expression."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name):
            owner, name = "", f.id
        elif isinstance(f, ast.Attribute):
            owner, name = (f.value.id if isinstance(f.value, ast.Name) else "?"), f.attr
        else:
            continue
        yield node, owner, name, {k.arg: k.value for k in node.keywords}


_BANNED = {
    ("os", "system"), ("os", "popen"), ("pickle", "load"), ("pickle", "loads"),
    ("yaml", "load"), ("marshal", "loads"), ("dill", "load"), ("joblib", "load"),
}  # fmt: skip


def test_no_source_file_can_run_code_from_its_input() -> None:
    root = Path(speechllama.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node, owner, name, kwargs in _calls(tree):
            where = f"{path.relative_to(root)}:{node.lineno}"
            if owner == "" and name in ("eval", "exec", "compile", "__import__"):
                found.append(f"{where} {name}()")
            if (owner, name) in _BANNED:
                found.append(f"{where} {owner}.{name}()")
            shell = kwargs.get("shell")
            if shell is not None and not (isinstance(shell, ast.Constant) and shell.value is False):
                found.append(f"{where} shell=")
            if (owner, name) == ("torch", "load"):
                wo = kwargs.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    found.append(f"{where} torch.load without weights_only=True")
            allow = kwargs.get("allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                found.append(f"{where} allow_pickle")
    assert found == []
