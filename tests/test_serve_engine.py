"""The serving engine under load: requests batched together (continuous batching, adapters mixed in one step), the
queue and its 503, a client leaving, one bad row, closing."""

from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.serve_helpers import (
    PROMPTS,
    HookedModel,
    client,
    endless,
    held,
    logged,
    reference,
    running,
    sample,
    wait_for,
)
from tunesmith.deploy.engine import Busy, Engine, Job
from tunesmith.deploy.requestlog import RequestLog
from tunesmith.deploy.serve import create_app

pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")


def test_fifty_concurrent_requests_all_succeed_and_are_counted(server):
    url, db, _ = server
    api = client(url)

    def ask(i: int) -> str:
        stream = i % 2 == 0
        reply = api.chat.completions.create(
            model=("colours", "shades", "base")[i % 3],
            messages=[{"role": "user", "content": f"colour red item {i}"}],
            max_tokens=6,
            stream=stream,
        )
        return "".join(c.choices[0].delta.content or "" for c in reply if c.choices) if stream else reply.id

    before = httpx.get(f"{url}/metrics").text
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(ask, range(50)))
    assert len(results) == 50  # any failure would have raised
    metrics = httpx.get(f"{url}/metrics").text
    assert sample(metrics, "tunesmith_requests_total", 'endpoint="chat"', 'status="200"') >= 50 + sample(
        before, "tunesmith_requests_total", 'endpoint="chat"', 'status="200"'
    )
    assert sample(metrics, "tunesmith_generated_tokens_total") > 0
    assert sample(metrics, "tunesmith_time_to_first_token_seconds_count") >= 50
    assert sample(metrics, "tunesmith_request_latency_seconds_count") >= 50
    assert "tunesmith_request_errors_total" in metrics or "tunesmith_request_errors" in metrics


def test_waiting_requests_are_generated_together_and_answer_as_alone(runs, tmp_path):
    engine = Engine(runs[:1], max_batch=8)
    release = held(engine, lambda jobs: any(job.max_tokens == 1 for job in jobs))  # the blocker's step waits
    app = create_app(engine, RequestLog(tmp_path / "r.sqlite"), default_max_tokens=8)
    prompts = ["colour red", "colour blue item 7 and more words here", "pink", "colour white item 12", "x y z"]
    with running(app) as url:
        api = client(url, key="unused")
        alone = [
            api.chat.completions.create(model="colours", messages=[{"role": "user", "content": p}])
            .choices[0]
            .message.content
            for p in prompts
        ]
        with ThreadPoolExecutor(8) as pool:
            blocker = pool.submit(api.chat.completions.create, model="colours", max_tokens=1,
                                  messages=[{"role": "user", "content": "hold"}])  # fmt: skip
            time.sleep(0.5)  # the worker is busy with the blocker; the next five queue up
            futures = [
                pool.submit(
                    api.chat.completions.create,
                    model="colours",
                    messages=[{"role": "user", "content": p}],
                    stream=i % 2 == 0,
                )  # fmt: skip
                for i, p in enumerate(prompts)
            ]
            time.sleep(0.5)
            release.set()
            blocker.result(timeout=60)
            together = []
            for i, future in enumerate(futures):
                reply = future.result(timeout=60)
                together.append(
                    "".join(c.choices[0].delta.content or "" for c in reply if c.choices) if i % 2 == 0
                    else reply.choices[0].message.content
                )  # fmt: skip
        metrics = httpx.get(f"{url}/metrics").text
    engine.close()
    assert max(engine.batch_sizes) == 5  # the five waiting requests were generated in the same steps
    assert together == alone  # their own positions and slots of the shared cache change nothing
    assert sample(metrics, "tunesmith_batch_size_bucket", 'le="8.0"') >= 1


def test_degenerate_sampling_in_one_request_never_fails_its_batch_neighbours(runs, tmp_path):
    engine = Engine(runs[:1], max_batch=8)
    release = held(engine)
    app = create_app(engine, RequestLog(tmp_path / "r.sqlite"), default_max_tokens=4)
    settings = [{}, {"temperature": 1e-50}, {}, {"temperature": 2.0, "top_p": 1e-300, "seed": 3}, {"seed": 2**64 - 1}]
    with running(app) as url, ThreadPoolExecutor(8) as pool:
        ask = lambda extra: httpx.post(  # noqa: E731
            f"{url}/v1/chat/completions",
            json={"model": "colours", "messages": [{"role": "user", "content": "colour red item 1"}], **extra},
            timeout=60,
        )
        blocker = pool.submit(ask, {})
        time.sleep(0.5)  # the worker holds the blocker; the others wait and then go as one batch
        replies = [pool.submit(ask, extra) for extra in settings]
        wait_for(lambda: engine.waiting == len(settings))
        release.set()
        assert blocker.result(timeout=60).status_code == 200
        statuses = [reply.result(timeout=60).status_code for reply in replies]
    engine.close()
    assert statuses == [200] * len(settings)
    assert max(engine.batch_sizes) >= len(settings)  # they were generated in the same steps


def test_an_error_in_one_row_fails_that_request_only(runs):
    engine = Engine(runs[:1], max_batch=8)
    poison = 7

    def choke(inputs):  # a prompt the model cannot take fails the whole step its prefill runs in
        if inputs["input_ids"].shape[1] > 1 and (inputs["input_ids"] == poison).any():
            raise RuntimeError("this prompt breaks the model")

    engine.model = HookedModel(engine.model, choke)
    release = held(engine)
    events: dict[str, list] = collections.defaultdict(list)

    def submit(name: str, ids: list[int], seed: int | None = None) -> None:
        # Not streamed: a request that has streamed text when a step fails cannot be started over, and fails.
        emit = lambda kind, value: events[name].append(kind)  # noqa: E731
        engine.submit(Job(engine.models["colours"], ids, 3, 1.0, 1.0, [], seed, emit, stream=False))

    submit("blocker", [5, 6], seed=1)
    wait_for(lambda: engine.waiting == 0)
    submit("good 1", [5, 6, 9], seed=1)
    submit("seed out of torch's range", [5, 6, 9], seed=2**70)
    submit("good 2", [11, 12])
    submit("poisoned prompt", [5, poison, 9])
    submit("good 3", [13])
    release.set()
    wait_for(lambda: len(events) == 6 and all(e[-1] in ("done", "error") for e in events.values()))
    engine.close()
    assert {name: kinds[-1] for name, kinds in events.items()} == {
        "blocker": "done",
        "good 1": "done",
        "seed out of torch's range": "error",
        "good 2": "done",
        "poisoned prompt": "error",
        "good 3": "done",
    }
    assert all(kinds.count("done") + kinds.count("error") == 1 for kinds in events.values())  # answered once


def test_a_full_queue_answers_503_instead_of_crashing(runs, tmp_path):
    engine = Engine(runs[:1], queue_size=1)
    release = threading.Event()
    step = engine._step
    engine._step = lambda generator: (release.wait(20), step(generator))[1]
    app = create_app(engine, RequestLog(tmp_path / "r.sqlite"), default_max_tokens=2)
    body = {"model": "colours", "messages": [{"role": "user", "content": "x"}]}
    with running(app) as url, ThreadPoolExecutor(4) as pool:
        first = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=body, timeout=30)
        time.sleep(0.5)  # the worker holds the first job; the queue takes one more
        second = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=body, timeout=30)
        time.sleep(0.5)
        third = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        assert third.status_code == 503 and "busy" in third.json()["error"]["message"]
        assert int(third.headers["retry-after"]) >= 1  # when to come back, as OpenAI's clients read it
        release.set()
        assert first.result(timeout=60).status_code == 200 and second.result(timeout=60).status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200
        assert sample(httpx.get(f"{url}/metrics").text, "tunesmith_busy_refusals_total", 'endpoint="chat"') == 1
    engine.close()


def test_everything_waiting_counts_against_the_queue_size(runs):
    engine = Engine(runs[:1], queue_size=2, max_batch=1)
    started, gate = threading.Semaphore(0), threading.Semaphore(0)

    step = engine._step

    def step_gated(generator):  # each job here is one step: a 2-token prompt's prefill gives its 1 token
        started.release()
        gate.acquire(timeout=30)
        return step(generator)

    engine._step = step_gated
    job = lambda: Job(engine.models["colours"], [5, 6], 1, 0.0, 1.0, [], None, lambda kind, value: None)  # noqa: E731
    engine.submit(job())
    assert started.acquire(timeout=10)  # the first is generating and holds no place
    engine.submit(job())
    engine.submit(job())
    with pytest.raises(Busy):
        engine.submit(job())
    gate.release()
    assert started.acquire(timeout=10)  # the second generates (max_batch 1); the third waits
    engine.submit(job())  # so one place is free, and one only
    with pytest.raises(Busy) as busy:
        engine.submit(job())
    assert engine.waiting == 2 and engine.peak_waiting == 2 and busy.value.retry_after >= 1
    for _ in range(4):
        gate.release()
    engine.close()


def test_a_client_that_disconnects_stops_its_generation_and_is_logged(runs, tmp_path):
    engine = Engine(runs[:1])
    model = endless(engine, 0.05)
    db = tmp_path / "r.sqlite"
    app = create_app(engine, RequestLog(db), max_tokens_limit=400, default_max_tokens=400)
    body = {"model": "colours", "messages": [{"role": "user", "content": "colour red item 1"}]}
    with running(app) as url:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=0.5)
        wait_for(lambda: logged(db, 499))
        calls = model.calls
        time.sleep(0.5)
        assert model.calls - calls <= 2 and model.calls < 100  # stopped, far short of 400 tokens
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=30) as reply:
            next(reply.iter_lines())  # the first chunk, then the client goes away
        dropped = wait_for(lambda: len(logged(db, 499)) == 2 and logged(db, 499))
        calls = model.calls
        time.sleep(0.5)
        assert model.calls - calls <= 2
    engine.close()
    assert all(row[2] == "client disconnected" for row in dropped)
    assert logged(db, 200) == []


def test_closing_an_engine_answers_the_requests_still_waiting_and_refuses_new_ones(runs):
    from tunesmith.deploy.engine import Stopped

    engine = Engine(runs[:1], max_batch=1)
    release, generating = threading.Event(), threading.Event()
    step = engine._step
    engine._step = lambda generator: (generating.set(), release.wait(20), step(generator))[2]
    served = engine.models["colours"]
    events: dict[str, list] = {"first": [], "second": []}
    first = Job(served, [1, 2, 3], 2, 0.0, 1.0, [], 0, lambda kind, value: events["first"].append(kind))
    second = Job(served, [1, 2, 3], 2, 0.0, 1.0, [], 0, lambda kind, value: events["second"].append((kind, value)))
    engine.submit(first)
    assert generating.wait(20)  # the worker holds the first; the second waits behind it
    engine.submit(second)
    engine.close()
    assert events["second"] and events["second"][0][0] == "error" and "unloaded" in events["second"][0][1]
    with pytest.raises(Stopped):
        engine.submit(Job(served, [1], 1, 0.0, 1.0, [], 0, lambda kind, value: None))
    release.set()
    engine.worker.join(20)
    assert events["first"][-1] == "done"  # what was generating when it closed still finishes


def test_a_request_arriving_mid_generation_joins_the_running_batch_and_can_finish_first(runs):
    engine = Engine(runs[:1], max_batch=8)
    model = endless(engine, 0.02)
    events: dict[str, list] = collections.defaultdict(list)

    def job(name: str, max_tokens: int) -> Job:
        emit = lambda kind, value: events[name].append((kind, value))  # noqa: E731
        return Job(engine.models["colours"], [5, 6, 9], max_tokens, 0.0, 1.0, [], None, emit)

    long = job("long", 300)
    engine.submit(long)
    wait_for(lambda: model.calls >= 5)  # the long answer is well under way
    short = job("short", 3)
    engine.submit(short)
    wait_for(lambda: short.answered)
    assert not long.answered  # the short one joined at once and finished while the long one went on
    assert max(engine.batch_sizes) == 2
    long.cancelled.set()
    wait_for(lambda: long.answered)
    engine.close()
    assert events["short"][-1][0] == "done" and events["short"][-1][1].completion_tokens == 3
    assert events["short"][-1][1].finish_reason == "length"
    assert events["long"][-1][0] == "done" and events["long"][-1][1].finish_reason == "cancelled"
    assert 5 < events["long"][-1][1].completion_tokens < 300


def test_requests_for_two_adapters_and_the_base_share_steps_and_answer_as_alone(runs, tmp_path):
    engine = Engine(runs, max_batch=8)
    release = held(engine, lambda jobs: any(job.max_tokens == 1 for job in jobs))
    app = create_app(engine, RequestLog(tmp_path / "r.sqlite"), default_max_tokens=8)
    asked = {"colours": (runs[0], False), "shades": (runs[1], False), "base": (runs[0], True)}
    with running(app) as url, ThreadPoolExecutor(4) as pool:
        api = client(url, key="unused")
        hold = [{"role": "user", "content": "hold"}]
        blocker = pool.submit(api.chat.completions.create, model="colours", max_tokens=1, messages=hold)
        wait_for(lambda: engine.running)  # the worker holds the blocker's step; the three queue up behind it
        futures = {
            name: pool.submit(
                api.chat.completions.create,
                model=name,
                max_tokens=8,
                temperature=0,
                messages=[{"role": "user", "content": prompt}],
            )  # fmt: skip
            for name, prompt in zip(asked, PROMPTS, strict=True)
        }
        wait_for(lambda: engine.waiting == len(asked))
        release.set()
        blocker.result(timeout=60)
        answers = {name: future.result(timeout=60).choices[0].message.content for name, future in futures.items()}
    engine.close()
    assert max(engine.batch_sizes) >= 3  # the blocker left after one step: these three decoded in the same steps
    for (name, (run, base)), prompt in zip(asked.items(), PROMPTS, strict=True):
        assert answers[name].strip() == reference(run, prompt, base=base), name


def test_the_cache_holds_the_longest_prompt_and_answer_and_a_larger_server_limit_is_refused(runs, tmp_path):
    from tunesmith.errors import TunesmithError

    engine = Engine(runs[:1], max_tokens_limit=16)
    try:
        assert engine.max_length == min(engine.context_limit, engine.max_prompt_tokens + 16)
        with pytest.raises(TunesmithError, match="max_tokens_limit 64"):
            create_app(engine, RequestLog(tmp_path / "r.sqlite"), max_tokens_limit=64, default_max_tokens=8)
    finally:
        engine.close()
