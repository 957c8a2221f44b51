"""Tool calling through `tunesmith serve`: tools and tool_choice in, calls out (whole and streamed) as the openai
client reads them, required and named choices enforced, bad tools refused, calls kept in the request log.

The served run is the colour run with the tools block its template gets when trained on tool data. Where a test
needs the model to write a given answer, the engine is scripted (`scripted`): what is tested is the server's
reading of the answer, not what a random model writes."""

from __future__ import annotations

import json
import sqlite3

import pytest

from tests.conftest import build_tokenizer
from tests.serve_helpers import KEY, client, openai_error, run_with_template, serving
from tests.test_tools import BOOK, CANCEL, MISTRAL_CALLS, NATIVE
from tunesmith.data.tokenize import DEFAULT_CHAT_TEMPLATE
from tunesmith.data.tools import with_tools_block
from tunesmith.deploy.engine import Engine, Result
from tunesmith.deploy.monitor import export_feedback, monitor_report
from tunesmith.deploy.requestlog import RequestLog
from tunesmith.deploy.toolcalls import AnswerSplitter, call_opening

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

TOOLS = [BOOK, CANCEL]
ASK = [{"role": "user", "content": "Book P-17 on Monday."}]
CALL = '{"name": "book", "arguments": {"patient": "P-17", "day": "monday"}}'
CALL_TEXT = f"Booking now.\n<tool_call>\n{CALL}\n</tool_call>"


@pytest.fixture(scope="module")
def tool_server(runs, tmp_path_factory):
    """The colour run as a run trained on tool data saves it (its template with the tools block), served alone with
    room for the tools block in this tiny tokenizer:
    (url, request log path, engine)."""
    run = run_with_template(runs[0], tmp_path_factory.mktemp("tooled"), "clinic", with_tools_block)
    engine = Engine([run], queue_size=16, context_limit=2048, max_prompt_tokens=1900)  # the tools block is long
    with serving(engine, tmp_path_factory.mktemp("log")) as (url, log_path, _):
        yield url, log_path, engine


@pytest.fixture
def scripted(tool_server, monkeypatch):
    """Make the engine answer jobs with the texts given (in pieces of 3 characters, as a stream would); the jobs
    submitted are collected."""
    engine = tool_server[2]
    jobs = []

    def script(*texts: str) -> list:
        """Answer the jobs with `texts` in turn, the last one ever after."""

        def submit(job) -> None:
            jobs.append(job)
            text = texts[min(len(jobs), len(texts)) - 1]
            if job.stream:
                for start in range(0, len(text), 3):
                    job.emit("delta", text[start : start + 3])
            job.emit("done", Result(text, len(job.prompt_ids), 5, "stop", 0.01))

        monkeypatch.setattr(engine, "submit", submit)
        return jobs

    return script


def post(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})


def test_a_call_is_answered_as_tool_calls_with_string_arguments(tool_server, scripted):
    url, _, _ = tool_server
    scripted(CALL_TEXT)
    reply = client(url).chat.completions.create(model="clinic", messages=ASK, tools=TOOLS)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Booking now."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "book" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"patient": "P-17", "day": "monday"}


def test_a_streamed_call_is_rebuilt_by_the_openai_clients_stream_helper(tool_server, scripted):
    url, _, _ = tool_server
    scripted(CALL_TEXT)
    with client(url).chat.completions.stream(model="clinic", messages=ASK, tools=TOOLS) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Booking now."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
        ("book", {"patient": "P-17", "day": "monday"})
    ]


def test_streamed_content_never_shows_call_markup_and_parallel_calls_keep_their_index(tool_server, scripted):
    url, _, _ = tool_server
    second = '<tool_call>\n{"name": "cancel", "arguments": {"id": "A-3"}}\n</tool_call>'
    scripted(f"{CALL_TEXT}\n{second}")
    chunks = list(client(url).chat.completions.create(model="clinic", messages=ASK, tools=TOOLS, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "Booking now."
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
    assert [calls[i]["name"] for i in sorted(calls)] == ["book", "cancel"]
    assert json.loads(calls[1]["arguments"]) == {"id": "A-3"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_an_answer_without_a_call_is_plain_text_streamed_or_not(tool_server, scripted):
    url, _, _ = tool_server
    scripted("Which day suits you?")
    api = client(url)
    whole = api.chat.completions.create(model="clinic", messages=ASK, tools=TOOLS).choices[0]
    assert whole.message.content == "Which day suits you?" and not whole.message.tool_calls
    assert whole.finish_reason == "stop"
    chunks = list(api.chat.completions.create(model="clinic", messages=ASK, tools=TOOLS, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Which day suits you?"


THOUGHT = "P-17 asked for Monday.\nBook it."


@pytest.mark.parametrize("tools", [TOOLS, None])
def test_an_answers_reasoning_comes_apart_as_reasoning_content_streamed_or_not(tool_server, scripted, tools):
    """The template writes reasoning as a <think> block (tunesmith's tools block does): the served answer's
    opening block is its reasoning_content, never content, whole and streamed (in pieces of 3 characters, so the
    tags arrive split), beside the calls or a plain answer."""
    url, _, engine = tool_server
    assert engine.models["clinic"].reasoning
    answer = CALL_TEXT if tools else "Booked."
    scripted(f"<think>\n{THOUGHT}\n</think>\n\n{answer}")
    api = client(url)
    offered = {"tools": tools} if tools else {}
    whole = api.chat.completions.create(model="clinic", messages=ASK, **offered).choices[0].message
    assert whole.reasoning_content == THOUGHT
    assert whole.content == ("Booking now." if tools else "Booked.")
    assert bool(whole.tool_calls) == bool(tools)
    chunks = list(api.chat.completions.create(model="clinic", messages=ASK, stream=True, **offered))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == THOUGHT
    assert "".join(d.content or "" for d in deltas) == ("Booking now." if tools else "Booked.")
    assert not any("think>" in (d.content or "") for d in deltas)


def test_an_answer_cut_off_while_reasoning_has_reasoning_and_no_content(tool_server, scripted):
    url, _, _ = tool_server
    scripted("<think>\nStill weighing Monday against")
    message = client(url).chat.completions.create(model="clinic", messages=ASK).choices[0].message
    assert message.reasoning_content == "Still weighing Monday against" and not message.content


def test_the_prompt_shows_the_tools_and_renders_calls_and_results_of_the_history(tool_server, scripted):
    url, _, engine = tool_server
    jobs = scripted("Booked for Monday 9:00.")
    history = [
        *ASK,
        {"role": "assistant", "content": None, "reasoning_content": "P-17 is known.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "book", "arguments": '{"patient": "P-17"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "booked at 9:00"},
    ]  # fmt: skip
    client(url).chat.completions.create(model="clinic", messages=history, tools=TOOLS)
    prompt = engine.models["clinic"].tokenizer.decode(jobs[-1].prompt_ids)
    assert "<tools>" in prompt and '"name": "book"' in prompt
    assert '<tool_call>\n{"name": "book", "arguments": {"patient": "P-17"}}\n</tool_call>' in prompt
    assert "<tool_response>\nbooked at 9:00\n</tool_response>" in prompt
    assert "<think>\nP-17 is known.\n</think>" in prompt  # earlier reasoning, rendered as training rendered it
    client(url).chat.completions.create(model="clinic", messages=ASK, tools=TOOLS, tool_choice="none")
    assert "<tools>" not in engine.models["clinic"].tokenizer.decode(jobs[-1].prompt_ids)


def test_required_and_named_choices_start_the_answer_with_the_call(tool_server, scripted):
    url, _, engine = tool_server
    tokenizer = engine.models["clinic"].tokenizer
    jobs = scripted('{"patient": "P-17", "day": "monday"}}\n</tool_call>')
    named = {"type": "function", "function": {"name": "book"}}
    reply = client(url).chat.completions.create(model="clinic", messages=ASK, tools=TOOLS, tool_choice=named)
    assert tokenizer.decode(jobs[-1].prompt_ids).endswith('<tool_call>\n{"name": "book", "arguments": ')
    assert reply.choices[0].message.tool_calls[0].function.name == "book"
    jobs = scripted('"cancel", "arguments": {"id": "A-3"}}\n</tool_call>')
    reply = client(url).chat.completions.create(model="clinic", messages=ASK, tools=TOOLS, tool_choice="required")
    assert tokenizer.decode(jobs[-1].prompt_ids).endswith('<tool_call>\n{"name": ')
    assert reply.choices[0].message.tool_calls[0].function.name == "cancel"


def test_a_required_call_the_model_does_not_make_is_an_error_not_text(tool_server, scripted):
    url, db, _ = tool_server
    scripted("I would rather chat.")
    response = post(url, {"model": "clinic", "messages": ASK, "tools": TOOLS, "tool_choice": "required"})
    # The answer was made to open a call, so what the model wrote instead is a call that does not decode.
    assert response.status_code == 500 and "does not decode" in openai_error(response)["message"]
    named = {"type": "function", "function": {"name": "book"}}
    scripted('"oops"}}\n</tool_call>')  # a call to book would need an object of arguments
    broken = post(url, {"model": "clinic", "messages": ASK, "tools": TOOLS, "tool_choice": named, "stream": True})
    assert broken.status_code == 200 and '"error"' in broken.text and "does not decode" in broken.text
    with sqlite3.connect(db) as con:
        errors = con.execute("SELECT error FROM requests WHERE status = 500").fetchall()
    assert errors and all("tool_choice asked for a call" in error for (error,) in errors)


def test_a_random_model_under_a_named_choice_gets_an_error_rather_than_a_made_up_call(tool_server):
    url, _, _ = tool_server
    named = {"type": "function", "function": {"name": "book"}}
    response = post(url, {"model": "clinic", "messages": ASK, "tools": TOOLS, "tool_choice": named, "max_tokens": 4})
    assert response.status_code == 500 and "tool_choice asked for a call to book" in openai_error(response)["message"]


BAD_TOOLS = {
    "not a list": ({"tools": {"name": "book"}}, "tools"),
    "no name": ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools"),
    "another type": ({"tools": [{"type": "code_interpreter"}]}, "tools"),
    "parameters not a schema": ({"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]}, "tools"),
    "unknown choice": ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    "choice of no tool": ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
                          "tool_choice"),
    "required without tools": ({"tool_choice": "required"}, "tool_choice"),
    "arguments not JSON": ({"messages": [*ASK, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "book", "arguments": "{oops"}}]}]}, "messages"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_TOOLS))
def test_tools_of_an_unknown_shape_get_a_400_naming_the_field(tool_server, case):
    url, _, _ = tool_server
    extra, param = BAD_TOOLS[case]
    response = post(url, {"model": "clinic", "messages": ASK, "max_tokens": 2, **extra})
    assert response.status_code == 400 and openai_error(response)["param"] == param, response.text


def test_a_run_whose_template_renders_no_tools_says_so(server):
    url, _, _ = server
    response = post(url, {"model": "colours", "messages": ASK, "tools": TOOLS})
    assert response.status_code == 400 and openai_error(response)["param"] == "tools"
    assert "trained without tool data" in response.json()["error"]["message"]


def test_the_request_log_keeps_the_tools_the_calls_and_the_results_and_feedback_on_a_call_works(
    tool_server, scripted, tmp_path
):
    url, db, engine = tool_server
    run = engine.models["clinic"].run_dir
    scripted(CALL_TEXT)
    history = [*ASK, {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "c0", "type": "function", "function": {"name": "cancel", "arguments": '{"id": "A-3"}'}}]},
        {"role": "tool", "tool_call_id": "c0", "content": "nothing to cancel"}]  # fmt: skip
    reply = client(url).chat.completions.create(model="clinic", messages=history, tools=TOOLS)
    with sqlite3.connect(db) as con:
        tools, calls, messages, output = con.execute(
            "SELECT tools, tool_calls, messages, output FROM requests WHERE id = ?", (reply.id,)
        ).fetchone()
    tools = json.loads(tools)
    assert [t["function"]["name"] for t in tools] == ["book", "cancel"]
    assert json.loads(calls)[0]["function"]["name"] == "book" and output == CALL_TEXT
    logged = json.loads(messages)
    assert logged[1]["tool_calls"][0]["id"] == "c0" and logged[2] == {
        "role": "tool", "content": "nothing to cancel", "tool_call_id": "c0"
    }  # fmt: skip
    headers = {"Authorization": f"Bearer {KEY}"}
    rated = httpx.post(f"{url}/v1/feedback", json={"id": reply.id, "rating": 5}, headers=headers)
    assert rated.status_code == 200
    corrected = tmp_path / "corrected.jsonl"
    assert export_feedback(run, corrected, db=db, min_rating=4) == 1
    (row,) = [json.loads(line) for line in corrected.read_text().splitlines()]
    assert row["tools"] == tools and row["messages"][-1]["tool_calls"][0]["function"] == {
        "name": "book", "arguments": {"patient": "P-17", "day": "monday"}
    }  # fmt: skip
    assert monitor_report(run, db)["traffic"]["requests"] >= 1  # drift and feedback read tool turns too


def test_the_forced_call_opening_is_read_off_each_template_form():
    hermes = build_tokenizer(with_tools_block(DEFAULT_CHAT_TEMPLATE))
    assert call_opening(hermes, None) == '<tool_call>\n{"name": '
    assert call_opening(hermes, "book") == '<tool_call>\n{"name": "book", "arguments": '
    mistral = build_tokenizer(NATIVE.replace("CALL_", MISTRAL_CALLS))
    assert call_opening(mistral, None) == '[TOOL_CALLS][{"name": '
    assert call_opening(mistral, "book") == '[TOOL_CALLS][{"name": "book", "arguments": '


@pytest.mark.parametrize(
    ("parser", "text"),
    [
        ("hermes", 'Sure.\n<tool_call>\n{"name": "cancel", "arguments": {"id": "A-3"}}\n</tool_call>'),
        ("mistral", 'Sure.[TOOL_CALLS][{"name": "cancel", "arguments": {"id": "A-3"}}]'),
        ("json", '{"name": "cancel", "parameters": {"id": "A-3"}}'),
    ],
)
def test_streamed_text_stops_before_the_call_markup_of_each_form(parser, text):
    splitter = AnswerSplitter(parser)
    sent = "".join(splitter.feed(text[i : i + 2]) for i in range(0, len(text), 2))
    answered, rest = splitter.finish()
    assert sent + rest == answered.content == ("" if parser == "json" else "Sure.")
    assert [(c.name, c.arguments) for c in answered.calls] == [("cancel", {"id": "A-3"})]


def test_a_two_step_tool_loop_completes_with_the_openai_client(tool_server, scripted):
    """The loop of docs/deploy.md: call, result, answer."""
    url, _, _ = tool_server
    jobs = scripted(CALL_TEXT, "Booked for Monday 9:00.")
    api, messages = client(url), list(ASK)
    reply = api.chat.completions.create(model="clinic", messages=messages, tools=TOOLS)
    message = reply.choices[0].message
    while reply.choices[0].finish_reason == "tool_calls":
        messages.append(message.model_dump(exclude_none=True))
        for call in message.tool_calls:
            arguments = json.loads(call.function.arguments)
            messages.append({"role": "tool", "tool_call_id": call.id, "content": f"booked {arguments['patient']}"})
        reply = api.chat.completions.create(model="clinic", messages=messages, tools=TOOLS)
        message = reply.choices[0].message
    assert message.content == "Booked for Monday 9:00." and len(jobs) == 2
    prompt = tool_server[2].models["clinic"].tokenizer.decode(jobs[1].prompt_ids)
    assert "<tool_response>\nbooked P-17\n</tool_response>" in prompt


def test_a_request_log_from_before_tool_calls_gets_their_columns(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as con:  # the requests table as it was before tools and tool_calls
        con.execute(
            "CREATE TABLE requests (id TEXT PRIMARY KEY, created REAL NOT NULL, endpoint TEXT NOT NULL, model TEXT, "
            "status INTEGER NOT NULL, latency_ms REAL, first_token_ms REAL, prompt_tokens INTEGER, "
            "completion_tokens INTEGER, messages TEXT, output TEXT, finish_reason TEXT, error TEXT)"
        )
    log = RequestLog(path)
    log.record(id="chatcmpl-1", endpoint="chat", status=200, tools=TOOLS, tool_calls=[{"id": "c1"}])
    log.close()
    with sqlite3.connect(path) as con:
        tools, calls = con.execute("SELECT tools, tool_calls FROM requests").fetchone()
    assert json.loads(tools) == TOOLS and json.loads(calls) == [{"id": "c1"}]
