"""torch.distributed: training under ``torchrun --nproc_per_node 2`` (gloo, CPU) against one
process with the same global batch (grad_accum 2), identical weights on both ranks, FSDP, exact
resumption; sharded ``evaluate`` and ``transcribe`` against one-process runs.

Two torchrun launches run every distributed job (starting two Python processes is most of the
cost): this file is also the worker script (``__main__`` below), which runs the real CLI for
each job and dumps each rank's weights after training. Dropout is 0 in the model and SpecAugment
is off, so the two-rank and one-process runs compute the same thing; they differ only in the
order of floating-point sums. A hang fails through the subprocess timeout.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from speechllama.checkpoint import save_checkpoint
from speechllama.cli import main
from speechllama.data.sampler import DurationBucketSampler
from speechllama.model.config import preset
from speechllama.model.speechllama import SpeechLLaMA
from speechllama.text import Tokenizer
from speechllama.train import loop

pytestmark = pytest.mark.slow
WORLD = 2
LAUNCH_TIMEOUT = 240  # seconds per launch: a hang fails the test instead of blocking CI
TRAIN = ["--max-steps", "3", "--max-duration", "1.0", "--buckets", "2", "--warmup", "1",
         "--log-every", "1", "--save-every", "2", "--eval-every", "3", "--no-spec-augment",
         "--no-bf16", "--no-progress", "--threads", "1"]  # fmt: skip


class _Stop(RuntimeError):
    """Simulated crash of an interrupted job (the CLI turns it into exit code 1)."""


def _worker(jobs_file: str, own_group: bool) -> int:
    """Run each job's CLI argv in this torchrun process; ``dump``: save this rank's trained
    weights (FSDP: the gathered full weights, on rank 0); ``stop_after``: crash at that
    micro-batch, as a killed job would; ``nan_at`` [rank, n]: that rank's n-th loss is NaN.

    Without ``own_group`` the (single) job joins and leaves the process group itself, as the
    CLI does; with it the jobs share one group made here, since the default group cannot be
    re-created reliably in one process (one command per process is the CLI's use anyway)."""
    # A hang prints every thread's stack and ends the worker, not only the launcher.
    faulthandler.dump_traceback_later(LAUNCH_TIMEOUT - 20, exit=True)
    if own_group:
        dist.init_process_group("gloo")
    rank = int(os.environ["RANK"])
    real_run, real_loss = loop.Trainer.run, loop.compute_loss
    for job in json.loads(Path(jobs_file).read_text()):
        calls = [0]
        stop, dump, nan = job.get("stop_after"), job.get("dump"), job.get("nan_at")

        def loss(*args, calls=calls, stop=stop, nan=nan, **kwargs):
            calls[0] += 1
            if stop is not None and calls[0] > stop:
                raise _Stop(f"stopped at micro-batch {calls[0]}")
            out = real_loss(*args, **kwargs)
            if nan == [rank, calls[0]]:  # this rank alone gets a non-finite loss
                out = dataclasses.replace(out, total=out.total * float("nan"))
            return out

        def run(self, dump=dump):
            result = real_run(self)
            model = self.wrapped.full_model() if self.wrapped.fsdp else self.model
            if dump and model is not None:
                state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                save_file(state, str(Path(dump) / f"rank{rank}.safetensors"))
            return result

        loop.compute_loss, loop.Trainer.run = loss, run
        code = main(job["argv"])
        if code != job.get("code", 0):
            print(f"job {job['argv'][:1]} exited {code}", file=sys.stderr)
            return 1
    if own_group:
        dist.destroy_process_group()
    return 0


def _torchrun(root: Path, name: str, jobs: list[dict], own_group: bool) -> None:
    """Launch the worker on ``jobs`` with 2 processes; on a hang, kill all of them."""
    jobs_file = root / f"{name}.json"
    jobs_file.write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPEECHLLAMA_DIST_TIMEOUT": "120"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc_per_node", str(WORLD), __file__, str(jobs_file)]  # fmt: skip
    if own_group:
        cmd.append("--own-group")
    proc = subprocess.Popen(
        cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    assert proc.returncode == 0, (out[-4000:], err[-4000:])


def _make_data(root: Path) -> tuple[Path, Path]:
    """The training corpus of test_train (eight tone clips) and a dropout-free tiny model."""
    from test_train import make_corpus

    manifest, tok_path = make_corpus(root)
    tok = Tokenizer.load(tok_path)
    cfg = preset("tiny", tok.vocab_size)
    cfg = cfg.replace(encoder=dataclasses.replace(cfg.encoder, dropout=0.0))
    torch.manual_seed(0)
    init = save_checkpoint(SpeechLLaMA(cfg), tok, root / "init")
    return manifest, init


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every distributed job (in two torchrun launches), and the one-process references."""
    root = tmp_path_factory.mktemp("dist")
    manifest, init = _make_data(root)
    data = ["--train", str(manifest), "--init", str(init)]
    for name in ("ddp", "fsdp", "nan"):
        (root / f"dump-{name}").mkdir()
    wavs = sorted(str(p) for p in root.glob("u*.wav"))
    model = str(root / "single" / "step-00000003")  # made by the one-process run below
    jobs = [
        {"argv": ["train", *data, *TRAIN, "--dev", str(manifest), "--out", str(root / "ddp")],
         "dump": str(root / "dump-ddp")},
        {"argv": ["train", *data, *TRAIN, "--fsdp", "--out", str(root / "fsdp")],
         "dump": str(root / "dump-fsdp")},
        {"argv": ["train", *data, *TRAIN, "--out", str(root / "nan")], "nan_at": [1, 2],
         "dump": str(root / "dump-nan")},
        {"argv": ["train", *data, *TRAIN, "--out", str(root / "cut")], "stop_after": 2,
         "code": 1},  # crashes in step 3 (one micro-batch per rank and step), after step-2
        {"argv": ["train", *data, *TRAIN, "--out", str(root / "cut"), "--resume"]},
        {"argv": ["evaluate", str(manifest), "--model", model, "--out", str(root / "ev-2"),
                  "--threads", "1"]},
        {"argv": ["transcribe", *wavs, "--model", model, "-o", str(root / "tr-2.jsonl"),
                  "--threads", "1"]},
    ]  # fmt: skip
    # One process, grad_accum 2: the same global batch as 2 ranks x 1 micro-batch.
    assert main(["train", *data, *TRAIN, "--grad-accum", "2", "--out", str(root / "single")]) == 0
    assert main(["evaluate", str(manifest), "--model", model, "--out", str(root / "ev-1")]) == 0
    assert main(["transcribe", *wavs, "--model", model, "-o", str(root / "tr-1.jsonl")]) == 0
    _torchrun(root, "cli", jobs[:1], own_group=False)  # the group as the CLI makes it
    _torchrun(root, "jobs", jobs[1:], own_group=True)
    return root


def _events(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def test_two_ranks_train_like_one_process_with_the_same_global_batch(runs: Path) -> None:
    one, two = _events(runs / "single", "train"), _events(runs / "ddp", "train")
    assert [e["step"] for e in two] == [1, 2, 3]
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)  # both ranks' micro-batches
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["audio_hours"] == pytest.approx(a["audio_hours"], rel=1e-9)
    single = load_file(runs / "single" / "step-00000003" / "model.safetensors")
    ddp = load_file(runs / "ddp" / "step-00000003" / "model.safetensors")
    _close(ddp, single, atol=1e-5)
    # Rank 0 alone evaluated and wrote: one start event, one eval, checkpoints in one place.
    assert len(_events(runs / "ddp", "start")) == 1 and len(_events(runs / "ddp", "eval")) == 1
    assert _events(runs / "ddp", "start")[0]["world_size"] == WORLD
    assert (runs / "ddp" / "best" / "config.json").is_file()


def test_both_ranks_hold_identical_weights(runs: Path) -> None:
    ranks = [load_file(runs / "dump-ddp" / f"rank{r}.safetensors") for r in range(WORLD)]
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), name
    saved = load_file(runs / "ddp" / "step-00000003" / "model.safetensors")
    _close(saved, {k: ranks[0][k] for k in saved}, atol=0.0)


def test_a_non_finite_loss_on_one_rank_is_skipped_by_all(runs: Path) -> None:
    # Rank 1's second loss is NaN: both ranks skip that micro-batch (no rank waits for the
    # other's gradients), the step still averages gradients (zeros), the ranks stay identical.
    skipped = _events(runs / "nan", "skipped_batch")
    assert [e["step"] for e in skipped] == [1]  # logged once, by rank 0, in step 2
    assert [e["step"] for e in _events(runs / "nan", "train")] == [1, 2, 3]
    ranks = [load_file(runs / "dump-nan" / f"rank{r}.safetensors") for r in range(WORLD)]
    _close(ranks[1], ranks[0], atol=0.0)
    assert all(torch.isfinite(v).all() for v in ranks[0].values())


def test_fsdp_trains_like_ddp(runs: Path) -> None:
    ddp = _events(runs / "ddp", "train")
    fsdp = _events(runs / "fsdp", "train")
    assert [e["loss"] for e in fsdp] == pytest.approx([e["loss"] for e in ddp], rel=1e-5)
    sharded = load_file(runs / "fsdp" / "step-00000003" / "model.safetensors")
    _close(sharded, load_file(runs / "ddp" / "step-00000003" / "model.safetensors"), atol=1e-5)
    assert not (runs / "dump-fsdp" / "rank1.safetensors").exists()  # only rank 0 gathers


def test_resumed_two_rank_run_replays_to_the_same_weights(runs: Path) -> None:
    straight = load_file(runs / "ddp" / "step-00000003" / "model.safetensors")
    resumed = load_file(runs / "cut" / "step-00000003" / "model.safetensors")
    _close(resumed, straight, atol=0.0)  # same batches per rank, same RNG: bit for bit
    starts = _events(runs / "cut", "start")
    assert starts[-1]["resumed_from"].endswith("step-00000002")


def _rows(path: Path, drop: tuple[str, ...]) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return sorted(
        ({k: v for k, v in r.items() if k not in drop} for r in rows),
        key=lambda r: r["audio_filepath"],
    )


def test_sharded_evaluation_equals_one_process(runs: Path) -> None:
    timing = ("encoder_seconds", "decoder_seconds")
    one = _rows(runs / "ev-1" / "hypotheses.jsonl", timing)
    assert _rows(runs / "ev-2" / "hypotheses.jsonl", timing) == one and len(one) == 8
    a, b = (json.loads((runs / d / "summary.json").read_text()) for d in ("ev-1", "ev-2"))
    for key in ("wer", "substitutions", "deletions", "insertions", "words", "utterances",
                "decoder_calls", "tokens", "accepted_per_call", "head_accuracy_tokens",
                "failed", "options"):  # fmt: skip
        assert b[key] == a[key], key
    assert b["head_accuracy"] == pytest.approx(a["head_accuracy"], abs=1e-12)
    assert b["head_ce"] == pytest.approx(a["head_ce"], rel=1e-6)
    align = (runs / "ev-1" / "alignments.txt").read_text()
    assert (runs / "ev-2" / "alignments.txt").read_text() == align
    shards = sorted(p.name for p in (runs / "ev-2" / "shards").iterdir())
    assert shards == ["rank-0-of-2", "rank-1-of-2"]  # rank 0 took utterances 0, 2, 4, 6
    part = _rows(runs / "ev-2" / "shards" / "rank-0-of-2" / "hypotheses.jsonl", timing)
    assert [r["audio_filepath"] for r in part] == [one[i]["audio_filepath"] for i in (0, 2, 4, 6)]


def test_sharded_transcription_equals_one_process(runs: Path) -> None:
    timing = ("seconds",)
    assert _rows(runs / "tr-2.jsonl", timing) == _rows(runs / "tr-1.jsonl", timing)
    assert not list(runs.glob("tr-2.jsonl.rank-*"))  # the parts were merged and removed


def test_ranks_share_the_single_process_batches() -> None:
    durations = torch.linspace(0.5, 9.0, 41).tolist()
    kw = {"num_buckets": 4, "seed": 3}
    one = DurationBucketSampler(durations, 12.0, **kw)
    ranks = [DurationBucketSampler(durations, 12.0, rank=r, world_size=3, **kw) for r in range(3)]
    for epoch in (0, 1):
        batches = one.epoch_batches(epoch)
        usable = len(batches) - len(batches) % 3
        shares = [s.epoch_batches(epoch) for s in ranks]
        assert [len(s) for s in shares] == [usable // 3] * 3  # every rank runs as many steps
        # Step j of the 3 ranks = batches 3j..3j+2 of one process (one global batch).
        assert [b for step in zip(*shares, strict=True) for b in step] == batches[:usable]
    assert ranks[0].epoch_batches(0) != ranks[0].epoch_batches(1)
    with pytest.raises(ValueError, match="rank"):
        DurationBucketSampler(durations, 12.0, rank=2, world_size=2)


def test_transcription_parts_merge_once_into_the_output(tmp_path: Path) -> None:
    from speechllama.distributed_eval import _append_parts, part_path

    out = tmp_path / "t.jsonl"
    out.write_text('{"audio_filepath": "a.wav", "text": "x"}\n')
    parts = [part_path(out, r, 2) for r in range(2)]
    parts[0].write_text('{"audio_filepath": "b.wav", "text": "y"}\n{"audio_filepath": "d.w')
    parts[1].write_text('{"audio_filepath": "a.wav", "text": "x"}\n{"audio_filepath": "c.wav"}\n')
    _append_parts(out, parts)  # b and c added; a already there; d's row was torn (unfinished)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["audio_filepath"] for r in rows] == ["a.wav", "b.wav", "c.wav"]
    assert not any(p.exists() for p in parts)


def test_resume_restores_this_ranks_rng_and_refuses_another_world_size() -> None:
    from speechllama.train.distributed import DistContext, restore_rng

    saved = torch.get_rng_state()
    expected = torch.rand(3)
    where = Path("run/step-00000002")
    restore_rng({"torch_rng": saved}, DistContext(), where)  # a checkpoint from before ranks
    assert torch.equal(torch.rand(3), expected)
    state = {"torch_rng": saved, "rank_rng": [saved, saved], "world_size": 2}
    with pytest.raises(ValueError, match="saved by 2 process"):
        restore_rng(state, DistContext(), where)
    restore_rng(state, DistContext(rank=1, world_size=2), where)
    assert torch.equal(torch.rand(3), expected)


def test_merged_head_accuracy_counts_like_one_process() -> None:
    from speechllama.distributed_eval import merge_head_accuracy

    parts = [
        {"head_accuracy": [2 / 3, 0.5], "head_accuracy_tokens": [3, 2], "head_ce": [1.0, 2.0],
         "head_accuracy_skipped": [{"audio_filepath": "a.wav", "reason": "x"}]},
        {"head_accuracy": [0.25, 0.0], "head_accuracy_tokens": [4, 0], "head_ce": [3.0, 0.0],
         "head_accuracy_skipped": []},
    ]  # fmt: skip
    merged = merge_head_accuracy(parts)
    assert merged["head_accuracy"] == [3 / 7, 0.5]
    assert merged["head_accuracy_tokens"] == [7, 2]
    assert merged["head_ce"] == pytest.approx([(3 * 1.0 + 4 * 3.0) / 7, 2.0])
    assert [s["audio_filepath"] for s in merged["head_accuracy_skipped"]] == ["a.wav"]


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1], own_group="--own-group" in sys.argv))
