"""Tool calls and reasoning traces: the schema read from each peer's shape, the template that renders them, the
loss masks (exact, token by token), the parser's round trip, data check's findings and the BFCL-style metrics."""

import json

import pytest

from tunesmith.cli import main
from tunesmith.config import RewardConfig, RunConfig
from tunesmith.data.check import check_data
from tunesmith.data.formats import Conversation, Message, parse_file, read_conversations, write_jsonl
from tunesmith.data.tokenize import (
    DEFAULT_CHAT_TEMPLATE,
    learned_runs,
    prompt_ids,
    render,
    renders_reasoning,
    segments,
    tokenize_all,
    tokenize_conversation,
    tool_parser,
    use_chat_template,
)
from tunesmith.data.tools import (
    PARSERS,
    TOOLS_INTRO,
    TOOLS_OUTRO,
    TOOLS_PREAMBLE,
    ParsedTurn,
    ReasoningSplitter,
    ToolCall,
    parse_any,
    parse_hermes,
    split_reasoning,
    with_tools_block,
    written_turn,
)
from tunesmith.errors import TunesmithError
from tunesmith.evaluate import metrics
from tunesmith.rewards import Sample, build_rewards, score

from .conftest import build_tokenizer
from .conftest import write_jsonl as write_records

BOOK = {
    "type": "function",
    "function": {
        "name": "book",
        "description": "Book an appointment.",
        "parameters": {
            "type": "object",
            "properties": {
                "patient": {"type": "string"},
                "day": {"type": "string", "enum": ["monday", "tuesday"]},
                "slot": {"type": "integer"},
            },
            "required": ["patient", "day"],
        },
    },
}
CANCEL = {
    "type": "function",
    "function": {
        "name": "cancel",
        "description": "Cancel an appointment.",
        "parameters": {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]},
    },
}
BOOK_CALL = ToolCall("book", {"patient": "P-17", "day": "monday"}, "c1")
BOOKING = Conversation(
    messages=(
        Message("system", "Be brief."),
        Message("user", "Book P-17 on Monday."),
        Message("assistant", "", (BOOK_CALL,)),
        Message("tool", "booked", tool_call_id="c1", name="book"),
        Message("assistant", "Done.", reasoning="The slot is free."),
    ),
    tools=(BOOK,),
)
CALL_TEXT = '<tool_call>\n{"name": "book", "arguments": {"patient": "P-17", "day": "monday"}}\n</tool_call>'


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def default_tokenizer():
    tokenizer = build_tokenizer()
    use_chat_template(tokenizer, None, tools=True)
    return tokenizer


# --- the schema ------------------------------------------------------------------------------------------------


def test_openai_messages_keep_calls_results_reasoning_and_tools(tmp_path):
    record = {
        "tools": [BOOK],
        "messages": [
            {"role": "user", "content": "Book P-17 on Monday."},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "book", "arguments": '{"patient": "P-17"}'}},
                    {"id": "c2", "type": "function", "function": {"name": "cancel", "arguments": {"id": "A-3"}}},
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": {"ok": True}},
            {"role": "tool", "tool_call_id": "c2", "name": "cancel", "content": "cancelled"},
            {"role": "assistant", "content": "Done.", "thinking": "Both worked."},
        ],
    }
    (conversation,), fmt = read_conversations(write_records(tmp_path / "d.jsonl", [record]))
    call, assistant = conversation.messages[1], conversation.messages[4]
    assert fmt == "chat" and conversation.tools == (BOOK,)
    assert call.content == "" and call.tool_calls == (
        ToolCall("book", {"patient": "P-17"}, "c1"),
        ToolCall("cancel", {"id": "A-3"}, "c2"),
    )
    assert conversation.messages[2] == Message("tool", '{"ok": true}', tool_call_id="c1")
    assert conversation.messages[3].name == "cancel"
    assert assistant.reasoning == "Both worked."
    # Written back, arguments stay objects: reading the file again gives the same conversation.
    write_jsonl(tmp_path / "again.jsonl", [conversation])
    assert json.loads((tmp_path / "again.jsonl").read_text())["messages"][1]["tool_calls"][0]["function"] == {
        "name": "book",
        "arguments": {"patient": "P-17"},
    }
    assert read_conversations(tmp_path / "again.jsonl")[0] == [conversation]


def test_sharegpt_function_call_and_observation_turns_read_as_calls_and_results(tmp_path):
    record = {
        "conversations": [
            {"from": "human", "value": "Book P-17 on Monday and cancel A-3."},
            {
                "from": "function_call",
                "value": json.dumps(
                    [
                        {"name": "book", "arguments": {"patient": "P-17", "day": "monday"}},
                        {"name": "cancel", "arguments": {"id": "A-3"}},
                    ]
                ),
            },
            {"from": "observation", "value": "booked; cancelled"},
            {"from": "gpt", "value": "Both done."},
        ],
        "tools": json.dumps([BOOK["function"], CANCEL["function"]]),  # LLaMA-Factory: bare schemas, as a string
    }
    (conversation,), fmt = read_conversations(write_records(tmp_path / "d.jsonl", [record]))
    assert fmt == "sharegpt" and conversation.tools == (BOOK, CANCEL)
    assert [m.role for m in conversation.messages] == ["user", "assistant", "tool", "assistant"]
    assert conversation.messages[1].tool_calls == (
        ToolCall("book", {"patient": "P-17", "day": "monday"}),
        ToolCall("cancel", {"id": "A-3"}),
    )


@pytest.mark.parametrize(
    ("turn", "message"),
    [
        ({"tool_calls": [{"function": {"name": "book", "arguments": "{day: monday}"}}]}, "'arguments' is not JSON"),
        ({"tool_calls": [{"function": {"name": "book", "arguments": '"{}"'}}]}, "JSON encoded twice"),
        ({"tool_calls": [{"function": {"name": "book", "arguments": "[1]"}}]}, "must be a JSON object"),
        ({"tool_calls": [{"function": {"arguments": "{}"}}]}, "needs the function's 'name'"),
        ({"content": ""}, "an assistant answer is empty"),
    ],
)
def test_bad_calls_are_reported_at_their_line_with_the_fix(tmp_path, turn, message):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None} | turn]}
    parsed = parse_file(write_records(tmp_path / "d.jsonl", [good, bad]))
    assert len(parsed.problems.items) == 1
    line, found = parsed.problems.items[0]
    assert line == 2 and message in found


def test_reasoning_on_a_user_turn_is_refused(tmp_path):
    bad = {"messages": [{"role": "user", "content": "q", "reasoning": "x"}, {"role": "assistant", "content": "a"}]}
    (item,) = parse_file(write_records(tmp_path / "d.jsonl", [bad])).problems.items
    assert "a user turn holds 'reasoning'; only assistant turns do" in item[1]


def test_the_reference_of_a_call_is_its_written_form():
    assert BOOKING.reference == "Done."
    asked = Conversation(messages=BOOKING.messages[:3], tools=(BOOK,))
    assert asked.reference == CALL_TEXT and asked.uses_tools


# --- template and masks ------------------------------------------------------------------------------------------


def test_default_template_gets_a_tools_block_and_renders_calls_and_results():
    tokenizer = default_tokenizer()
    assert tokenizer.chat_template == TOOLS_PREAMBLE + DEFAULT_CHAT_TEMPLATE
    assert tool_parser(tokenizer) == "hermes"
    tools_block = f"{TOOLS_INTRO}\n{json.dumps(BOOK)}{TOOLS_OUTRO}"
    assert render(tokenizer, BOOKING.messages, False, BOOKING.tools) == (
        f"<s>Be brief.\n\n{tools_block}\n\n### User:\nBook P-17 on Monday.\n\n### Assistant:\n{CALL_TEXT}</s>"
        "\n\n### User:\n<tool_response>\nbooked\n</tool_response>"
        "\n\n### Assistant:\n<think>\nThe slot is free.\n</think>\n\nDone.</s>"
    )
    # Without tool data the template renders exactly as before.
    plain = (Message("user", "hi"), Message("assistant", "hello"))
    assert render(tokenizer, plain, False) == "<s>### User:\nhi\n\n### Assistant:\nhello</s>"


@pytest.mark.parametrize("reasoning", ["learn", "context"])
def test_masks_fall_exactly_on_calls_answers_and_ends(reasoning):
    tokenizer = default_tokenizer()
    example = tokenize_conversation(tokenizer, BOOKING, reasoning=reasoning)
    tools_block = f"{TOOLS_INTRO}\n{json.dumps(BOOK)}{TOOLS_OUTRO}"
    think = "<think>\nThe slot is free.\n</think>\n\n"
    pieces = [
        (f"<s>Be brief.\n\n{tools_block}\n\n### User:\nBook P-17 on Monday.\n\n### Assistant:\n", 0),
        (f"{CALL_TEXT}</s>", 1),
        ("\n\n### User:\n<tool_response>\nbooked\n</tool_response>\n\n### Assistant:\n", 0),
        *([(think + "Done.</s>", 1)] if reasoning == "learn" else [(think, 0), ("Done.</s>", 1)]),
    ]
    assert example.input_ids == [t for text, _ in pieces for t in ids(tokenizer, text)]
    assert example.loss_mask == [learned for text, learned in pieces for _ in ids(tokenizer, text)]
    learned = "".join(text for text, is_learned in learned_runs(tokenizer, example) if is_learned)
    assert learned == CALL_TEXT + "</s>" + ("" if reasoning == "context" else think) + "Done.</s>"


def test_the_inference_prompt_with_tools_is_the_training_prefix():
    tokenizer = default_tokenizer()
    example = tokenize_conversation(tokenizer, BOOKING)
    prefix = prompt_ids(tokenizer, BOOKING.messages[:2], BOOKING.tools)
    assert example.input_ids[: len(prefix)] == prefix
    assert example.loss_mask[len(prefix) - 1] == 0 and example.loss_mask[len(prefix)] == 1


NATIVE = (
    "{%- if tools %}<|system|>{% for t in tools %}{{ t | tojson }}{% endfor %}<|end|>{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}<|assistant|>{{ m.content }}"
    "{%- for c in m.tool_calls or [] %}CALL_{%- endfor %}{{ eos_token }}"
    "{%- else %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endif %}"
    "{%- endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
HERMES_CALLS = "<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</tool_call>"
MISTRAL_CALLS = (
    "{% if loop.first %}[TOOL_CALLS][{% endif %}"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}"
    "{% if loop.last %}]{% else %}, {% endif %}"
)


@pytest.mark.parametrize(("calls", "parser"), [(HERMES_CALLS, "hermes"), (MISTRAL_CALLS, "mistral")])
def test_a_template_that_renders_tools_is_kept_with_its_own_parser(calls, parser):
    template = NATIVE.replace("CALL_", calls)
    tokenizer = build_tokenizer()
    assert use_chat_template(tokenizer, template, tools=True) == template
    assert tool_parser(tokenizer) == parser


def test_a_template_that_drops_calls_gets_the_tools_block_and_one_that_cannot_take_it_is_refused():
    dropping = NATIVE.replace("CALL_", "")
    tokenizer = build_tokenizer()
    assert use_chat_template(tokenizer, dropping, tools=True) == TOOLS_PREAMBLE + dropping
    no_system = "{% if messages[0].role == 'system' %}{{ raise_exception('no system role') }}{% endif %}" + dropping
    with pytest.raises(TunesmithError, match="cannot render tool calls and tool results"):
        use_chat_template(build_tokenizer(), no_system, tools=True)


def test_a_run_whose_template_hides_the_calls_stops_before_training():
    tokenizer = build_tokenizer()
    use_chat_template(tokenizer, None)  # the plain template, given tool data without the tools block
    with pytest.raises(TunesmithError, match=r"line 7: the tool call\(s\) book are not among the learned tokens"):
        tokenize_all(tokenizer, [Conversation(messages=BOOKING.messages[:3], line=7, tools=BOOKING.tools)], 512)


# --- the parser ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("calls_form", [None, HERMES_CALLS, MISTRAL_CALLS])
def test_render_parse_render_is_stable_for_parallel_calls_and_reasoning(calls_form):
    """With tunesmith's tools template (None) and with templates that render calls themselves, each read back by
    the parser the probe found for it."""
    tokenizer = build_tokenizer()
    use_chat_template(tokenizer, None if calls_form is None else NATIVE.replace("CALL_", calls_form), tools=True)
    parse = PARSERS[str(tool_parser(tokenizer))]
    calls = (ToolCall("book", {"patient": "P-17", "day": "monday", "slot": 9}), ToolCall("cancel", {"id": "A-3"}))
    asked = (Message("user", "Move P-17 to Monday 9."),)
    for answer in (
        Message("assistant", "On it.", calls, reasoning="Cancel first."),
        Message("assistant", "", calls),
        Message("assistant", "No call needed."),
    ):
        prompt = render(tokenizer, asked, True, (BOOK, CANCEL))
        first = render(tokenizer, (*asked, answer), False, (BOOK, CANCEL))
        parsed = parse(first[len(prompt) :].removesuffix(tokenizer.eos_token))
        assert (parsed.content, parsed.tool_calls) == (answer.content, answer.tool_calls)
        # tunesmith's template renders reasoning; the test's own templates leave it out, as many do
        assert parsed.reasoning == (answer.reasoning if calls_form is None else None)
        again = Message("assistant", parsed.content, parsed.tool_calls, reasoning=parsed.reasoning)
        assert render(tokenizer, (*asked, again), False, (BOOK, CANCEL)) == first


def test_each_parser_reads_its_template_family_and_botched_calls_are_kept():
    assert parse_any('[TOOL_CALLS][{"name": "cancel", "arguments": {"id": "A-3"}}]').tool_calls == (
        ToolCall("cancel", {"id": "A-3"}),
    )
    assert parse_any('<|python_tag|>{"name": "cancel", "parameters": {"id": "A-3"}}').tool_calls == (
        ToolCall("cancel", {"id": "A-3"}),
    )
    botched = parse_any('Sure.\n<tool_call>\n{"name": "cancel", "arguments": {"id": }\n</tool_call>')
    assert botched.content == "Sure." and botched.tool_calls == () and len(botched.malformed) == 1
    assert parse_any("Plain answer.") == parse_hermes("Plain answer.")
    # The JSON answer of a JSON task is no call, botched or not; after Llama's <|python_tag|> anything is one.
    assert parse_any('{"colour": "red", "name": "x"}') == ParsedTurn('{"colour": "red", "name": "x"}')
    assert parse_any('<|python_tag|>{"name": "cancel", "parameters": {"id": ').malformed


# --- data check ------------------------------------------------------------------------------------------------


def row(*turns, tools=(BOOK, CANCEL), ask="Please book P-17 for Monday morning."):
    messages = [{"role": "user", "content": ask}, *turns]
    return {"messages": messages, **({"tools": list(tools)} if tools else {})}


def call(name, arguments, call_id="c1"):
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    ]}  # fmt: skip


GOOD = {"patient": "P-17", "day": "monday"}
RESULT = {"role": "tool", "tool_call_id": "c1", "content": "booked"}
ANSWER = {"role": "assistant", "content": "Booked for Monday."}


def test_data_check_names_every_tool_finding_with_its_line_and_fix(tmp_path):
    records = [
        row(call("book", GOOD), RESULT, ANSWER),  # 1 clean
        row(call("refill", {"drug": "x"})),  # 2 unknown tool
        row(call("book", {"patient": "P-17"})),  # 3 missing required
        row(call("book", GOOD | {"room": 4})),  # 4 unexpected argument
        row(call("book", GOOD | {"slot": "9"})),  # 5 wrong type
        row(call("book", {"patient": "P-17", "day": "sunday"})),  # 6 outside the enum
        row(call("book", "{patient: P-17}")),  # 7 arguments not JSON
        row(call("book", GOOD), RESULT | {"tool_call_id": "zz"}, ANSWER),  # 8 result for another call
        row({"role": "tool", "content": "stray"}, ANSWER),  # 9 result after no call
        row(call("book", GOOD), {"role": "user", "content": "And?"}, ANSWER),  # 10 call never answered
        row(call("book", GOOD), tools=()),  # 11 a call with no tools listed
    ]
    report = check_data(write_records(tmp_path / "d.jsonl", records))
    found = {(e["line"], e.get("code")) for e in report.errors}
    assert {
        (2, "unknown_tool"),
        (3, "missing_argument"),
        (4, "unexpected_argument"),
        (5, "wrong_type"),
        (6, "wrong_type"),
        (8, "result_without_call"),
        (9, "result_without_call"),
    } <= found
    assert not {line for line, _ in found} & {1, 10, 11}
    messages = {e["line"]: e["message"] for e in report.errors}
    assert "calls 'refill', which is not in the row's tools (book, cancel); fix the name" in messages[2]
    assert "required argument 'day' is missing" in messages[3]
    assert "argument 'room' is not a parameter (parameters: day, patient, slot)" in messages[4]
    assert "argument 'slot' should be integer, got \"9\"" in messages[5]
    assert "'arguments' is not JSON" in messages[7] and "write them as a JSON object" in messages[7]
    assert "call id 'zz', which no call of messages[1] has; fix its tool_call_id" in messages[8]
    warnings = {w["code"]: w["message"] for w in report.warnings}
    assert "2 tool call(s) in 2 row(s)" in warnings["unanswered_calls"]
    assert "(lines 8, 10)" in warnings["unanswered_calls"]
    assert "(lines 11)" in warnings["calls_without_tools"]
    assert report.tools == {
        "rows_with_tools": 9,
        "tool_turns": 9,
        "tool_calls": 9,
        "parallel_turns": 0,
        "tool_results": 3,
        "no_call_answers": 4,
        "unanswered_calls": 2,
        "reasoning_turns": 0,
        "rows_without_tools": 1,
        "calls_without_tools": 1,
    }


def test_parallel_calls_are_counted_and_each_checked(tmp_path):
    parallel = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "a", "function": {"name": "book", "arguments": GOOD}},
        {"id": "b", "function": {"name": "cancel", "arguments": {"id": 3}}},
    ]}  # fmt: skip
    results = [RESULT | {"tool_call_id": "b"}, RESULT | {"tool_call_id": "a"}]
    report = check_data(write_records(tmp_path / "d.jsonl", [row(parallel, *results, ANSWER)]))
    assert report.tools["parallel_turns"] == 1 and report.tools["tool_calls"] == 2
    assert [e["code"] for e in report.errors if e.get("code")] == ["wrong_type"]
    assert "messages[1].tool_calls[1]: cancel: argument 'id' should be string, got 3" in report.errors[-1]["message"]


def test_duplicates_and_leakage_see_the_calls(tmp_path):
    first = [row(call("book", GOOD | {"slot": slot})) for slot in range(10)]
    report = check_data(write_records(tmp_path / "d.jsonl", first))
    assert report.exact_duplicates == [] and report.near_duplicates == []
    report = check_data(write_records(tmp_path / "e.jsonl", first + first[:1]), against=tmp_path / "d.jsonl")
    assert report.exact_duplicates == [[1, 11]]
    assert report.leakage["exact"]["count"] == 11


def test_show_masks_prints_what_is_learned(tmp_path, tiny_model_dir, capsys):
    path = write_records(tmp_path / "d.jsonl", [row(call("book", GOOD), RESULT, ANSWER)] * 10)
    assert main(["data", "check", str(path), "--model", str(tiny_model_dir), "--show-masks", "1", "--json"]) == 0
    (shown,) = json.loads(capsys.readouterr().out)["masks"]
    learned = "".join(text for text, is_learned in shown["pieces"] if is_learned)
    assert shown["line"] == 1
    assert learned == (
        '<tool_call>\n{"name": "book", "arguments": {"patient": "P-17", "day": "monday"}}\n</tool_call></s>'
        "Booked for Monday.</s>"
    )
    assert main(["data", "check", str(path), "--show-masks", "1"]) == 2


# --- metrics ---------------------------------------------------------------------------------------------------

REFERENCE = written_turn("", (ToolCall("book", {"patient": "P-17", "day": "Monday", "dose": 2.5}),))


def predicted(*calls):
    return written_turn("", tuple(ToolCall(name, arguments) for name, arguments in calls))


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        # name, args (BFCL AST), exact
        (REFERENCE, (1, 1, 1)),
        (predicted(("book", {"patient": "p17", "day": "monday", "dose": 2.5})), (1, 1, 0)),  # normalised strings
        (predicted(("book", {"day": "Monday", "patient": "P-17", "dose": 2.5})), (1, 1, 1)),  # argument order
        (predicted(("book", {"patient": "P-17", "day": "Monday"})), (1, 0, 0)),  # a required argument missing
        (predicted(("book", {"patient": "P-17", "day": "Monday", "dose": 2.5, "x": 1})), (1, 0, 0)),  # unexpected
        (predicted(("book", {"patient": "P-17", "day": "Monday", "dose": "2.5"})), (1, 0, 0)),  # wrong type
        (predicted(("book", {"patient": "P-17", "day": "Tuesday", "dose": 2.5})), (1, 0, 0)),  # wrong value
        (predicted(("cancel", {"patient": "P-17", "day": "Monday", "dose": 2.5})), (0, 0, 0)),  # wrong function
        ("I booked it.", (0, 0, 0)),  # no call where one is needed
    ],
)
def test_call_metrics_follow_bfcl_rules(prediction, expected):
    got = tuple(
        metrics.PER_ITEM[name](prediction, REFERENCE)
        for name in ("tool_name_accuracy", "tool_args_match", "tool_call_exact")
    )
    assert got == expected


def test_numbers_follow_bfcl_types_and_parallel_calls_match_in_any_order():
    want = predicted(("dose", {"mg": 2.0, "times": 3}), ("cancel", {"id": "A-3"}))
    swapped = predicted(("cancel", {"id": "A-3"}), ("dose", {"mg": 2, "times": 3}))
    assert metrics.tool_args_match(swapped, want) == 1.0  # an integer stands for a float
    assert metrics.tool_call_exact(swapped, want) == 1.0  # 2 == 2.0 in JSON
    cancel = ("cancel", {"id": "A-3"})
    assert metrics.tool_args_match(predicted(("dose", {"mg": 2.0, "times": 3.0}), cancel), want) == 0  # not an int
    assert metrics.tool_args_match(predicted(("dose", {"mg": 2.0, "times": True}), cancel), want) == 0  # a bool
    assert metrics.tool_args_match(predicted(("cancel", {"id": "A-3"})), want) == 0.0  # one of two calls
    assert metrics.tool_args_match(predicted(("cancel", {"id": "A-3"}), ("cancel", {"id": "A-3"})), want) == 0.0
    assert metrics.tool_args_match(predicted(("l", {"x": ["a", "b"]})), predicted(("l", {"x": ["b", "a"]}))) == 0


def test_no_call_accuracy_and_parse_rate():
    botched = '<tool_call>\n{"name": "book", "arguments": {"day": }\n</tool_call>'
    assert metrics.no_call_accuracy("No appointment is needed.", "You are welcome.") == 1.0
    assert metrics.no_call_accuracy(REFERENCE, "You are welcome.") == 0.0
    assert metrics.no_call_accuracy("You are welcome.", REFERENCE) == 0.0
    assert metrics.no_call_accuracy(botched, REFERENCE) == 1.0  # it tried to call
    assert metrics.tool_args_match("You are welcome.", "Glad to help.") == 1.0  # no call on either side agrees
    assert metrics.tool_args_match(botched, "Glad to help.") == 0.0
    assert (metrics.tool_call_parse_rate(botched, REFERENCE), metrics.tool_call_parse_rate(REFERENCE, "")) == (0, 1)


def test_tool_metrics_are_config_metrics_and_grpo_rewards():
    config = RunConfig.model_validate({"eval": {"metrics": ["tool_args_match", "no_call_accuracy"]}})
    assert config.eval.metrics == ["tool_args_match", "no_call_accuracy"]
    assert RunConfig.model_validate({"data": {"reasoning": "context"}}).data.reasoning == "context"
    rewards = build_rewards(
        [RewardConfig(metric="tool_args_match"), RewardConfig(metric="tool_call_parse_rate")], None, 64
    )
    samples = [Sample("q", text, REFERENCE, {}, 10, False) for text in (REFERENCE, "no call")]
    assert score(rewards, samples).values == {"tool_args_match": [1.0, 0.0], "tool_call_parse_rate": [1.0, 1.0]}
    assert [r.needs_reference for r in rewards] == [True, False]
    assert metrics.score(["tool_name_accuracy"], [REFERENCE], [REFERENCE]) == {"tool_name_accuracy": [1.0]}
    assert {"tool_args_match", "tool_call_exact"} <= metrics.BINARY


def test_segments_of_a_plain_conversation_are_unchanged():
    tokenizer = build_tokenizer()
    use_chat_template(tokenizer, None)
    plain = (Message("user", "hi"), Message("assistant", "hello"))
    assert segments(tokenizer, plain) == [("<s>### User:\nhi\n\n### Assistant:\n", False), ("hello</s>", True)]


def clinic_rows(n: int) -> list[dict]:
    """Booking requests answered by a call (half of them with the result and a final answer), every fourth a
    thank-you that needs no call."""
    rows = []
    for i in range(n):
        day = ("monday", "tuesday")[i % 2]
        if i % 4 == 3:
            thanks = f"Thanks a lot for booking visit {i}."
            rows.append(row({"role": "assistant", "content": f"You are welcome, see you on {day}."}, ask=thanks))
            continue
        turns = [call("book", {"patient": f"P-{i}", "day": day})]
        if i % 2 == 0:
            turns += [RESULT, {"role": "assistant", "content": f"Booked P-{i} for {day}."}]
        rows.append(row(*turns, ask=f"Book patient P-{i} on {day}."))
    return rows


def test_a_run_on_tool_data_trains_with_the_tools_template_and_scores_the_calls(tmp_path, tiny_model_dir):
    from tunesmith.evaluate.compare import eval_run

    from .test_cli import train_args

    data, out = write_records(tmp_path / "clinic.jsonl", clinic_rows(40)), tmp_path / "runs" / "clinic"
    extra = ["--method", "lora", "--max-steps", "2", "--train.batch_size", "4", "--test-fraction", "0.25"]
    extra += ["--set", "eval.max_new_tokens=8", "--set", "eval.metrics=tool_args_match,no_call_accuracy"]
    assert main(train_args(tiny_model_dir, data, out, *extra)) == 0
    assert (out / "chat_template.jinja").read_text().startswith(TOOLS_PREAMBLE)
    written = [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert all(r["tools"] == [BOOK, CANCEL] for r in written)
    calls = [m["tool_calls"][0]["function"] for r in written for m in r["messages"] if "tool_calls" in m]
    assert calls and all(isinstance(c["arguments"], dict) for c in calls)  # never encoded on the way
    summary = eval_run(out)
    assert set(summary.metrics) == {"tool_args_match", "no_call_accuracy"}
    assert all(0.0 <= value <= 1.0 for value in summary.metrics.values()) and summary.loss is not None


def test_eval_and_rl_prompts_are_rendered_with_their_rows_tools():
    from tunesmith.config import RlConfig
    from tunesmith.evaluate.generate import Asked
    from tunesmith.objectives.rl import tokenize_prompts

    tokenizer = default_tokenizer()
    asked_prompt = BOOKING.messages[:2]
    with_tools = prompt_ids(tokenizer, asked_prompt, BOOKING.tools)
    asked = Asked(tokenizer, [asked_prompt, asked_prompt], 8, tools=[BOOKING.tools, ()])
    assert asked.requests[0].prompt_ids == with_tools
    assert asked.requests[1].prompt_ids == prompt_ids(tokenizer, asked_prompt) != with_tools
    row_prompt = Conversation(messages=asked_prompt, tools=BOOKING.tools)
    (rl_prompt,), _ = tokenize_prompts(tokenizer, [row_prompt], 1024, RlConfig())
    assert rl_prompt.ids == with_tools


def test_a_few_shot_example_keeps_its_calls():
    from tunesmith.evaluate.baselines import few_shot_prompt

    shot = Conversation(messages=BOOKING.messages[1:3], tools=BOOKING.tools)
    question = Conversation(messages=(Message("user", "Book P-18 on Tuesday."),), tools=BOOKING.tools)
    prompt = few_shot_prompt(question, [shot])
    assert prompt == (BOOKING.messages[1], BOOKING.messages[2], question.messages[0])
    assert prompt[1].tool_calls == (BOOK_CALL,)


# A ChatML template in Qwen 2.5's shape: the tools block in the system turn, calls as <tool_call> JSON, results as
# user turns of <tool_response> blocks.
QWEN_SHAPED = (
    (
        "{%- if tools %}{{- '<|im_start|>system\\n' }}"
        "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are helpful.' }}"
        "{%- endif %}"
        "{{- '\\n\\n' + TOOLS_INTRO }}{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
        "{{- TOOLS_OUTRO + '<|im_end|>\\n' }}"
        "{%- elif messages[0]['role'] == 'system' %}"
        "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
        "{%- endif %}"
        "{%- for message in messages %}"
        "{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}"
        "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
        "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role }}"
        "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
        "{%- for tool_call in message.tool_calls %}{%- set tool_call = tool_call.function %}"
        '{{- \'\\n<tool_call>\\n{"name": "\' }}{{- tool_call.name }}{{- \'", "arguments": \' }}'
        "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
        "{%- elif message.role == 'tool' %}"
        "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
        "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
        "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
        "{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    .replace("TOOLS_INTRO", json.dumps(TOOLS_INTRO))
    .replace("TOOLS_OUTRO", json.dumps(TOOLS_OUTRO))
)


def test_a_model_template_that_renders_tools_is_used_as_is_and_its_calls_are_learned():
    tokenizer = build_tokenizer()
    assert use_chat_template(tokenizer, QWEN_SHAPED, tools=True) == QWEN_SHAPED
    assert tool_parser(tokenizer) == "hermes"
    example = tokenize_conversation(tokenizer, BOOKING)
    runs = learned_runs(tokenizer, example)
    learned = "".join(text for text, is_learned in runs if is_learned)
    assert learned == f"{CALL_TEXT}<|im_end|>\n" + "Done.<|im_end|>\n</s>"  # its template drops the reasoning
    shown = "".join(text for text, _ in runs)
    assert "<tool_response>\nbooked\n</tool_response>" in shown and "Book an appointment." in shown


# A template in Gemma 3's shape: no tools, the system text opening the first user turn, roles that must alternate.
GEMMA_SHAPED = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set prefix = messages[0]['content'] + '\\n\\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set prefix = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (prefix if loop.first else '') + message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


def test_a_model_template_without_tools_is_given_them():
    tokenizer = build_tokenizer()
    assert use_chat_template(tokenizer, GEMMA_SHAPED, tools=True) == TOOLS_PREAMBLE + GEMMA_SHAPED
    tools_block = f"{TOOLS_INTRO}\n{json.dumps(BOOK)}{TOOLS_OUTRO}"
    assert render(tokenizer, BOOKING.messages, False, BOOKING.tools) == (
        f"<s><start_of_turn>user\nBe brief.\n\n{tools_block}\n\nBook P-17 on Monday.<end_of_turn>\n"
        f"<start_of_turn>model\n{CALL_TEXT}<end_of_turn>\n"
        "<start_of_turn>user\n<tool_response>\nbooked\n</tool_response><end_of_turn>\n"
        "<start_of_turn>model\n<think>\nThe slot is free.\n</think>\n\nDone.<end_of_turn>\n"
    )
    example = tokenize_conversation(tokenizer, BOOKING, reasoning="context")
    learned = "".join(text for text, is_learned in learned_runs(tokenizer, example) if is_learned)
    assert learned == f"{CALL_TEXT}<end_of_turn>\nDone.<end_of_turn>\n</s>"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>\nweigh it\nup\n</think>\n\nThe answer.", ("weigh it\nup", "The answer.")),
        ("  <think>\ncut off mid", ("cut off mid", "")),
        ("<think>\n\n</think>\n\nNothing to think.", ("", "Nothing to think.")),
        ("<think>x</think>y", ("x", "y")),
        ("<thinking> is not the tag", (None, "<thinking> is not the tag")),
        (" plain answer", (None, " plain answer")),
        ("", (None, "")),
    ],
)
def test_reasoning_splits_off_the_same_whole_and_streamed_in_any_pieces(text, expected):
    assert split_reasoning(text) == expected
    for size in (1, 2, 3, 7):
        splitter, reasoning, answer = ReasoningSplitter(), "", ""
        for start in range(0, len(text), size):
            more, rest = splitter.feed(text[start : start + size])
            assert "</think" not in more and (expected[0] is None or "think>" not in rest)  # no tag handed out
            reasoning, answer = reasoning + more, answer + rest
        more, rest = splitter.finish()
        assert ((reasoning + more) if splitter.reasoned else None, answer + rest) == expected


def test_the_call_parser_reads_reasoning_as_the_stream_does():
    """One reader of <think> blocks: serve's stream and the call parser agree, an unclosed block included (a model
    cut off while thinking made no call, whatever its thoughts contain)."""
    call = '<tool_call>\n{"name": "book", "arguments": {"day": "Monday"}}\n</tool_call>'
    cut_off = f"<think>\nmaybe {call}"
    assert parse_hermes(cut_off) == ParsedTurn("", (), f"maybe {call}")
    assert split_reasoning(cut_off) == (f"maybe {call}", "")
    whole = f"<think>\nbook it\n</think>\n\n{call}"
    parsed = parse_hermes(whole)
    assert parsed.reasoning == "book it" and [c.name for c in parsed.tool_calls] == ["book"] and parsed.content == ""


def test_a_template_renders_reasoning_where_it_writes_a_think_block():
    tokenizer = build_tokenizer()
    assert not renders_reasoning(tokenizer)  # the default template drops reasoning_content
    tokenizer.chat_template = with_tools_block(tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE)
    assert renders_reasoning(tokenizer)
