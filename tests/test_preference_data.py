"""Preference data (issue 18): pairs and KTO rows read, checked and split; served feedback exported as pairs."""

import json
import random

import pytest

from tunesmith.cli import main
from tunesmith.data.check import CheckOptions, check_data
from tunesmith.data.formats import Conversation, Message, parse_file, read_conversations, write_jsonl
from tunesmith.data.split import split_conversations, split_file
from tunesmith.data.tokenize import use_chat_template
from tunesmith.deploy.monitor import export_preferences
from tunesmith.deploy.requestlog import RequestLog
from tunesmith.errors import TunesmithError

from .conftest import build_tokenizer
from .conftest import write_jsonl as write_records

ANIMALS = ["otter", "heron", "badger", "lynx", "falcon", "beaver", "marten", "ibis", "gecko", "tapir"]
PLACES = ["rivers", "forests", "deserts", "mountains", "cities", "islands", "wetlands", "tundra"]
WORDS = ["quick", "calm", "rare", "tiny", "wild", "agile", "shy", "bold", "keen", "sleek"]
PROMPT = (Message("user", "What is 2+2?"),)


def clean_pairs(n: int = 40, seed: int = 0) -> list[dict]:
    """Varied pairs; the chosen answer is the longer one in half of them."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        animal, place = ANIMALS[i % 10], PLACES[rng.randrange(8)]
        good = f"The {animal} of the {place} is {' and '.join(rng.sample(WORDS, 4))}; note {i * 7}."
        bad = f"No idea about {animal}s, sorry ({i})."
        long_bad = f"{bad} Maybe ask someone who has seen {place} or read about them in a book {i * 3}."
        records.append(
            {
                "prompt": f"Please describe the {animal} that lives near {place}, item {i}.",
                "chosen": good,
                "rejected": bad if i % 2 else long_bad,
            }
        )
    return records


def kto_rows(n: int = 40, desirable_every: int = 2) -> list[dict]:
    return [
        {
            "prompt": p["prompt"],
            "completion": p["chosen"] if i % desirable_every == 0 else p["rejected"],
            "label": i % desirable_every == 0,
        }
        for i, p in enumerate(clean_pairs(n))
    ]


def codes(report):
    return {w["code"] for w in report.warnings}


def _tokenizer():
    tokenizer = build_tokenizer()
    use_chat_template(tokenizer, None)
    return tokenizer


# Reading


@pytest.mark.parametrize(
    "record",
    [
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
        {
            "prompt": [{"role": "user", "content": "What is 2+2?"}],
            "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "5"}],
        },
        {
            "chosen": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
            "rejected": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "5"}],
        },
    ],
    ids=["strings", "message-lists", "shared-prefix"],
)
def test_each_preference_layout_reads_as_a_pair(tmp_path, record):
    conversations, fmt = read_conversations(write_records(tmp_path / "d.jsonl", [record, record]))
    assert fmt == "preference"
    pair = conversations[0]
    assert pair.kind == "pair" and pair.label is None
    assert pair.messages == (*PROMPT, Message("assistant", "4")) and pair.rejected == "5"
    # A pair reads as its chosen SFT example everywhere.
    assert pair.prompt_messages == PROMPT and pair.reference == "4"
    assert pair.rejected_messages == (*PROMPT, Message("assistant", "5"))


def test_a_shared_multi_turn_prefix_with_a_system_turn_is_the_prompt(tmp_path):
    prefix = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "2+2?"},
    ]
    record = {
        "chosen": [*prefix, {"role": "assistant", "content": "4"}],
        "rejected": [*prefix, {"role": "assistant", "content": "22"}],
    }
    (pair,), _ = read_conversations(write_records(tmp_path / "d.jsonl", [record]))
    assert [m.role for m in pair.prompt_messages] == ["system", "user", "assistant", "user"]
    assert (pair.reference, pair.rejected) == ("4", "22")


def test_kto_rows_are_detected_before_prompt_completion(tmp_path):
    rows = [
        {"prompt": "What is 2+2?", "completion": "4", "label": True},
        {"prompt": [{"role": "user", "content": "What is 2+2?"}], "completion": "5", "label": False},
    ]
    conversations, fmt = read_conversations(write_records(tmp_path / "d.jsonl", rows))
    assert fmt == "kto"
    assert [(c.kind, c.label, c.reference) for c in conversations] == [("kto", True, "4"), ("kto", False, "5")]
    assert conversations[1].prompt_messages == PROMPT


def test_kto_in_csv_takes_the_text_true_and_false(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion,label\n"What is 2+2?",4,true\n"What is 2+2?",5,FALSE\n')
    conversations, fmt = read_conversations(path)
    assert fmt == "kto" and [c.label for c in conversations] == [True, False]


def test_a_label_that_is_not_true_or_false_names_its_line_and_the_format(tmp_path):
    rows = [
        {"prompt": "a", "completion": "b", "label": True},
        {"prompt": "a", "completion": "c", "label": "yes"},
        {"prompt": "a", "completion": "d", "label": 1},
        {"prompt": "a", "completion": "e"},
    ]
    with pytest.raises(TunesmithError) as caught:
        read_conversations(write_records(tmp_path / "d.jsonl", rows))
    message = str(caught.value)
    assert "3 bad record(s) (read as format 'kto', detected from the fields of line 1)" in message
    assert "d.jsonl:2: 'label' must be true" in message and "'yes'" in message
    assert "d.jsonl:3: 'label' must be true" in message and "d.jsonl:4: 'label' must be true" in message


def test_sft_data_with_a_class_label_is_told_how_to_read_it_as_sft(tmp_path):
    rows = [{"prompt": f"review {i}", "completion": "positive", "label": "positive"} for i in range(3)]
    path = write_records(tmp_path / "d.jsonl", rows)
    with pytest.raises(TunesmithError, match="set the format to prompt_completion"):
        read_conversations(path)
    conversations, fmt = read_conversations(path, "prompt_completion")
    assert fmt == "prompt_completion" and all(c.kind == "sft" for c in conversations)


def test_kto_rows_never_pass_as_prompt_completion_rows(tmp_path):
    rows = [
        {"prompt": "a", "completion": "b"},
        {"prompt": "c", "completion": "d", "label": False},
        {"prompt": "e", "completion": "f"},
    ]
    parsed = parse_file(write_records(tmp_path / "d.jsonl", rows))
    assert parsed.format == "prompt_completion"
    assert [line for line, _ in parsed.problems.items] == [2]
    assert "like a KTO row" in parsed.problems.items[0][1]
    assert [c.line for c in parsed.conversations] == [1, 3]


def test_every_bad_preference_line_is_reported(tmp_path):
    same_prefix = [{"role": "user", "content": "hi"}]
    rows = [
        {"prompt": "ok", "chosen": "yes", "rejected": "no"},
        {"prompt": "ok", "chosen": "yes"},  # 2: no rejected
        {"prompt": "ok", "chosen": "", "rejected": "no"},  # 3: empty answer
        {"chosen": "yes", "rejected": "no"},  # 4: strings need a prompt
        {  # 5: prompts differ
            "chosen": [*same_prefix, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "bye"}, {"role": "assistant", "content": "b"}],
        },
        {"chosen": [*same_prefix, {"role": "user", "content": "x"}], "rejected": same_prefix},  # 6: no answer
        {"prompt": "ok", "chosen": [{"role": "user", "content": "x"}], "rejected": "no"},  # 7: not an answer
        {"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},  # 8: prompt is an answer
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},  # 9: other format
        {"prompt": "ok", "chosen": "yes", "rejected": 3},  # 10: not text
    ]
    parsed = parse_file(write_records(tmp_path / "d.jsonl", rows))
    assert parsed.format == "preference" and len(parsed.conversations) == 1
    messages = dict(parsed.problems.items)
    assert sorted(messages) == list(range(2, 11))
    assert "missing field 'rejected'" in messages[2]
    assert "'chosen' is empty" in messages[3]
    assert "without a 'prompt'" in messages[4]
    assert "differ at turn 0" in messages[5]
    assert "must end with an assistant turn" in messages[6]
    assert "one assistant turn" in messages[7]
    assert "ends with an assistant turn" in messages[8]
    assert "without a 'prompt'" in messages[9]


@pytest.mark.parametrize("rows", [clean_pairs(6), kto_rows(6)], ids=["pairs", "kto"])
def test_split_files_read_back_identically(tmp_path, rows):
    rows = [*rows, {**rows[0], "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "q"}]}]
    conversations, fmt = read_conversations(write_records(tmp_path / "d.jsonl", rows))
    write_jsonl(tmp_path / "out.jsonl", conversations)
    again, fmt_again = read_conversations(tmp_path / "out.jsonl")
    assert fmt_again == fmt
    strip = lambda cs: [(c.messages, c.rejected, c.label, c.kind) for c in cs]  # noqa: E731
    assert strip(again) == strip(conversations)
    record = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])
    assert set(record) == (
        {"prompt", "chosen", "rejected"} if fmt == "preference" else {"prompt", "completion", "label"}
    )
    assert isinstance(record["prompt"], list)


# Checking


def test_clean_pairs_have_no_errors_and_no_preference_warnings(tmp_path):
    report = check_data(write_records(tmp_path / "d.jsonl", clean_pairs()), tokenizer=_tokenizer())
    assert report.errors == [] and report.format == "preference" and report.kind == "pair"
    assert codes(report) == {"small_dataset"}
    assert report.preference["chosen_longer_share"] == 0.5 and report.preference["contradicting"] == []
    assert report.token_lengths["truncated"] == 0


def test_pairs_sharing_a_prompt_are_neither_conflicts_nor_duplicates(tmp_path):
    rows = clean_pairs(20)
    rows += [{**row, "rejected": f"A different poor answer, number {i}."} for i, row in enumerate(rows[:10])]
    report = check_data(write_records(tmp_path / "d.jsonl", rows))
    assert report.errors == [] and codes(report) == {"small_dataset"}
    assert report.conflicts == [] and report.exact_duplicates == []


def test_identical_near_identical_duplicate_and_contradicting_pairs(tmp_path):
    rows = clean_pairs(20)
    rows[3] = {**rows[3], "rejected": rows[3]["chosen"]}
    rows[4] = {**rows[4], "rejected": rows[4]["chosen"].upper()}
    rows[5] = {**rows[5], "rejected": rows[5]["chosen"].rstrip(".") + "!"}
    rows.append(dict(rows[6]))  # line 21 duplicates line 7
    rows.append({**rows[8], "chosen": rows[8]["rejected"], "rejected": rows[8]["chosen"]})  # line 22 reverses 9
    report = check_data(write_records(tmp_path / "d.jsonl", rows))
    assert [(e["line"], e["code"]) for e in report.errors] == [(4, "identical_pair")]
    warnings = {w["code"]: w["message"] for w in report.warnings}
    assert "lines 5, 6" in warnings["near_identical_pairs"]
    assert "lines 7, 21" in warnings["duplicate_pairs"]
    assert "lines 9, 22" in warnings["contradicting_pairs"]
    assert report.preference["contradicting"] == [[9, 22]]
    assert "conflicts" not in warnings


def test_length_bias_is_measured_and_warned_above_the_threshold(tmp_path):
    rows = [{**row, "rejected": row["rejected"].split(",")[0] + "."} for row in clean_pairs(20)]
    report = check_data(write_records(tmp_path / "d.jsonl", rows))
    assert report.preference["chosen_longer_share"] == 1.0
    assert report.preference["mean_length_ratio"] > 1.5
    assert "length_bias" in codes(report) and "100% of pairs" in next(
        w["message"] for w in report.warnings if w["code"] == "length_bias"
    )
    relaxed = check_data(tmp_path / "d.jsonl", options=CheckOptions(length_bias_share=1.0))
    assert "length_bias" not in codes(relaxed)


def test_a_pair_cut_by_max_length_on_its_rejected_side_is_reported(tmp_path):
    rows = clean_pairs(12)
    rows[2] = {**rows[2], "rejected": "a long rambling answer " * 40}
    rows[5] = {**rows[5], "prompt": "a very long question " * 60}
    report = check_data(
        write_records(tmp_path / "d.jsonl", rows), tokenizer=_tokenizer(), options=CheckOptions(max_length=400)
    )
    warnings = {w["code"]: w["message"] for w in report.warnings}
    assert report.token_lengths["truncated"] == 2 and "lines 3, 6" in warnings["truncation"]
    assert "chosen or the rejected" in warnings["truncation"]
    assert "lines 6" in warnings["answer_lost"]


def test_kto_balance_and_contradicting_labels(tmp_path):
    balanced = check_data(write_records(tmp_path / "b.jsonl", kto_rows(20)))
    assert balanced.errors == [] and balanced.kind == "kto" and balanced.format == "kto"
    assert codes(balanced) == {"small_dataset"}
    assert balanced.preference["desirable"] == 10 and balanced.preference["undesirable"] == 10

    rows = kto_rows(20, desirable_every=20)  # one desirable row of 20
    rows.append({**rows[1], "label": True})  # line 21 labels line 2's answer the other way
    report = check_data(write_records(tmp_path / "d.jsonl", rows))
    warnings = {w["code"]: w["message"] for w in report.warnings}
    assert "only 2 of 21 rows (9.5%) are desirable, under 10%" in warnings["kto_imbalance"]
    assert "lines 2, 21" in warnings["contradicting_labels"] and report.preference["contradicting"] == [[2, 21]]
    assert "exact_duplicates" not in warnings
    skewed = check_data(write_records(tmp_path / "s.jsonl", kto_rows(20, desirable_every=20)))
    assert (
        "only 1 of 20 rows (5.0%) are desirable" in {w["code"]: w["message"] for w in skewed.warnings}["kto_imbalance"]
    )


def test_data_check_prints_the_format_and_the_pair_statistics(tmp_path, capsys):
    path = write_records(tmp_path / "d.jsonl", clean_pairs(20))
    assert main(["data", "check", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "20 preference pairs (format preference)" in printed
    assert "chosen longer than rejected in 50%" in printed and "mean length ratio" in printed


# Splitting


def test_split_keeps_every_pair_of_one_prompt_in_one_split(tmp_path):
    rows = []
    for i, row in enumerate(clean_pairs(30)):
        rows += [row, {**row, "rejected": f"Another poor answer about nothing, {i}."}]
    result = split_file(write_records(tmp_path / "d.jsonl", rows), tmp_path / "split", val=0.2, test=0.2)
    assert result.groups_kept_together == 30
    where = {}
    for name in ("train", "val", "test"):
        for line in (tmp_path / "split" / f"{name}.jsonl").read_text().splitlines():
            where.setdefault(json.loads(line)["prompt"], set()).add(name)
    assert len(where) == 30 and all(len(splits) == 1 for splits in where.values())
    assert result.counts["val"] > 0 and result.counts["test"] > 0
    again, fmt = read_conversations(tmp_path / "split" / "train.jsonl")
    assert fmt == "preference" and all(c.kind == "pair" for c in again)


def test_split_keeps_one_prompts_kto_rows_together():
    rows = [
        Conversation(
            messages=(
                Message("user", f"question {i // 2} on {ANIMALS[i // 2 % 10]}"),
                Message("assistant", f"answer {i}"),
            ),
            line=i + 1,
            label=i % 2 == 0,
        )
        for i in range(40)
    ]
    splits, together = split_conversations(rows, 0.2, 0.2, seed=1)
    assert together == 20
    for name, members in splits.items():
        others = [c for other, cs in splits.items() if other != name for c in cs]
        assert not {c.messages[0] for c in members} & {c.messages[0] for c in others}


# Closing the loop: served feedback as preference data


def _served_log(db):
    """Twelve corrected answers, three prompts answered well and badly by two served models, one thumbs-neutral."""
    log = RequestLog(db)
    prompt = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    for i in range(12):
        log.record(
            id=f"c{i}",
            endpoint="chat",
            model="colours",
            status=200,
            messages=prompt(f"colour of sky number {i}"),
            output=f"green {i}",
        )
        log.feedback(f"c{i}", 0 if i % 2 else None, f'{{"colour": "blue", "n": {i}}}', None)
    for j, question in enumerate(["name a fruit", "name a tree", "name a bird"]):
        log.record(
            id=f"g{j}",
            endpoint="chat",
            model="colours",
            status=200,
            messages=prompt(question),
            output=f"a fine answer {j}",
        )
        log.record(id=f"b{j}", endpoint="chat", model="base", status=200, messages=prompt(question), output=f"bad {j}")
        log.record(id=f"m{j}", endpoint="chat", model="base", status=200, messages=prompt(question), output=f"meh {j}")
        log.feedback(f"g{j}", 5, None, None)
        log.feedback(f"b{j}", 1, None, None)
        log.feedback(f"m{j}", 3, None, None)  # between the thresholds: in no pair
    log.record(id="x", endpoint="chat", model="colours", status=200, messages=prompt("name a fish"), output="carp")
    log.feedback("x", 1, None, None)
    log.feedback("x", 5, None, None)  # the newest feedback wins
    log.record(id="z", endpoint="completions", model="colours", status=200, messages=None, output="x")
    log.feedback("z", 1, "y", None)  # not a chat request
    log.close()
    return db


def test_monitor_exports_pairs_that_pass_data_check(tmp_path, capsys):
    db = _served_log(tmp_path / "requests.sqlite")
    out = tmp_path / "pairs.jsonl"
    argv = ["monitor", str(tmp_path / "run"), "--db", str(db), "--export-preferences", str(out)]
    assert main(argv) == 0
    assert "Wrote 15 preference pairs" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    corrections = [r for r in rows if r["source"] == "correction"]
    rated = [r for r in rows if r["source"] == "rating"]
    assert len(corrections) == 12 and len(rated) == 3
    assert corrections[0] == {
        "prompt": [{"role": "user", "content": "colour of sky number 0"}],
        "chosen": '{"colour": "blue", "n": 0}',
        "rejected": "green 0",
        "chosen_model": None,
        "rejected_model": "colours",
        "source": "correction",
        "chosen_request": "c0",
        "rejected_request": "c0",
    }
    fruit = next(r for r in rated if r["prompt"][0]["content"] == "name a fruit")
    assert (fruit["chosen"], fruit["chosen_model"], fruit["rejected"], fruit["rejected_model"]) == (
        "a fine answer 0",
        "colours",
        "bad 0",
        "base",
    )
    assert main(["data", "check", str(out)]) == 0
    assert "15 preference pairs (format preference), no errors" in capsys.readouterr().out
    assert main(argv) == 2  # never overwritten silently
    assert main([*argv, "--overwrite", "--good-rating", "3"]) == 0  # "meh" is good now: paired with "bad"
    assert sum(1 for _ in out.read_text().splitlines()) == 18


def test_monitor_exports_kto_rows_that_pass_data_check(tmp_path):
    db = _served_log(tmp_path / "requests.sqlite")
    result = export_preferences(tmp_path / "run", tmp_path / "kto.jsonl", db, kto=True)
    rows = [json.loads(line) for line in (tmp_path / "kto.jsonl").read_text().splitlines()]
    assert result.kind == "kto" and result.rows == len(rows) == 12 * 2 + 3 * 2 + 1
    assert result.good_rating == 4.0 and result.bad_rating == 2.0
    assert {
        (r["completion"], r["label"], r["completion_model"]) for r in rows if r["request"] in ("g1", "b1", "x")
    } == {
        ("a fine answer 1", True, "colours"),
        ("bad 1", False, "base"),
        ("carp", True, "colours"),
    }
    report = check_data(tmp_path / "kto.jsonl")
    assert report.errors == [] and report.format == "kto" and report.kind == "kto"
    assert "kto_imbalance" not in codes(report) and "contradicting_labels" not in codes(report)


def test_monitor_export_asks_for_the_scale_of_thumbs_ratings_and_checks_the_thresholds(tmp_path):
    log = RequestLog(tmp_path / "r.sqlite")
    for i, rating in enumerate([1, -1, 1, 0]):
        log.record(
            id=f"r{i}",
            endpoint="chat",
            model="m",
            status=200,
            messages=[{"role": "user", "content": "q"}],
            output=f"answer {i}",
        )
        log.feedback(f"r{i}", rating, None, None)
    log.close()
    with pytest.raises(TunesmithError, match="thumbs up/down"):
        export_preferences(tmp_path, tmp_path / "p.jsonl", tmp_path / "r.sqlite")
    with pytest.raises(TunesmithError, match="must be below"):
        export_preferences(tmp_path, tmp_path / "p.jsonl", tmp_path / "r.sqlite", good_rating=1, bad_rating=1)
    result = export_preferences(tmp_path, tmp_path / "p.jsonl", tmp_path / "r.sqlite", good_rating=1, bad_rating=0)
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert result.rows == 2 and {(r["chosen"], r["rejected"]) for r in rows} == {
        ("answer 0", "answer 1"),
        ("answer 2", "answer 3"),
    }
