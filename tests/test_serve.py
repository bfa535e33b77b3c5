"""The HTTP service against a live uvicorn server on a free loopback port: API text equals
``transcribe``'s, bad uploads get named 4xx JSON errors while a concurrent good request
succeeds, concurrent requests share batched decoder calls; the batcher's overload, failure
isolation and drain-on-close with a stand-in transcriber."""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from test_transcribe import make_checkpoint, write_wav

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from speechllama import DecodingOptions, DecodingResult, load_model  # noqa: E402
from speechllama.cli import build_parser  # noqa: E402
from speechllama.serve import ServeConfig, create_app  # noqa: E402
from speechllama.serve.batcher import Batcher, Overloaded, ShuttingDown  # noqa: E402

torch.set_num_threads(1)

# A random model writes garbage until its length limit: keep that limit small.
OPTIONS = DecodingOptions(max_tokens_per_second=3.0, max_tokens_min=3)
URL = "/v1/audio/transcriptions"


def start_server(app) -> tuple[str, uvicorn.Server, threading.Thread]:
    """Run ``app`` on uvicorn in a thread, on a loopback port the OS picked."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}", server, thread


@contextmanager
def live_server(app) -> Iterator[str]:
    """``start_server`` for the length of a ``with`` block; yields the URL."""
    url, server, thread = start_server(app)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@pytest.fixture(scope="module")
def transcriber(tmp_path_factory):
    return load_model(make_checkpoint(tmp_path_factory.mktemp("model")))


@pytest.fixture(scope="module")
def wavs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("wavs")
    return [write_wav(root / f"u{i}.wav", 0.4 + 0.05 * i, seed=i) for i in range(16)]


@pytest.fixture(scope="module")
def server(transcriber) -> Iterator[str]:
    config = ServeConfig(max_batch=16, max_wait_ms=100, max_upload_mb=0.1, max_audio_s=2.0)
    with live_server(create_app(transcriber, OPTIONS, config)) as url:
        yield url


def _post(
    client, path: Path | None = None, data: bytes | None = None, name: str = "a.wav", **fields: str
):
    body = path.read_bytes() if path is not None else data
    files = {"file": (name, body, "audio/wav")}
    return client.post(URL, files=files, data={"model": "speechllama", **fields})


def _error(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["type"] == ("invalid_request_error" if status < 500 else "overloaded_error")
    return error["message"]


def test_api_text_equals_transcribe(server, transcriber, wavs):
    expected = transcriber.transcribe(wavs[3], OPTIONS)
    assert expected.tokens  # the random model says something: a non-trivial comparison
    with httpx.Client(base_url=server, timeout=60) as client:
        as_json = _post(client, wavs[3])
        as_text = _post(client, wavs[3], response_format="text")
        verbose = _post(client, wavs[3], response_format="verbose_json", language="en")
    assert as_json.status_code == 200, as_json.text
    assert as_json.json() == {"text": expected.text}
    assert as_text.text == expected.text
    v = verbose.json()
    assert v["text"] == expected.text
    assert v["decoder_calls"] == expected.decoder_calls
    assert v["tokens"] == len(expected.tokens)
    assert v["accepted_per_call"] == list(expected.accepted_per_call)
    assert v["duration"] == pytest.approx(expected.audio_seconds, abs=1e-3)
    assert v["batch"]["size"] == 1 and v["batch"]["decoder_calls"] == expected.decoder_calls
    assert set(v["timings"]) >= {"queue_seconds", "encoder_seconds", "decoder_seconds"}


def test_bad_uploads_fail_alone(server, wavs, tmp_path):
    """A corrupt file, an empty upload, a too-large upload, unsupported audio and too-long
    audio, sent together with a good request: each gets its 4xx naming the problem."""
    good = wavs[5]
    too_long = tmp_path / "long.wav"  # 16-bit, 80 KB: under the upload limit
    sf.write(too_long, np.zeros(40000, np.float32), 16000, subtype="PCM_16")
    stereo_noise = np.random.default_rng(0).standard_normal((2 * 16000, 2)).astype(np.float32)
    big = io.BytesIO()
    sf.write(big, stereo_noise, 16000, format="WAV", subtype="FLOAT")  # 256 KB > 0.1 MB

    async def run() -> list:
        async with httpx.AsyncClient(base_url=server, timeout=60) as client:
            return await asyncio.gather(
                client.post(URL, files={"file": ("good.wav", good.read_bytes())}),
                client.post(URL, files={"file": ("bad.wav", b"RIFF\x10\x00\x00\x00WAVEjunk" * 8)}),
                client.post(URL, files={"file": ("empty.wav", b"")}),
                client.post(URL, files={"file": ("big.wav", big.getvalue())}),
                client.post(URL, files={"file": ("notes.txt", b"hello, not audio at all" * 9)}),
                client.post(URL, files={"file": ("long.wav", too_long.read_bytes())}),
            )

    ok, corrupt, empty, large, text, long = asyncio.run(run())
    assert ok.status_code == 200 and isinstance(ok.json()["text"], str)
    assert "bad.wav" in _error(corrupt, 400, "invalid_audio")
    assert "empty" in _error(empty, 400, "empty_file")
    assert "too large" in _error(large, 413, "upload_too_large")
    assert "notes.txt" in _error(text, 415, "unsupported_format")
    assert "2 s limit" in _error(long, 413, "audio_too_long")


def test_fields_are_checked(server, wavs):
    with httpx.Client(base_url=server, timeout=60) as client:
        assert "de" in _error(_post(client, wavs[0], language="de"), 400, "unsupported_language")
        assert _post(client, wavs[0], language="en-US").status_code == 200
        assert "srt" in _error(
            _post(client, wavs[0], response_format="srt"), 400, "unsupported_response_format"
        )
        _error(_post(client, wavs[0], model="gpt-4o-transcribe"), 404, "model_not_found")
        assert _post(client, wavs[0], model="whisper-1").status_code == 200  # clients' default
        _error(client.post(URL, data={"model": "speechllama"}), 400, "invalid_content_type")
        _error(client.post(URL, files={"other": ("a", b"x")}), 400, "missing_file")
        missing = client.get("/v1/nothing")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "http_error"
        models = client.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["speechllama"]
        page = client.get("/")
        assert page.status_code == 200 and 'id="transcript"' in page.text


def test_concurrent_requests_share_decoder_calls(server, transcriber, wavs):
    """16 concurrent requests: all succeed, with the same texts as 16 sequential ones, in
    fewer batched decoder calls."""

    def calls(client) -> int:
        return client.get("/health").json()["stats"]["decoder_calls"]

    with httpx.Client(base_url=server, timeout=60) as client:
        before = calls(client)
        sequential = [_post(client, w).json()["text"] for w in wavs]
        sequential_calls = calls(client) - before

    async def together() -> list:
        async with httpx.AsyncClient(base_url=server, timeout=60) as client:
            fields = {"response_format": "verbose_json"}
            return await asyncio.gather(
                *(
                    client.post(URL, files={"file": (w.name, w.read_bytes())}, data=fields)
                    for w in wavs
                )
            )

    with httpx.Client(base_url=server, timeout=60) as client:
        before = calls(client)
        responses = asyncio.run(together())
        batched_calls = calls(client) - before
        health = client.get("/health").json()
    assert all(r.status_code == 200 for r in responses)
    assert [r.json()["text"] for r in responses] == sequential
    assert max(r.json()["batch"]["size"] for r in responses) > 1
    assert 0 < batched_calls < sequential_calls
    assert health["stats"]["largest_batch"] > 1


# -- the batcher alone, with a stand-in transcriber ---------------------------------------


class _Slow:
    """An engine that transcribes a wave to its length after ``gate`` opens, and fails a
    batch holding a NaN after answering its first request."""

    def __init__(self) -> None:
        self.decoder_calls = 0
        self.gate = threading.Event()
        self.gate_reached = threading.Event()
        self.batches: list[int] = []

    def run(self, waves, on_result) -> None:
        self.gate_reached.set()
        self.gate.wait(10)
        self.batches.append(len(waves))
        self.decoder_calls += 1
        for i, w in enumerate(waves):
            if i > 0 and any(np.isnan(w).any() for w in waves):
                raise RuntimeError("poisoned batch")
            on_result(i, DecodingResult(text=str(len(w)), tokens=(1,), decoder_calls=1))


def test_batcher_overload_isolation_and_drain():
    fake = _Slow()

    async def run():
        batcher = Batcher(fake, max_batch=4, max_wait=0.05, max_queue=3)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(np.zeros(1, np.float32)))
        for _ in range(1000):  # until the worker has taken it (it then waits at the gate)
            await asyncio.sleep(0.01)
            if batcher.waiting == 0 and fake.gate_reached.is_set():
                break
        queued = [
            asyncio.ensure_future(batcher.submit(np.zeros(n, np.float32))) for n in (2, 3)
        ] + [asyncio.ensure_future(batcher.submit(np.full(4, np.nan, np.float32)))]
        await asyncio.sleep(0.05)
        assert batcher.waiting == 3
        with pytest.raises(Overloaded) as over:
            await batcher.submit(np.zeros(5, np.float32))
        assert over.value.retry_after >= 1
        closing = asyncio.ensure_future(batcher.close())  # must still finish the queue
        await asyncio.sleep(0.05)
        with pytest.raises(ShuttingDown):
            await batcher.submit(np.zeros(6, np.float32))
        fake.gate.set()
        await closing
        done = await asyncio.gather(first, *queued)
        return [r.text for r, _ in done], batcher.stats()

    texts, stats = asyncio.run(run())
    assert texts == ["1", "2", "3", "4"]  # the poisoned batch's unanswered two were retried
    assert fake.batches == [1, 3, 1, 1]
    assert stats["rejected"] == 1 and stats["requests"] == 4


def test_cli_registers_serve():
    args = build_parser().parse_args(["serve", "--max-batch", "4", "--max-wait-ms", "5"])
    assert (args.max_batch, args.max_wait_ms, args.host, args.port) == (4, 5.0, "127.0.0.1", 8000)


def test_loadtest_cell(server, wavs):
    """The load generator's table cell: every request answered, counters read from /health."""
    from speechllama.serve.loadtest import HEADER, measure

    result = measure(server, wavs[:4], clients=4, requests=8, strategy="greedy", batching="on")
    assert (result.requests, result.failed) == (8, 0)
    assert result.rps > 0 and 0 < result.p50_ms <= result.p90_ms <= result.p99_ms
    assert 1.0 <= result.mean_batch <= 4.0 and result.calls_per_request > 0
    assert result.row().count("|") == HEADER.count("|")


def test_loadtest_command_against_running_server(server, wavs, capsys):
    from speechllama.serve.loadtest import HEADER, main

    argv = ["--url", server, "--clients", "1,2", "--requests", "2", "--rounds", "2",
            "--warmup", "0", "--audio", *map(str, wavs[:2])]  # fmt: skip
    assert main(argv) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == HEADER and len(table) == 4
    assert [row.split(" | ")[:4] for row in table[2:]] == [
        ["| greedy", "on", "1", "2"],
        ["| greedy", "on", "2", "2"],
    ]


def test_engine_answers_each_request_when_its_sequence_ends(transcriber, tmp_path):
    """A short request leaves its batch before a long one ends, with exactly the result that
    ``transcribe`` gives it alone; silent audio takes the library's path (no decoder call)."""
    from speechllama.audio import load_audio
    from speechllama.serve.engine import Engine

    short = load_audio(write_wav(tmp_path / "short.wav", 0.3, seed=1))
    long = load_audio(write_wav(tmp_path / "long.wav", 3.0, seed=2))
    silent = np.zeros(8000, np.float32)
    engine = Engine(transcriber, OPTIONS)
    order: list[tuple[int, int]] = []
    results: dict[int, DecodingResult] = {}

    def on_result(index: int, result: DecodingResult) -> None:
        order.append((index, engine.decoder_calls))
        results[index] = result

    calls0 = engine.decoder_calls
    engine.run([long, short, silent], on_result)
    assert [i for i, _ in order] == [2, 1, 0]
    assert order[1][1] < order[2][1]  # the short one was answered while the long one decoded
    for i, wave in enumerate([long, short, silent]):
        alone = transcriber.transcribe(wave, OPTIONS)
        got = results[i]
        assert (got.text, got.tokens, got.decoder_calls, got.accepted_per_call) == (
            alone.text, alone.tokens, alone.decoder_calls, alone.accepted_per_call,
        )  # fmt: skip
    assert results[2].decoder_calls == 0
    assert order[2][1] - calls0 == max(results[0].decoder_calls, results[1].decoder_calls)


def test_shutdown_finishes_requests_in_flight(transcriber, wavs):
    """A request still waiting in the batcher when the server is told to stop gets its answer."""
    config = ServeConfig(max_batch=4, max_wait_ms=1500)  # the request waits 1.5 s for company
    url, server, thread = start_server(create_app(transcriber, OPTIONS, config))
    expected = transcriber.transcribe(wavs[0], OPTIONS).text
    with httpx.Client(base_url=url, timeout=60) as client:
        box: dict = {}
        sender = threading.Thread(target=lambda: box.update(r=_post(client, wavs[0])))
        sender.start()
        deadline = time.monotonic() + 10
        while client.get("/health").json()["stats"]["queued"] == 0:
            assert time.monotonic() < deadline, "the request never reached the queue"
            time.sleep(0.01)
        server.should_exit = True  # what SIGTERM / SIGINT do
        sender.join(timeout=30)
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert box["r"].status_code == 200 and box["r"].json() == {"text": expected}


@pytest.mark.parametrize("strategy", ["verify", "threshold", "tree", "beam", "prefix-beam"])
def test_engine_matches_transcribe_for_every_strategy(transcriber, wavs, strategy):
    """Batched in the server or alone in ``transcribe``: the same tokens and calls (the beam
    searches, which choose their tokens at the end, answer at the end of the batch)."""
    from speechllama.audio import load_audio
    from speechllama.serve.engine import Engine

    options = DecodingOptions(strategy=strategy, max_tokens_per_second=3.0, max_tokens_min=3)
    waves = [load_audio(w) for w in wavs[:3]]
    got: dict[int, DecodingResult] = {}
    Engine(transcriber, options).run(waves, got.__setitem__)
    for i, wave in enumerate(waves):
        alone = transcriber.transcribe(wave, options)
        assert (got[i].tokens, got[i].decoder_calls) == (alone.tokens, alone.decoder_calls)
