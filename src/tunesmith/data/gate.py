"""The data gate and the split: a new run trains only on data that passed the check, split without leakage.

`gate_data` stops a run on any error of `tunesmith data check` (and on its warnings unless data.allow_warnings);
`split_data` gives the train/val/test conversations: the files the config names, else a group-aware, stratified
split of the checked file that keeps near-duplicates on one side.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunesmith.config import RunConfig
from tunesmith.data.check import CheckOptions, CheckReport, check_parsed, labels_of
from tunesmith.data.formats import Conversation, ParsedFile, parse_file, position_word, read_conversations
from tunesmith.data.split import split_conversations
from tunesmith.errors import TunesmithError
from tunesmith.rewards import reference_rewards


@dataclass
class CheckedData:
    """The training file read and checked once: the split reuses its records and near-duplicate pairs."""

    report: CheckReport
    parsed: ParsedFile
    near_pairs: list[tuple[int, int]]


def gate_data(config: RunConfig) -> CheckedData:
    """Run the data check; stop on errors always, and on warnings unless data.allow_warnings."""
    if not config.data.path:
        raise TunesmithError("No training data: set data.path in the config or pass --data FILE.")
    options = CheckOptions(max_length=config.data.max_length, near_threshold=config.data.near_threshold)
    grpo = config.objective == "grpo"  # prompts without answers are read; the check says whether rewards need them
    if grpo:
        options.reference_rewards = reference_rewards(config.rl.rewards)
    parsed = parse_file(config.data.path, config.data.format, prompt_only=grpo)
    report, near_pairs = check_parsed(parsed, None, options, config.data.test_path, config.data.format)
    unit = position_word(config.data.path)
    problems = [f"{unit} {e['line']}: {e['message']}" for e in report.errors]
    if not config.data.allow_warnings:
        problems += [f"{w['code']}: {w['message']}" for w in report.warnings]
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems[:30])
        hint = "Fix the data (see `tunesmith data check`)"
        if not report.errors:
            hint += ", or set data.allow_warnings: true (--set data.allow_warnings=true) to train anyway"
        raise TunesmithError(f"The data check of {config.data.path} stopped the run:\n{listed}\n{hint}.")
    return CheckedData(report, parsed, near_pairs)


def split_data(config: RunConfig, checked: CheckedData) -> tuple[dict[str, list[Conversation]], str, list[Path]]:
    """Train, val and test conversations: the files given, else a group-aware, stratified split of the checked
    file (its records and near-duplicate pairs as the check found them)."""
    path = Path(str(config.data.path))
    conversations, fmt = checked.parsed.conversations, checked.parsed.format
    files = [path]
    val_share = 0.0 if config.data.val_path else config.data.val_fraction
    test_share = 0.0 if config.data.test_path else config.data.test_fraction
    labels = labels_of(path, conversations, CheckOptions())
    splits, _ = split_conversations(
        conversations,
        val_share,
        test_share,
        config.train.seed,
        labels,
        config.data.near_threshold,
        near_pairs=checked.near_pairs,
    )
    for name, given in (("test", config.data.test_path), ("val", config.data.val_path)):
        if given:
            splits[name], _ = read_conversations(given, config.data.format, prompt_only=config.objective == "grpo")
            files.append(Path(given))
    if not splits["train"]:
        raise TunesmithError(f"{path}: no examples left for training after the val/test split.")
    return splits, fmt, files
