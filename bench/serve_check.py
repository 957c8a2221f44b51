"""Export, serve and monitor a finished run end to end, and print what it measured.

    python bench/serve_check.py runs/quickstart [--items 10] [--port 8011]

1. Exports the run as an Ollama folder (q8_0 GGUF + Modelfile), loads the GGUF in llama.cpp
   (llama-cpp-python) and answers the run's first test items with the GGUF's own chat template: share
   of answers equal to / valid JSON like the reference.
2. Starts `tunesmith serve RUN` as a real process and asks the same items through the openai client,
   streamed and not: latency, time to first token, tokens/s, and 16 requests 8 at a time.
3. Prints `tunesmith monitor RUN` over that traffic.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="A finished run directory, e.g. runs/quickstart")
    parser.add_argument("--items", type=int, default=10, help="Test items to ask [default: 10]")
    parser.add_argument("--port", type=int, default=8011)
    args = parser.parse_args()
    run = Path(args.run)

    from tunesmith.data.formats import read_conversations
    from tunesmith.deploy.export import export_run
    from tunesmith.evaluate.metrics import json_valid

    items = read_conversations(run / "data" / "test.jsonl")[0][: args.items]
    prompts = [[{"role": m.role, "content": m.content} for m in c.messages[:-1]] for c in items]
    references = [c.messages[-1].content for c in items]
    work = Path(tempfile.mkdtemp())

    started = time.perf_counter()
    folder = export_run(run, "ollama", work / "ollama")
    print(f"export ollama (q8_0): {time.perf_counter() - started:.0f} s -> {sorted(p.name for p in folder.iterdir())}")
    from tunesmith.deploy.llamacpp import load_llama

    llm = load_llama(next(folder.glob("*.gguf")), 1024)
    answers, started = [], time.perf_counter()
    for messages in prompts:
        reply = llm.create_chat_completion(messages=messages, max_tokens=96, temperature=0.0)
        answers.append(reply["choices"][0]["message"]["content"].strip())
    spent = time.perf_counter() - started
    exact = sum(a == r for a, r in zip(answers, references, strict=True))
    valid = sum(json_valid(a, "") for a in answers)
    print(
        f"llama.cpp on the GGUF: {len(answers)} answers in {spent:.1f} s; "
        f"exact {exact}/{len(answers)}, valid JSON {valid:.0f}/{len(answers)}"
    )
    print(f"  first answer: {answers[0]!r}")
    del llm

    import httpx
    import openai

    log = work / "requests.sqlite"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tunesmith",
            "serve",
            str(run),
            "--port",
            str(args.port),
            "--log-db",
            str(log),
            "--quiet",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        started = time.perf_counter()
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{args.port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
            if server.poll() is not None:
                raise SystemExit(server.stderr.read())
        print(f"server ready in {time.perf_counter() - started:.0f} s")
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="none", timeout=600)
        latencies, firsts, rates, served = [], [], [], []
        for messages in prompts:
            t0 = time.perf_counter()
            first, text, tokens = None, "", 0
            for chunk in api.chat.completions.create(model=run.name, messages=messages, max_tokens=96, stream=True):
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter() - t0
                    text += chunk.choices[0].delta.content
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            total = time.perf_counter() - t0
            latencies.append(total)
            firsts.append(first or total)
            rates.append(tokens / (total - (first or 0)) if total > (first or 0) else 0)
            served.append(text.strip())
        same = sum(s == r for s, r in zip(served, references, strict=True))
        print(
            f"served (streamed): latency median {statistics.median(latencies):.2f} s, time to first token median "
            f"{statistics.median(firsts):.2f} s, {statistics.median(rates):.1f} tokens/s after the first; exact "
            f"{same}/{len(served)}, valid JSON {sum(json_valid(s, '') for s in served):.0f}/{len(served)}"
        )
        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            replies = list(
                pool.map(
                    lambda m: api.chat.completions.create(model=run.name, messages=m, max_tokens=96),
                    [prompts[i % len(prompts)] for i in range(16)],
                )
            )
        print(f"16 requests, 8 at a time: all answered ({len(replies)}), {time.perf_counter() - t0:.1f} s wall")
    finally:
        server.terminate()
        server.wait(30)
    subprocess.run([sys.executable, "-m", "tunesmith", "monitor", str(run), "--db", str(log)], check=True)


if __name__ == "__main__":
    main()
