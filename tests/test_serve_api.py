"""The OpenAI-compatible endpoints of `tunesmith serve`: answers, streaming, fields, errors and the request log."""

from __future__ import annotations

import json
import sqlite3

import pytest

from tests.serve_helpers import KEY, PROMPTS, HookedModel, client, logged, openai_error, reference, running, sample
from tunesmith.deploy.engine import Engine
from tunesmith.deploy.requestlog import RequestLog
from tunesmith.deploy.serve import create_app

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")


def test_models_are_listed_per_run_and_base(server):
    url, _, _ = server
    assert sorted(m.id for m in client(url).models.list()) == ["base", "colours", "shades"]


def test_chat_answers_equal_offline_generation_for_each_adapter_and_the_base(server, runs):
    url, _, _ = server
    api = client(url)
    answers = {}
    for name, run, base in (("colours", runs[0], False), ("shades", runs[1], False), ("base", runs[0], True)):
        for prompt in PROMPTS:
            reply = api.chat.completions.create(
                model=name, messages=[{"role": "user", "content": prompt}], max_tokens=8, temperature=0
            )
            answers[name, prompt] = reply.choices[0].message.content
            assert reply.choices[0].message.content.strip() == reference(run, prompt, base=base)
            assert reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens > 5
    # The routing is real: the adapters and the base do not all answer alike.
    assert len({tuple(answers[n, p] for p in PROMPTS) for n in ("colours", "shades", "base")}) > 1


def test_streaming_chat_and_completions_give_the_same_text_as_non_streaming(server):
    url, _, _ = server
    api = client(url)
    messages = [{"role": "user", "content": PROMPTS[0]}]
    whole = api.chat.completions.create(model="colours", messages=messages, max_tokens=8).choices[0].message.content
    chunks = list(api.chat.completions.create(model="colours", messages=messages, max_tokens=8, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= 1
    plain = api.completions.create(model="base", prompt="colour red", max_tokens=6).choices[0].text
    streamed = "".join(
        c.choices[0].text for c in api.completions.create(model="base", prompt="colour red", max_tokens=6, stream=True)
    )
    assert streamed == plain


def test_bad_requests_get_clear_4xx_answers(server):
    url, _, _ = server
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    post = lambda body: httpx.post(f"{url}/v1/chat/completions", content=body, headers=headers)  # noqa: E731
    bad_json = post("{not json")
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
    unknown = post(json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]}))
    assert unknown.status_code == 404 and "colours" in unknown.json()["error"]["message"]
    empty = post(json.dumps({"model": "colours", "messages": []}))
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "messages"
    too_many = post(json.dumps({"model": "colours", "messages": [{"role": "user", "content": "x"}], "max_tokens": 65}))
    assert too_many.status_code == 400 and "limit of 64" in too_many.json()["error"]["message"]
    bad_role = post(json.dumps({"model": "colours", "messages": [{"role": "robot", "content": "x"}]}))
    assert bad_role.status_code == 400 and bad_role.json()["error"]["param"] == "messages.0.role"
    with pytest.raises(openai.NotFoundError):
        client(url).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_every_request_is_logged_and_feedback_is_recorded(server):
    url, db, _ = server
    api = client(url)
    reply = api.chat.completions.create(model="colours", messages=[{"role": "user", "content": "colour green item 2"}])
    with sqlite3.connect(db) as con:
        row = con.execute(
            "SELECT model, status, latency_ms, prompt_tokens, completion_tokens, messages, output "
            "FROM requests WHERE id=?",
            (reply.id,),
        ).fetchone()
    assert row[0] == "colours" and row[1] == 200 and row[2] > 0 and row[3] > 0 and row[4] >= 1
    assert json.loads(row[5])[0]["content"] == "colour green item 2" and row[6] == reply.choices[0].message.content
    headers = {"Authorization": f"Bearer {KEY}"}
    ok = httpx.post(
        f"{url}/v1/feedback", json={"id": reply.id, "rating": 1, "correction": '{"colour": "green"}'}, headers=headers
    )
    assert ok.status_code == 200 and ok.json()["status"] == "recorded"
    missing = httpx.post(f"{url}/v1/feedback", json={"id": "chatcmpl-nope", "rating": 5}, headers=headers)
    assert missing.status_code == 404
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT rating, correction FROM feedback WHERE request_id=?", (reply.id,)).fetchone() == (
            1.0,
            '{"colour": "green"}',
        )


BAD_BODIES = {
    "temperature not a number": ('"temperature": NaN', "temperature"),
    "temperature far out of range": ('"temperature": 1e308', "temperature"),
    "top_p zero": ('"top_p": 0', "top_p"),
    "seed beyond 64 bits": (f'"seed": {2**70}', "seed"),
    "seed of the wrong type": ('"seed": "lucky"', "seed"),
    "empty stop string": ('"stop": ""', "stop"),
    "huge stop string": (f'"stop": ["{"x" * 1000}"]', "stop"),
    "too many stop strings": (f'"stop": {json.dumps([str(i) for i in range(100)])}', "stop"),
    "stop of the wrong type": ('"stop": 5', "stop"),
    "absurd max_tokens": (f'"max_tokens": {10**30}', "max_tokens"),
    "max_tokens of the wrong type": ('"max_tokens": "many"', "max_tokens"),
    "model of the wrong type": ('"model": ["colours"]', "model"),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_degenerate_values_get_a_400_naming_the_field(server, case):
    url, _, _ = server
    extra, param = BAD_BODIES[case]
    body = '{"model": "colours", "messages": [{"role": "user", "content": "hi"}], ' + extra + "}"
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    if '"model": [' in extra:
        body = body.replace('"model": "colours", ', "")
    response = httpx.post(f"{url}/v1/chat/completions", content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert openai_error(response)["param"] == param


def test_broken_text_and_oversized_lists_get_a_400_in_openai_shape(server):
    url, _, _ = server
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    chat, completions = f"{url}/v1/chat/completions", f"{url}/v1/completions"
    surrogate = httpx.post(
        chat, content='{"model": "colours", "messages": [{"role": "user", "content": "a\\ud800b"}]}', headers=headers
    )
    assert surrogate.status_code == 400 and openai_error(surrogate)["param"] == "messages.0.content"
    assert "surrogate" in surrogate.json()["error"]["message"]
    in_prompt = httpx.post(completions, content='{"model": "base", "prompt": "\\udfff"}', headers=headers)
    assert in_prompt.status_code == 400 and openai_error(in_prompt)["param"] == "prompt"
    not_utf8 = httpx.post(chat, content=b'{"model": "colours", "messages": [{"role": "user", "content": "\xff"}]}',
                          headers=headers)  # fmt: skip
    assert not_utf8.status_code == 400 and "UTF-8" in openai_error(not_utf8)["message"]
    wrong_type = httpx.post(chat, json={"model": "colours", "messages": [{"role": "user", "content": 7}]},
                            headers=headers)  # fmt: skip
    assert wrong_type.status_code == 400 and openai_error(wrong_type)["param"] == "messages.0.content"
    many = httpx.post(chat, json={"model": "colours", "messages": [{"role": "user", "content": "x"}] * 600},
                      headers=headers)  # fmt: skip
    assert many.status_code == 400 and openai_error(many)["param"] == "messages"
    unknown_path = httpx.get(f"{url}/v2/anything", headers=headers)
    assert unknown_path.status_code == 404 and openai_error(unknown_path)["type"] == "not_found_error"


ASKING = {
    "logprobs": True,
    "top_logprobs": 3,
    "functions": [{"name": "f", "parameters": {"type": "object"}}],  # tools are served (test_serve_tools.py)
    "function_call": {"name": "f"},
    "response_format": {"type": "json_object"},
    "logit_bias": {"5": 10},
    "presence_penalty": 0.5,
    "frequency_penalty": -1.0,
}


@pytest.mark.parametrize("name", list(ASKING))
def test_openai_fields_not_implemented_are_refused_naming_the_field(server, name):
    url, _, _ = server
    body = {"model": "colours", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, name: ASKING[name]}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 400 and openai_error(response)["param"] == name
    assert f"'{name}'" in response.json()["error"]["message"]


def test_openai_fields_that_ask_for_nothing_are_accepted(server):
    url, _, _ = server
    harmless = {"logprobs": False, "top_logprobs": 0, "tools": [], "tool_choice": "none", "logit_bias": {},
                "response_format": {"type": "text"}, "presence_penalty": 0, "frequency_penalty": 0.0}  # fmt: skip
    body = {"model": "colours", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **harmless}
    headers = {"Authorization": f"Bearer {KEY}"}
    assert httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers).status_code == 200
    completion = {"model": "base", "prompt": "colour", "max_tokens": 2}
    silent = httpx.post(f"{url}/v1/completions", json={**completion, "logprobs": None}, headers=headers)
    assert silent.status_code == 200
    asking = httpx.post(f"{url}/v1/completions", json={**completion, "logprobs": 2}, headers=headers)
    assert asking.status_code == 400 and openai_error(asking)["param"] == "logprobs"


def test_a_stream_asked_to_include_usage_ends_with_a_usage_chunk(server):
    url, _, _ = server
    api = client(url)
    messages = [{"role": "user", "content": PROMPTS[0]}]
    chunks = list(api.chat.completions.create(model="colours", messages=messages, max_tokens=4, stream=True,
                                              stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens
    assert chunks[-2].choices[0].finish_reason in ("stop", "length") and chunks[-2].usage is None
    texts = list(api.completions.create(model="base", prompt="colour", max_tokens=3, stream=True,
                                        stream_options={"include_usage": True}))  # fmt: skip
    assert texts[-1].choices == [] and texts[-1].usage.completion_tokens >= 1


def test_a_chat_stream_opens_with_the_assistant_role_even_when_nothing_is_generated(runs, tmp_path):
    engine = Engine(runs[:1])
    served = engine.models["colours"]
    served.stop_ids = list(range(len(served.tokenizer)))  # whatever comes first ends the answer, empty
    app = create_app(engine, RequestLog(tmp_path / "r.sqlite"), default_max_tokens=4)
    with running(app) as url:
        body = {"model": "colours", "messages": [{"role": "user", "content": "x"}], "stream": True}
        text = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).text
    engine.close()
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1]["choices"][0]["finish_reason"] == "stop" and len(events) == 2
    assert text.rstrip().endswith("data: [DONE]")


class _BrokenTemplate:
    def apply_chat_template(self, *args, **kwargs):
        raise ValueError("secret template detail")


def test_failures_answer_500_without_their_text_and_a_stopped_worker_shows_in_health(runs, tmp_path):
    engine = Engine(runs[:1])

    def fail(inputs):
        raise RuntimeError("secret detail at /private/weights")

    engine.model = HookedModel(engine.model, fail)
    db = tmp_path / "r.sqlite"
    app = create_app(engine, RequestLog(db), default_max_tokens=2)
    body = {"model": "colours", "messages": [{"role": "user", "content": "colour red item 1"}]}
    with running(app) as url:
        failed = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        assert failed.status_code == 500 and openai_error(failed)["type"] == "server_error"
        assert "secret" not in failed.text and "RuntimeError" not in failed.text
        streamed = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=30)
        assert "server_error" in streamed.text and "secret" not in streamed.text
        assert all("secret" in row[2] for row in logged(db, 500))  # the details stay in the server's log
        engine.models["colours"].tokenizer = _BrokenTemplate()
        unexpected = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        assert unexpected.status_code == 500 and "secret" not in openai_error(unexpected)["message"]
        engine.close()
        engine.worker.join(10)
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["worker"] == "stopped"
        refused = httpx.post(f"{url}/v1/completions", json={"model": "base", "prompt": "x"}, timeout=30)
        assert refused.status_code == 503 and "worker" in openai_error(refused)["message"]


def test_a_request_log_that_cannot_be_written_never_loses_the_answer(runs, tmp_path):
    db = tmp_path / "r.sqlite"
    engine = Engine(runs[:1])
    app = create_app(engine, RequestLog(db), default_max_tokens=4)
    body = {"model": "colours", "messages": [{"role": "user", "content": "colour red item 1"}]}
    holder = sqlite3.connect(db)
    with running(app) as url:
        holder.execute("BEGIN EXCLUSIVE")  # another process holds the write lock past the log's busy timeout
        whole = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        streamed = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=30)
        holder.rollback()
        metrics = httpx.get(f"{url}/metrics").text
    engine.close()
    holder.close()
    assert whole.status_code == 200 and whole.json()["choices"][0]["message"]["content"] is not None
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
    assert sample(metrics, "tunesmith_request_log_errors_total") == 2
    assert sample(metrics, "tunesmith_requests_total", 'status="200"') == 2
