"""Load a real `tunesmith serve` over loopback with many clients that retry 503s, and check nothing is lost.

    python bench/serve_load.py [RUN] [--requests 400] [--clients 32] [--seconds 120]
                               [--queue-size 8] [--max-batch 4] [--max-tokens 16]

Without RUN it trains a tiny LoRA run first (the tests' 2-layer random Llama, a few seconds on CPU).
Starts the server as its own process, then CLIENTS concurrent clients send REQUESTS chat requests
between them (every fourth streamed), each retrying a 503 after the Retry-After it was given, as
OpenAI's clients do. Stops starting requests after SECONDS; those started may take as long again.
Prints requests, answered, 503s and retries, p50/p95 latency (first try to answer, waits included), time to
first token of the streamed requests (first try to the first content chunk),
peak queue depth (the server's own high-water mark), the server's peak RSS and the CPU flags; exits 1
when a request was lost, a status other than 200/503 came back, or the request log disagrees.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))


def tiny_run(work: Path) -> Path:
    """A finished 4-step LoRA run over the tests' tiny random Llama."""
    from tests.conftest import build_model, build_tokenizer, train_lora_run

    model_dir = work / "tiny-llama"
    tokenizer = build_tokenizer()
    build_model(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return train_lora_run(work, model_dir, "colours")


class Tally:
    def __init__(self) -> None:
        self.started = self.answered = self.busy = self.retries = 0
        self.latencies: list[float] = []
        self.first_tokens: list[float] = []  # streamed requests: first try to the first content chunk
        self.other: collections.Counter[str] = collections.Counter()


def first_content(text: str) -> bool:
    """Whether a streamed reply so far holds a chunk with answer text (the first chunk may carry only the role)."""
    for line in text.splitlines():
        if line.startswith("data: {") and line.endswith("}"):
            delta = json.loads(line[6:])["choices"][0].get("delta", {})
            if delta.get("content"):
                return True
    return False


async def client(
    http, url: str, model: str, queue: asyncio.Queue, tally: Tally, max_tokens: int, stop_at: float
) -> None:
    while time.perf_counter() < stop_at:
        try:
            index = queue.get_nowait()
        except asyncio.QueueEmpty:
            return
        tally.started += 1
        body = {
            "model": model,
            "messages": [{"role": "user", "content": f"colour red item {index}"}],
            "max_tokens": max_tokens,
            "stream": index % 4 == 0,
        }
        began, tries = time.perf_counter(), 0
        while True:
            tries += 1
            try:
                async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as reply:
                    text, first = "", None
                    async for chunk in reply.aiter_text():
                        text += chunk
                        if first is None and body["stream"] and reply.status_code == 200 and first_content(text):
                            first = time.perf_counter() - began
            except Exception as error:  # a transport failure is a lost request, not something to retry
                tally.other[type(error).__name__] += 1
                break
            if reply.status_code == 503:
                tally.busy += 1
                await asyncio.sleep(float(reply.headers.get("retry-after", "1")))
                continue
            if reply.status_code == 200 and (not body["stream"] or text.rstrip().endswith("data: [DONE]")):
                tally.answered += 1
                tally.latencies.append(time.perf_counter() - began)
                if first is not None:
                    tally.first_tokens.append(first)
            else:
                tally.other[f"{reply.status_code} {text[:80]!r}"] += 1
            break
        tally.retries += tries - 1


async def load(url: str, model: str, args: argparse.Namespace) -> Tally:
    import httpx

    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(args.requests):
        queue.put_nowait(index)
    tally = Tally()
    stop_at = time.perf_counter() + args.seconds
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(timeout=args.seconds * 2, limits=limits) as http:
        clients = [client(http, url, model, queue, tally, args.max_tokens, stop_at) for _ in range(args.clients)]
        try:
            await asyncio.wait_for(asyncio.gather(*clients), timeout=args.seconds * 2)
        except asyncio.TimeoutError:  # what is still in flight counts as lost
            pass
    return tally


def quantile(values: list[float], share: float) -> float:
    return values[max(0, round(share * len(values)) - 1)] if values else float("nan")


def sample(metrics: str, name: str) -> float:
    """One unlabelled series from a Prometheus text page."""
    return next(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(f"{name} "))


def cpu_flags() -> str:
    flags = re.findall(r"\b(avx2|avx512f|avx512_bf16|amx_bf16)\b", Path("/proc/cpuinfo").read_text())
    return ", ".join(f"{name} x{count}" for name, count in sorted(collections.Counter(flags).items())) or "none"


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", help="A finished run directory [default: train a tiny one].")
    parser.add_argument("--requests", type=int, default=400, help="Requests to send in all [default: 400].")
    parser.add_argument("--clients", type=int, default=32, help="Concurrent clients [default: 32].")
    parser.add_argument("--seconds", type=float, default=120, help="Stop starting requests after this [default: 120].")
    parser.add_argument("--queue-size", type=int, default=8, help="The server's --queue-size [default: 8].")
    parser.add_argument("--max-batch", type=int, default=4, help="The server's --max-batch [default: 4].")
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each request [default: 16].")
    args = parser.parse_args()

    import httpx

    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    run = Path(args.run) if args.run else tiny_run(work)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url, log = f"http://127.0.0.1:{port}", work / "requests.sqlite"
    command = [sys.executable, "-m", "tunesmith", "serve", str(run), "--port", str(port), "--log-db", str(log)]
    command += ["--queue-size", str(args.queue_size), "--max-batch", str(args.max_batch), "--quiet"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited: {server.stderr.read()}")
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise SystemExit("the server did not answer /health within 300 s")
            time.sleep(0.5)
        began = time.perf_counter()
        tally = asyncio.run(load(url, run.name, args))
        wall = time.perf_counter() - began
        metrics = httpx.get(f"{url}/metrics").text
        peak_queue = sample(metrics, "tunesmith_queue_depth_peak")
        health = httpx.get(f"{url}/health").json()
        rss = peak_rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    with sqlite3.connect(log) as db:
        logged = dict(db.execute("SELECT status, COUNT(*) FROM requests GROUP BY status").fetchall())
        in_server = sorted(row[0] / 1000 for row in db.execute("SELECT latency_ms FROM requests WHERE status = 200"))

    lost = tally.started - tally.answered
    latencies, first_tokens = sorted(tally.latencies), sorted(tally.first_tokens)
    report = {
        "requests": tally.started,
        "not started (time bound)": args.requests - tally.started,
        "answered": tally.answered,
        "503s": tally.busy,
        "retries": tally.retries,
        "lost": lost,
        "other statuses": dict(tally.other),
        "latency p50/p95 s": f"{quantile(latencies, 0.5):.3f} / {quantile(latencies, 0.95):.3f}",
        "time to first token p50/p95 s (streamed)": (
            f"{quantile(first_tokens, 0.5):.3f} / {quantile(first_tokens, 0.95):.3f}"
        ),
        "in the server p50/p95 s": f"{quantile(in_server, 0.5):.3f} / {quantile(in_server, 0.95):.3f}",
        "mean rows per step": round(
            sample(metrics, "tunesmith_batch_size_sum") / sample(metrics, "tunesmith_batch_size_count"), 2
        ),
        "peak queue depth": int(peak_queue),
        "queue size": args.queue_size,
        "peak server RSS MB": round(rss, 1),
        "wall s": round(wall, 1),
        "answers/s": round(tally.answered / wall, 1),
        "request log rows by status": logged,
        "worker after the load": health["worker"],
        "clients": args.clients,
        "max batch": args.max_batch,
        "max tokens": args.max_tokens,
        "cpu flags": cpu_flags(),
        "load average (1 min) at the end": os.getloadavg()[0],  # the machine is shared: what else ran
    }
    for key, value in report.items():
        print(f"{key:28} {json.dumps(value) if isinstance(value, dict) else value}")
    problems = []
    if lost or tally.other:
        problems.append(f"{lost} requests lost, other outcomes {dict(tally.other)}")
    if peak_queue > args.queue_size:
        problems.append(f"the queue reached {peak_queue}, over its size {args.queue_size}")
    if logged.get(200, 0) != tally.answered or set(logged) - {200}:
        problems.append(f"the request log has {logged}, the clients saw {tally.answered} answers")
    print("FAIL: " + "; ".join(problems) if problems else "OK: every request answered, only 200 and 503 came back")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
