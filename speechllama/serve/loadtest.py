"""A bounded load generator for ``speechllama serve`` on loopback: requests per second and
latency percentiles at several client counts, batching on and off, for each strategy.

    python -m speechllama.serve.loadtest --model DIR --strategies greedy,verify \\
        --clients 1,4,16 --requests 48

For every (strategy, batching) pair it starts a server process (``speechllama serve`` on a
free loopback port, ``--max-batch 1`` for batching off; all of them at once, idle ones cost
nothing) and sends it untimed warm-up requests. Then, ``--rounds`` times, for every client
count and every server in turn (the order rotates each round, so a burst of load from
elsewhere on a shared machine hits every configuration alike), it sends exactly
``--requests`` requests from that many concurrent clients (each sends its next request when
its last one is answered: a closed loop, bounded by the clients, never an open-ended rate).
A cell reports the medians over its rounds. Audio is the bundled example files (``--audio``
to choose), sent in turn. ``--url`` measures one running server instead. Mean batch size and
batched decoder calls per request come from the server's ``/health`` counters.

Prints one markdown table (progress on stderr); ``--json`` also writes the rows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

__all__ = ["LoadResult", "main", "run_load"]

EXAMPLES = Path(__file__).resolve().parents[1] / "assets" / "audio"
HEADER = (
    "| strategy | batching | clients | requests | req/s (rounds' range) | p50 ms | p90 ms | p99 ms "
    "| mean batch | batched calls/request | failed |"
)


@dataclass(frozen=True)
class LoadResult:
    """One cell of the table: ``requests`` sent by ``clients`` concurrent clients (medians
    over ``rounds`` runs of that many requests once combined)."""

    strategy: str
    batching: str
    clients: int
    requests: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_batch: float
    calls_per_request: float
    failed: int
    rounds: int = 1
    rps_low: float = 0.0  # the slowest and fastest round's req/s (rounds > 1)
    rps_high: float = 0.0

    def row(self) -> str:
        rps = f"{self.rps:.2f}"
        if self.rounds > 1:
            rps += f" ({self.rps_low:.1f}-{self.rps_high:.1f})"
        return (
            f"| {self.strategy} | {self.batching} | {self.clients} | {self.requests} "
            f"| {rps} | {self.p50_ms:.0f} | {self.p90_ms:.0f} | {self.p99_ms:.0f} "
            f"| {self.mean_batch:.2f} | {self.calls_per_request:.1f} | {self.failed} |"
        )


async def run_load(
    url: str, files: Sequence[Path], clients: int, requests: int, timeout: float = 120.0
) -> tuple[float, list[float], int]:
    """Send ``requests`` transcription requests from ``clients`` closed-loop clients.
    Returns (wall seconds, latencies of the successful ones in seconds, failures)."""
    import httpx

    bodies = [(f.name, f.read_bytes()) for f in files]
    latencies: list[float] = []
    failed = 0
    sent = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal sent, failed
        while sent < requests:
            name, data = bodies[sent % len(bodies)]
            sent += 1
            t0 = time.perf_counter()
            try:
                r = await http.post(
                    "/v1/audio/transcriptions",
                    files={"file": (name, data)},
                    data={"response_format": "json"},
                )
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - t0)
            else:
                failed += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return time.perf_counter() - t0, latencies, failed


def _health(url: str) -> dict:
    import httpx

    return httpx.get(url + "/health", timeout=30).json()


def measure(
    url: str, files: Sequence[Path], clients: int, requests: int, strategy: str, batching: str
) -> LoadResult:
    """One table cell against the server at ``url`` (its /health counters give the batches)."""
    before = _health(url)["stats"]
    seconds, latencies, failed = asyncio.run(run_load(url, files, clients, requests))
    after = _health(url)["stats"]
    served = after["requests"] - before["requests"]
    batches = after["batches"] - before["batches"]
    calls = after["decoder_calls"] - before["decoder_calls"]
    ms = np.asarray(latencies or [0.0]) * 1000
    p50, p90, p99 = (float(np.percentile(ms, q)) for q in (50, 90, 99))
    return LoadResult(
        strategy=strategy,
        batching=batching,
        clients=clients,
        requests=requests,
        rps=requests / seconds if seconds else 0.0,
        p50_ms=p50,
        p90_ms=p90,
        p99_ms=p99,
        mean_batch=served / batches if batches else 0.0,
        calls_per_request=calls / served if served else 0.0,
        failed=failed,
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(serve_args: Sequence[str], startup: float = 300.0) -> Iterator[str]:
    """``speechllama serve`` in a child process on a free loopback port; yields its URL and
    stops it (SIGTERM: a graceful shutdown) afterwards."""
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "speechllama", "serve", "--port", str(port),
           "--log-level", "warning", *serve_args]  # fmt: skip
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with code {proc.returncode}: {' '.join(cmd)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not answer /health within {startup:g} s")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _int_list(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,4,16, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m speechllama.serve.loadtest",
        description="Bounded loopback load test of `speechllama serve`: req/s and latency "
        "percentiles by client count, batching on/off, per strategy.",
    )
    p.add_argument("--model", help="checkpoint directory or bundled model name")
    p.add_argument("--url", help="measure this running server instead of starting servers")
    p.add_argument(
        "--strategies",
        default="greedy,verify",
        help="comma-separated decoding strategies (default: greedy,verify)",
    )
    p.add_argument("--batching", default="on,off", help="on, off or on,off (default: on,off)")
    p.add_argument("--clients", type=_int_list, default=[1, 4, 16], help="default: 1,4,16")
    p.add_argument("--requests", type=int, default=48, help="requests per run (default: 48)")
    p.add_argument("--rounds", type=int, default=3, help="runs per cell, medians (default: 3)")
    p.add_argument(
        "--warmup", type=int, default=4, help="untimed requests per client per server (default: 4)"
    )
    p.add_argument("--max-batch", type=int, default=16, help="server --max-batch when on")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="server --max-wait-ms")
    p.add_argument("--threads", type=int, default=1, help="server torch threads (default: 1)")
    p.add_argument("--audio", nargs="+", type=Path, help="audio files (default: the examples)")
    p.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    return p  # fmt: skip


def _cells(args: argparse.Namespace) -> Iterator[tuple[str, str, list[str]]]:
    """(strategy, batching, server arguments) for every server to start."""
    for strategy in [s for s in args.strategies.split(",") if s]:
        for batching in [b for b in args.batching.split(",") if b]:
            if batching not in ("on", "off"):
                raise SystemExit(f"--batching takes on and/or off, got {batching!r}")
            batch = args.max_batch if batching == "on" else 1
            serve = ["--decoding", strategy, "--max-batch", str(batch),
                     "--max-wait-ms", str(args.max_wait_ms), "--threads", str(args.threads),
                     "--max-queue", str(max(64, 2 * max(args.clients)))]  # fmt: skip
            if args.model:
                serve += ["--model", args.model]
            yield strategy, batching, serve


def combine(runs: Sequence[LoadResult]) -> LoadResult:
    """One cell from several rounds: medians of the rate, percentiles and batch counters,
    and the slowest and fastest round's rate."""

    def med(name: str) -> float:
        return float(np.median([getattr(r, name) for r in runs]))

    return replace(
        runs[0],
        rps=med("rps"),
        p50_ms=med("p50_ms"),
        p90_ms=med("p90_ms"),
        p99_ms=med("p99_ms"),
        mean_batch=med("mean_batch"),
        calls_per_request=med("calls_per_request"),
        failed=sum(r.failed for r in runs),
        rounds=len(runs),
        rps_low=min(r.rps for r in runs),
        rps_high=max(r.rps for r in runs),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    files = args.audio or sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".wav", ".flac"))
    if not files:
        raise SystemExit("no audio files to send")
    with contextlib.ExitStack() as stack:
        if args.url:
            url = args.url.rstrip("/")
            health = _health(url)
            batching = "on" if health["config"]["max_batch"] > 1 else "off"
            servers = [(health["strategy"], batching, url)]
        else:
            servers = [(strategy, batching, stack.enter_context(server_process(serve)))
                       for strategy, batching, serve in _cells(args)]  # fmt: skip
        for _, _, url in servers:
            if args.warmup:
                for clients in sorted({1, max(args.clients)}):
                    asyncio.run(run_load(url, files, clients, args.warmup * clients))
        runs: dict[tuple[int, int], list[LoadResult]] = {}
        for round_ in range(args.rounds):
            for clients in args.clients:
                for k in range(len(servers)):
                    s = (k + round_) % len(servers)
                    strategy, batching, url = servers[s]
                    result = measure(url, files, clients, args.requests, strategy, batching)
                    runs.setdefault((s, clients), []).append(result)
                    print(f"round {round_ + 1}: {result.row()}", file=sys.stderr, flush=True)
    results = [combine(runs[(s, c)]) for s in range(len(servers)) for c in args.clients]
    print(HEADER)
    print("|" + "---|" * HEADER.count(" | ") + "---|")
    for result in results:
        print(result.row())
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
