"""The split is deterministic, keeps duplicate groups together, follows class proportions, leaks nothing."""

import json

import pytest

from tunesmith.cli import main
from tunesmith.data.check import check_data
from tunesmith.data.split import SPLITS, split_file
from tunesmith.errors import TunesmithError

from .conftest import write_jsonl
from .test_check import chat, clean_records


def labelled_records(n=200):
    records = []
    for i in range(n):
        label = "bug" if i % 4 == 0 else "feature"  # 25% / 75%
        records.append(
            chat(f"ticket {i}: the {['app', 'api', 'ui', 'db'][i % 4]} case {i * 31 % 97} varies {i}", label)
        )
    return records


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_split_is_deterministic_and_complete(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", clean_records(100))
    first = split_file(data, tmp_path / "a", val=0.1, test=0.2, seed=3)
    split_file(data, tmp_path / "b", val=0.1, test=0.2, seed=3)
    split_file(data, tmp_path / "c", val=0.1, test=0.2, seed=4)
    assert first.counts == {"train": 70, "val": 10, "test": 20}
    for name in ("train", "val", "test"):
        assert read(tmp_path / "a" / f"{name}.jsonl") == read(tmp_path / "b" / f"{name}.jsonl")
    assert read(tmp_path / "a" / "test.jsonl") != read(tmp_path / "c" / "test.jsonl")
    rows = [json.dumps(r) for name in ("train", "val", "test") for r in read(tmp_path / "a" / f"{name}.jsonl")]
    assert sorted(rows) == sorted(json.dumps(r) for r in read(data))


def test_duplicate_groups_stay_in_one_split_and_leakage_is_zero(tmp_path):
    records = clean_records(100)
    long = " ".join(f"marten{i} climbs" for i in range(30))
    for i in range(0, 100, 10):
        records[i + 1] = records[i]  # exact duplicates
        records[i + 2] = chat(long + f" variant {i}", "shared answer for the group")  # near duplicates
    data = write_jsonl(tmp_path / "d.jsonl", records)
    result = split_file(data, tmp_path / "s", val=0.1, test=0.2, seed=0)
    assert result.groups_kept_together >= 11
    assert result.leakage == {"val": {"exact": 0, "near_duplicate": 0}, "test": {"exact": 0, "near_duplicate": 0}}
    for name in ("val", "test"):
        leak = check_data(tmp_path / "s" / f"{name}.jsonl", against=tmp_path / "s" / "train.jsonl").leakage
        assert leak["exact"]["count"] == 0 and leak["near_duplicate"]["count"] == 0
    split = json.loads((tmp_path / "s" / "split.json").read_text())
    assert len(split["row_hashes"]["test"]) == result.counts["test"]
    assert not set(split["row_hashes"]["test"]) & set(split["row_hashes"]["train"])


def test_stratified_proportions_within_two_points(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", labelled_records(200))
    result = split_file(data, tmp_path / "s", val=0.1, test=0.2, seed=1)  # labels detected from answers
    for name in ("train", "val", "test"):
        counts = result.class_counts[name]
        share = counts["bug"] / sum(counts.values())
        assert abs(share - 0.25) <= 0.02, (name, counts)
    tagged = [r | {"team": "core" if i % 5 == 0 else "web"} for i, r in enumerate(clean_records(100))]
    result = split_file(write_jsonl(tmp_path / "t.jsonl", tagged), tmp_path / "t", test=0.2, stratify="team")
    assert result.class_counts["test"] == {"core": 4, "web": 16}
    assert "team" in read(tmp_path / "t" / "test.jsonl")[0]


def test_split_refuses_to_overwrite_and_bad_fractions(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", clean_records(30))
    assert main(["data", "split", str(data), "--out", str(tmp_path / "s")]) == 0
    before = (tmp_path / "s" / "train.jsonl").read_text()
    assert main(["data", "split", str(data), "--out", str(tmp_path / "s"), "--seed", "9"]) == 2
    assert "already holds a split" in capsys.readouterr().err
    assert (tmp_path / "s" / "train.jsonl").read_text() == before
    assert main(["data", "split", str(data), "--out", str(tmp_path / "s"), "--seed", "9", "--overwrite"]) == 0
    with pytest.raises(TunesmithError, match="add up to less than 1"):
        split_file(data, tmp_path / "x", val=0.5, test=0.5)
    with pytest.raises(TunesmithError, match="no record has the field 'nope'"):
        split_file(data, tmp_path / "y", stratify="nope")


def test_a_run_reads_and_hashes_its_data_once(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    """The gate and the split share one parse and one MinHash pass over the training file."""
    from tunesmith.cli import main
    from tunesmith.data import check, formats, similarity, split

    from .test_cli import train_args

    calls = {"hash": 0, "parse": 0}
    real_pairs, real_parse = similarity.near_duplicate_pairs, formats.parse_file

    def counted_pairs(*args, **kwargs):
        calls["hash"] += 1
        return real_pairs(*args, **kwargs)

    def counted_parse(*args, **kwargs):
        calls["parse"] += 1
        return real_parse(*args, **kwargs)

    for module in (check, split):
        monkeypatch.setattr(module, "near_duplicate_pairs", counted_pairs)
    import tunesmith.data.gate as gate

    monkeypatch.setattr(gate, "parse_file", counted_parse)
    monkeypatch.setattr(gate, "read_conversations", lambda *a, **k: pytest.fail("the data file was read again"))
    out = tmp_path / "runs" / "once"
    assert main(train_args(tiny_model_dir, chat_file, out, "--max-steps", "1", "--quiet")) == 0
    assert calls == {"hash": 1, "parse": 1}


def test_one_word_edit_pair_shares_a_split_and_leaks_when_split_apart(tmp_path):
    from .test_check import EIGHTEEN

    records = clean_records(60)
    records[5] = chat(EIGHTEEN, "It stands still, then strikes fast.")
    records[40] = chat(EIGHTEEN.replace("heron", "egret"), "It stands still, then strikes fast.")
    result = split_file(write_jsonl(tmp_path / "d.jsonl", records), tmp_path / "s", val=0.2, test=0.3, seed=1)
    assert result.groups_kept_together == 1
    where = {name: [r["messages"][0]["content"] for r in read(tmp_path / "s" / f"{name}.jsonl")] for name in SPLITS}
    assert [name for name in SPLITS for p in where[name] if "wait" in p and "shallow" in p] in (
        ["train"] * 2,
        ["val"] * 2,
        ["test"] * 2,
    )
    train = write_jsonl(tmp_path / "train.jsonl", [records[5]] + clean_records(20, seed=1))
    test = write_jsonl(tmp_path / "test.jsonl", [records[40]] + clean_records(20, seed=2)[10:])
    assert check_data(test, against=train).leakage["near_duplicate"] == {"count": 1, "lines": [1]}
