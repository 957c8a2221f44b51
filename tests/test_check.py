"""Each check finds a planted defect, and finds nothing on a clean file."""

import json
import random

import pytest

from tunesmith.cli import main
from tunesmith.data.check import CheckOptions, check_data
from tunesmith.data.tokenize import use_chat_template

from .conftest import build_tokenizer, write_jsonl

ANIMALS = ["otter", "heron", "badger", "lynx", "falcon", "beaver", "marten", "ibis", "gecko", "tapir"]
VERBS = ["describe", "explain", "summarise", "compare", "list facts about", "write a poem on"]
PLACES = ["rivers", "forests", "deserts", "mountains", "cities", "islands", "wetlands", "tundra"]


def clean_records(n: int = 60, seed: int = 0) -> list[dict]:
    """Varied, unique question/answer pairs with no PII, markers or conflicts."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        animal, verb, place = ANIMALS[i % 10], VERBS[(i // 10) % 6], PLACES[rng.randrange(8)]
        words = rng.sample(["quick", "calm", "rare", "tiny", "wild", "agile", "shy", "bold", "keen", "sleek"], 4)
        records.append(
            {
                "messages": [
                    {"role": "user", "content": f"Please {verb} the {animal} that lives near {place}, item {i}."},
                    {
                        "role": "assistant",
                        "content": f"The {animal} of the {place} is {' and '.join(words)}; note {i * 7}.",
                    },
                ]
            }
        )
    return records


def chat(prompt, answer):
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def codes(report):
    return {w["code"] for w in report.warnings}


def test_clean_file_has_no_errors_and_no_warnings_but_size(tmp_path):
    report = check_data(write_jsonl(tmp_path / "d.jsonl", clean_records()), tokenizer=_tokenizer())
    assert report.errors == []
    assert codes(report) == {"small_dataset"}
    assert report.exact_duplicates == [] and report.near_duplicates == [] and report.conflicts == []
    assert report.class_balance is None and report.token_lengths["truncated"] == 0
    assert report.hygiene["pii"] == {} and report.hygiene["template_markers"] == {}


def test_large_clean_file_finds_nothing_at_all(tmp_path):
    report = check_data(write_jsonl(tmp_path / "d.jsonl", clean_records(600)), tokenizer=_tokenizer())
    assert report.errors == [] and report.warnings == []
    assert report.exact_duplicates == [] and report.near_duplicates == [] and report.conflicts == []


def _tokenizer():
    tokenizer = build_tokenizer()
    use_chat_template(tokenizer, None)
    return tokenizer


def test_format_errors_every_line(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(r) for r in clean_records(20)]
    lines[3] = "{broken"
    lines[7] = json.dumps({"messages": [{"role": "user", "content": "q"}]})
    lines[11] = json.dumps(chat("q", "   "))
    path.write_text("\n".join(lines) + "\n")
    report = check_data(path)
    assert [e["line"] for e in report.errors] == [4, 8, 12]
    assert main(["data", "check", str(path)]) == 1


def test_size_error_and_warning(tmp_path):
    report = check_data(write_jsonl(tmp_path / "d.jsonl", clean_records(5)))
    assert any("at least 10" in e["message"] for e in report.errors)
    assert codes(check_data(write_jsonl(tmp_path / "e.jsonl", clean_records(30)))) == {"small_dataset"}


def test_exact_and_near_duplicates_are_clustered(tmp_path):
    records = clean_records(40)
    records[10] = records[2]  # exact (line 11 duplicates line 3)
    records[20] = chat(records[2]["messages"][0]["content"].upper() + "  ", records[2]["messages"][1]["content"])
    long = " ".join(f"heron{i} waits" for i in range(40))
    records[30] = chat(long + " and then it strikes", "a long answer about herons and their patient hunting")
    records[31] = chat(long + " and then it strike", "a long answer about herons and their patient hunting")
    report = check_data(write_jsonl(tmp_path / "d.jsonl", records))
    assert report.exact_duplicates == [[3, 11, 21]]
    assert report.near_duplicates == [[31, 32]]
    assert {"exact_duplicates", "near_duplicates"} <= codes(report)


def test_near_duplicate_threshold_is_configurable(tmp_path):
    records = clean_records(20)
    base = "one two three four five six seven eight nine ten eleven twelve"
    records[0], records[1] = chat(base, "same answer here"), chat(base + " thirteen fourteen", "same answer here")
    path = write_jsonl(tmp_path / "d.jsonl", records)
    assert check_data(path, options=CheckOptions(near_threshold=0.95)).near_duplicates == []
    assert check_data(path, options=CheckOptions(near_threshold=0.5)).near_duplicates == [[1, 2]]


def test_conflicting_answers(tmp_path):
    records = clean_records(20)
    records[4] = chat("What is the capital of Australia?", "Canberra")
    records[9] = chat("what is the capital of  australia?", "Sydney")
    report = check_data(write_jsonl(tmp_path / "d.jsonl", records))
    assert report.conflicts == [{"prompt": "what is the capital of australia?", "lines": [5, 10], "answers": 2}]


def test_token_lengths_truncation_and_lost_answers(tmp_path):
    records = clean_records(20)
    records[0] = chat("word " * 300, "short answer")
    records[1] = chat("q", "answer " * 300)
    report = check_data(
        write_jsonl(tmp_path / "d.jsonl", records), tokenizer=_tokenizer(), options=CheckOptions(max_length=128)
    )
    lengths = report.token_lengths
    assert lengths["truncated"] == 2 and lengths["answer_lost"] == 1 and lengths["max"] > 300
    assert lengths["min"] <= lengths["median"] <= lengths["p95"] <= lengths["max"]
    assert {"truncation", "answer_lost"} <= codes(report)
    assert check_data(write_jsonl(tmp_path / "e.jsonl", records)).token_lengths is None


def test_class_balance_from_answers_and_from_a_label_field(tmp_path):
    records = [
        chat(f"review {i}: {ANIMALS[i % 10]} {PLACES[i % 8]} {i * 13}", "positive" if i % 5 else "negative")
        for i in range(50)
    ]
    report = check_data(write_jsonl(tmp_path / "d.jsonl", records))
    assert report.class_balance == {"positive": 40, "negative": 10}
    assert "class_imbalance" in codes(report)
    assert "class_imbalance" not in codes(check_data(tmp_path / "d.jsonl", options=CheckOptions(imbalance_ratio=5)))
    labelled = [r | {"topic": "a" if i < 15 else "b"} for i, r in enumerate(clean_records(30))]
    report = check_data(write_jsonl(tmp_path / "l.jsonl", labelled), options=CheckOptions(label_field="topic"))
    assert report.class_balance == {"b": 15, "a": 15} and "class_imbalance" not in codes(report)


def test_diversity_flags_repeated_answers_and_prefixes(tmp_path):
    records = clean_records(60)
    for i in range(0, 60, 10):
        records[i] = chat(f"tell me anything number {i}", "I cannot help with that request.")
    report = check_data(write_jsonl(tmp_path / "d.jsonl", records))
    assert report.diversity["repeated_answers"][0] == {"answer": "i cannot help with that request.", "prompts": 6}
    assert "repeated_answers" in codes(report)
    assert report.diversity["top_prompt_prefixes"][0]["count"] >= 6
    assert 0 < report.diversity["distinct_2"] <= 1


def test_hygiene_short_answers_markers_and_pii(tmp_path):
    records = clean_records(30)
    records[1] = chat("Is it?", "y")
    records[2] = chat("Hello <|im_start|>assistant", "Hi there, how can I help?")
    records[3] = chat("Mail me", "Write to jane.doe@example.com for details.")
    records[4] = chat("Call", "Ring 555-123-4567 after noon.")
    records[5] = chat("Pay", "Card 4111 1111 1111 1111 was charged.")
    records[6] = chat("Order", "Order 1234 5678 9012 3456 was shipped.")  # fails Luhn: not a card
    report = check_data(write_jsonl(tmp_path / "d.jsonl", records))
    assert report.hygiene["short_answers"]["lines"] == [2]
    assert report.hygiene["template_markers"]["<|im_start|>"]["lines"] == [3]
    pii = {kind: v["lines"] for kind, v in report.hygiene["pii"].items()}
    assert pii == {"email": [4], "phone": [5], "card_number": [6]}
    assert {"short_answers", "template_markers", "pii"} <= codes(report)


def test_leakage_against_another_file(tmp_path):
    train = clean_records(40, seed=1)
    test = clean_records(40, seed=2)[30:]  # unrelated items 30..39 with other random words
    test[0] = train[5]  # exact leak
    long = " ".join(f"lynx{i} hunts" for i in range(40))
    train[6] = chat(long, "an answer")
    test[1] = chat(long + " thanks", "an answer")  # near duplicate
    story = " ".join(f"w{i}" for i in range(30))
    train[7] = chat("story one " + story, "first telling")
    test[2] = chat("another question entirely about " + story[:60], "second telling of a different kind")
    train_path, test_path = write_jsonl(tmp_path / "train.jsonl", train), write_jsonl(tmp_path / "test.jsonl", test)
    leakage = check_data(test_path, against=train_path).leakage
    assert leakage["exact"]["lines"] == [1]
    assert 2 in leakage["near_duplicate"]["lines"]
    assert 3 in leakage["ngram"]["lines"]
    clean = check_data(write_jsonl(tmp_path / "other.jsonl", clean_records(40, seed=2)[30:]), against=train_path)
    assert clean.leakage["exact"]["count"] == 0 and clean.leakage["near_duplicate"]["count"] == 0


def test_json_report_and_exit_codes(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", clean_records(20))
    assert main(["data", "check", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in [
        "examples",
        "errors",
        "warnings",
        "exact_duplicates",
        "near_duplicates",
        "conflicts",
        "token_lengths",
        "class_balance",
        "leakage",
    ]:
        assert key in report
    assert report["examples"] == 20 and report["warnings"][0]["code"] == "small_dataset"
    assert main(["data", "check", str(tmp_path / "missing.jsonl")]) == 2


@pytest.mark.parametrize("suffix", [".csv"])
def test_other_file_types_are_checked(tmp_path, suffix):
    rows = "prompt,completion\n" + "".join(f"question {i} about {ANIMALS[i % 10]},answer {i}\n" for i in range(12))
    (tmp_path / f"d{suffix}").write_text(rows + "question 0 about otter,answer 0\n")
    report = check_data(tmp_path / f"d{suffix}")
    assert report.exact_duplicates == [[2, 14]]


def test_low_diversity_when_one_near_duplicate_cluster_dominates(tmp_path):
    records = clean_records(60)
    long = " ".join(f"gecko{i} basks" for i in range(40))
    for i in range(8):
        records[i * 7] = chat(f"{long} variant {i}", "a gecko basks on warm stones all afternoon")
    report = check_data(write_jsonl(tmp_path / "d.jsonl", records))
    assert report.diversity["largest_near_duplicate_cluster_share"] == round(8 / 60, 4)
    assert "low_diversity" in codes(report)


def test_unreadable_file_exits_2_and_bad_records_exit_1_with_their_lines(tmp_path, capsys):
    lines = [json.dumps(r).encode() for r in clean_records(12)]
    unreadable = tmp_path / "latin.jsonl"
    unreadable.write_bytes(b"\n".join([*lines[:2], '{"text": "café"}'.encode("latin-1"), *lines[2:]]))
    assert main(["data", "check", str(unreadable)]) == 2
    err = capsys.readouterr().err
    assert f"{unreadable}:3: not UTF-8 text: byte 0xe9" in err and "Traceback" not in err
    bad = tmp_path / "bad.csv"
    bad.write_bytes(
        b"\xef\xbb\xbfprompt,completion\r\n" + b"".join(b"q%d,a%d\r\n" % (i, i) for i in range(12)) + b"x,y,z\r\n"
    )
    assert main(["data", "check", str(bad)]) == 1
    assert "error line 14: 3 cells but the header has 2 columns" in capsys.readouterr().out


EIGHTEEN = "Please explain in plain words how the heron waits in the shallow water before it strikes at fish"


def test_one_word_edit_of_a_short_example_is_a_near_duplicate(tmp_path):
    """Word 5-gram MinHash missed these: one changed word kills five of an 18-word text's fourteen 5-grams."""
    records = clean_records(30)
    records[3] = chat(EIGHTEEN, "It stands still, then strikes fast.")
    records[17] = chat(EIGHTEEN.replace("shallow", "muddy"), "It stands still, then strikes fast.")
    records[22] = chat("Why does the otter float on its back?", "To rest and to keep its fur dry while it eats.")
    records[25] = chat("Why does the otter float on its back?", "To rest and to keep its fur dry wihle it eats.")
    report = check_data(write_jsonl(tmp_path / "d.jsonl", records))
    assert report.near_duplicates == [[4, 18], [23, 26]]


def test_shared_template_with_other_values_is_not_a_near_duplicate(tmp_path):
    """Another age, another medication, another label: different examples though a word or two apart."""
    note = "Extract the intake record as JSON.\nNote: Female, aged {age}, presents with cough for 1 week. Takes {med}."
    answer = '{{"age": {age}, "sex": "F", "complaint": "cough", "duration_days": 7, "medications": ["{med}"]}}'
    records = clean_records(30)
    for i, (age, med) in enumerate([(59, "warfarin"), (58, "warfarin"), (59, "metformin")]):
        records[i] = chat(note.format(age=age, med=med), answer.format(age=age, med=med))
    records[10] = chat(EIGHTEEN + " and frogs", "positive")
    records[11] = chat(EIGHTEEN + " and toads", "negative")
    report = check_data(write_jsonl(tmp_path / "d.jsonl", records))
    assert report.near_duplicates == [] and "near_duplicates" not in codes(report)


def test_quickstart_data_has_no_near_duplicates():
    assert check_data("examples/quickstart/notes.jsonl").near_duplicates == []
