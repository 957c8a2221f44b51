"""The data quality gate: find what would waste a fine-tune before any compute is spent.

Reports format errors, size, exact and near duplicates, conflicting answers, token lengths, class
balance, diversity, hygiene (short answers, template leftovers, PII), tool calls checked against each row's
tools, and leakage against another file, each with line numbers and a suggested fix. Preference pairs also
get identical and contradicting pairs and DPO's length bias; KTO rows the balance of desirable and
undesirable answers. It reads data and never changes it.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tunesmith.data.formats import Conversation, Message, ParsedFile, Problems, iter_raw_records, parse_file
from tunesmith.data.similarity import (
    answers_agree,
    clusters_from_pairs,
    exact_clusters,
    near_duplicate_pairs,
    near_duplicates_across,
    ngram_overlaps,
    normalise_text,
    words,
)
from tunesmith.data.tokenize import learned_runs, tokenize_conversation, use_chat_template
from tunesmith.data.tools import ToolCall, argument_problems

MIN_EXAMPLES = 10
RECOMMENDED_EXAMPLES = 500
SHORT_ANSWER_CHARS = 3
MAX_EXAMPLE_LINES = 5
TEMPLATE_MARKERS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|start_header_id|>",
    "[INST]",
    "[/INST]",
    "<start_of_turn>",
    "<end_of_turn>",
    "<s>",
    "</s>",
    "### Instruction:",
    "### Response:",
    "### Assistant:",
]
PII_PATTERNS = {
    "email": re.compile(r"\b[\w.+-]+@[\w-]+\.[\w.-]+\b"),
    "phone": re.compile(r"(?<!\d)(?:\+\d{1,3}[ .-]?)?\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4}(?!\d)"),
    "card_number": re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)"),
}


@dataclass
class CheckOptions:
    max_length: int = 1024
    near_threshold: float = 0.8
    imbalance_ratio: float = 3.0
    label_field: str | None = None
    train_on: str = "assistant"
    reasoning: str = "learn"  # data.reasoning: whether assistant turns' reasoning is learned or context only
    # Pairs: warn when more than this share has the chosen answer longer than the rejected one. DPO learns
    # length where length separates the answers (Park et al. 2024, "Disentangling length from quality in DPO").
    length_bias_share: float = 0.7
    # KTO rows: warn when desirable or undesirable answers are fewer than this share of the rows.
    kto_min_share: float = 0.1
    # objective grpo: the rewards that score against each row's reference answer (rewards.reference_rewards);
    # None when the data is not checked for grpo rewards
    reference_rewards: list[str] | None = None

    @property
    def for_rewards(self) -> bool:
        """Whether the data is checked for objective grpo: prompts without answers are then read."""
        return self.reference_rewards is not None


@dataclass
class CheckReport:
    path: str
    format: str
    examples: int
    errors: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[dict[str, Any]] = field(default_factory=list)
    exact_duplicates: list[list[int]] = field(default_factory=list)
    near_duplicates: list[list[int]] = field(default_factory=list)
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    token_lengths: dict[str, Any] | None = None
    class_balance: dict[str, int] | None = None
    diversity: dict[str, Any] = field(default_factory=dict)
    hygiene: dict[str, Any] = field(default_factory=dict)
    leakage: dict[str, Any] | None = None
    kind: str = "sft"
    preference: dict[str, Any] | None = None
    rewards: dict[str, Any] | None = None  # objective grpo: what the rewards need and how many rows lack it
    tools: dict[str, Any] | None = None  # tool data: counts of rows with tools, calls, parallel calls, results

    @property
    def ok(self) -> bool:
        return not self.errors

    def warn(self, code: str, message: str) -> None:
        self.warnings.append({"code": code, "message": message})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prompt_text(conversation: Conversation) -> str:
    if conversation.text is not None:
        return ""
    return "\n".join(m.written for m in conversation.prompt_messages)


def has_answer(conversation: Conversation) -> bool:
    """Whether an example holds an answer to check (a prompt of objective grpo may have none)."""
    return conversation.text is None and conversation.reference is not None


def answer_text(conversation: Conversation) -> str:
    return conversation.text if conversation.text is not None else str(conversation.reference or "")


def full_text(conversation: Conversation) -> str:
    """All the text of an example, tool calls included; a pair's rejected answer too, so pairs differing only
    there differ."""
    if conversation.text is not None:
        return conversation.text
    text = "\n".join(m.written for m in conversation.messages)
    return text if conversation.rejected is None else f"{text}\n{conversation.rejected}"


def _duplicate_key(conversation: Conversation) -> str:
    # A KTO answer labelled both ways is a contradiction (check_kto), not a duplicate.
    label = "" if conversation.label is None else f"\n\x00label={conversation.label}"
    return full_text(conversation) + label


def _duplicate_answer(conversation: Conversation) -> str:
    # Near-duplicate pairs must agree on both answers.
    rejected = conversation.rejected
    return answer_text(conversation) if rejected is None else f"{answer_text(conversation)}\n{rejected}"


def _lines(conversations: list[Conversation], indices: list[int]) -> list[int]:
    return sorted(conversations[i].line for i in indices)


def _shown(lines: list[int]) -> str:
    head = ", ".join(str(n) for n in lines[:MAX_EXAMPLE_LINES])
    return head + (f" (+{len(lines) - MAX_EXAMPLE_LINES} more)" if len(lines) > MAX_EXAMPLE_LINES else "")


def check_duplicates(
    report: CheckReport, conversations: list[Conversation], options: CheckOptions
) -> list[tuple[int, int]]:
    """Exact and near-duplicate clusters into the report; returns the near-duplicate index pairs (the split
    keeps those together and reuses them rather than hashing every example again)."""
    texts = [_duplicate_key(c) for c in conversations]
    report.exact_duplicates = sorted(_lines(conversations, g) for g in exact_clusters(texts))
    if report.exact_duplicates:
        extra = sum(len(g) - 1 for g in report.exact_duplicates)
        what = " pair(s) (the same prompt, chosen and rejected answers)" if report.kind == "pair" else "(s)"
        report.warn(
            "duplicate_pairs" if report.kind == "pair" else "exact_duplicates",
            f"{extra} exact duplicate{what} in {len(report.exact_duplicates)} cluster(s), e.g. lines "
            f"{_shown(report.exact_duplicates[0])}. Keep one of each: duplicates overfit and leak across splits.",
        )
    pairs = near_duplicate_pairs(texts, options.near_threshold, [_duplicate_answer(c) for c in conversations])
    near = clusters_from_pairs(len(texts), pairs)
    exact_sets = {tuple(g) for g in report.exact_duplicates}
    report.near_duplicates = [
        lines for lines in (_lines(conversations, g) for g in near) if tuple(lines) not in exact_sets
    ]
    if report.near_duplicates:
        report.warn(
            "near_duplicates",
            f"{sum(len(g) for g in report.near_duplicates)} examples in {len(report.near_duplicates)} near-duplicate "
            f"cluster(s) (near_threshold {options.near_threshold}), largest at lines "
            f"{_shown(report.near_duplicates[0])}. "
            "Keep one per cluster or vary them; `tunesmith data split` keeps each cluster inside one split.",
        )
    largest = max((len(g) for g in near), default=1)
    report.diversity["largest_near_duplicate_cluster_share"] = round(largest / max(1, len(texts)), 4)
    return pairs


def check_conflicts(report: CheckReport, conversations: list[Conversation]) -> None:
    answers: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for c in conversations:
        if has_answer(c):
            answers[normalise_text(prompt_text(c))][normalise_text(answer_text(c))].append(c.line)
    for prompt, by_answer in answers.items():
        if len(by_answer) > 1:
            report.conflicts.append(
                {
                    "prompt": prompt[:120],
                    "lines": sorted(n for ls in by_answer.values() for n in ls),
                    "answers": len(by_answer),
                }
            )
    if report.conflicts:
        report.warn(
            "conflicts",
            f"{len(report.conflicts)} prompt(s) have different answers, "
            f"e.g. lines {_shown(report.conflicts[0]['lines'])}. "
            "Pick the right answer, or add the context that decides between them.",
        )


def check_token_lengths(
    report: CheckReport, conversations: list[Conversation], tokenizer: Any, options: CheckOptions
) -> None:
    lengths, truncated, lost = [], [], []
    for c in conversations:
        # A pair is as long as its longer side, and is cut when either side is.
        sides = [c] if c.rejected is None else [c, replace(c, messages=c.rejected_messages, rejected=None)]
        examples = [tokenize_conversation(tokenizer, side, options.train_on, options.reasoning) for side in sides]
        lengths.append(max(len(example) for example in examples))
        if lengths[-1] > options.max_length:
            truncated.append(c.line)
            learns = c.text is not None or c.reference is not None  # a prompt without an answer loses none
            if learns and any(sum(example.loss_mask[1 : options.max_length]) == 0 for example in examples):
                lost.append(c.line)
    if not lengths:
        return
    ordered = sorted(lengths)
    report.token_lengths = {
        "min": ordered[0],
        "median": statistics.median(ordered),
        "p95": ordered[int(0.95 * (len(ordered) - 1))],
        "max": ordered[-1],
        "truncated": len(truncated),
        "answer_lost": len(lost),
        "max_length": options.max_length,
    }
    sides = " (the prompt with the chosen or the rejected answer)" if report.kind == "pair" else ""
    if truncated:
        report.warn(
            "truncation",
            f"{len(truncated)} example(s) exceed max_length {options.max_length} tokens{sides} and will be "
            f"truncated (lines {_shown(truncated)}). Raise data.max_length or shorten them.",
        )
    if lost:
        report.warn(
            "answer_lost",
            f"{len(lost)} example(s) would lose a whole answer to truncation{sides} (lines {_shown(lost)}); "
            "they will be dropped. Shorten their prompts or raise data.max_length.",
        )


# What the report counts of tool data (CheckReport.tools), besides the rows without tools.
TOOL_COUNTS = (
    "rows_with_tools", "tool_turns", "tool_calls", "parallel_turns", "tool_results", "no_call_answers",
    "unanswered_calls", "reasoning_turns",
)  # fmt: skip


def _tool_error(report: CheckReport, line: int, code: str, message: str) -> None:
    report.errors.append({"line": line, "code": code, "message": message})


def _call_problems(call: ToolCall, tools: dict[str, dict[str, Any]], where: str) -> list[tuple[str, str]]:
    """(code, message) for a call that names no tool of its row or whose arguments break the tool's schema."""
    if call.name not in tools:
        known = ", ".join(sorted(tools)) or "none"
        return [
            (
                "unknown_tool",
                f"{where}: calls '{call.name}', which is not in the row's tools ({known}); fix the name or add the "
                "tool's schema to 'tools'",
            )
        ]
    parameters = tools[call.name].get("parameters") or {}
    return [
        (code, f"{where}: {call.name}: {problem}; fix the call or the tool's parameters schema")
        for code, problem in argument_problems(call.arguments, parameters)
    ]


def _unanswered(messages: tuple[Message, ...], index: int) -> tuple[list[ToolCall], list[int]]:
    """The calls of the assistant turn at `index` that no tool turn right after it answers (by tool_call_id, else
    in order), and the positions of the tool turns that answer none of them."""
    waiting = list(messages[index].tool_calls)
    strays = []
    position = index + 1
    while position < len(messages) and messages[position].role == "tool":
        result = messages[position]
        answered = next((c for c in waiting if result.tool_call_id and c.id == result.tool_call_id), None)
        if answered is None and not result.tool_call_id and waiting:
            answered = waiting[0]
        if answered is None:
            strays.append(position)
        else:
            waiting.remove(answered)
        position += 1
    return waiting, strays


def check_tool_turns(report: CheckReport, conversation: Conversation) -> dict[str, int]:
    """Every call against the row's tools, every result against the calls it answers; the row's counts."""
    tools = {t["function"]["name"]: t["function"] for t in conversation.tools}
    counts: Counter[str] = Counter()
    messages = conversation.messages
    for index, message in enumerate(messages):
        is_result = message.role == "tool"
        before = messages[index - 1] if index else None
        if is_result and (before is None or (before.role != "tool" and not before.tool_calls)):
            _tool_error(
                report,
                conversation.line,
                "result_without_call",
                f"messages[{index}]: a tool result that follows no assistant tool call; put it right after the call "
                "it answers, or remove it",
            )
        counts["tool_results"] += is_result
        if not message.tool_calls:
            continue
        counts["tool_turns"] += 1
        counts["tool_calls"] += len(message.tool_calls)
        counts["parallel_turns"] += len(message.tool_calls) > 1
        if tools:
            for number, call in enumerate(message.tool_calls):
                for code, problem in _call_problems(call, tools, f"messages[{index}].tool_calls[{number}]"):
                    _tool_error(report, conversation.line, code, problem)
        waiting, strays = _unanswered(messages, index)
        for position in strays:
            answers = messages[position].tool_call_id
            _tool_error(
                report,
                conversation.line,
                "result_without_call",
                f"messages[{position}]: a tool result for call id '{answers}', which no call of messages[{index}] "
                "has; fix its tool_call_id or remove it",
            )
        if index < len(messages) - 1:  # a call that ends the conversation is the answer to learn
            counts["unanswered_calls"] += len(waiting)
    return dict(counts)


def check_tools(report: CheckReport, conversations: list[Conversation]) -> None:
    """Tool calls, results and rows without tools: errors for calls that break their row's tools, counts."""
    counts: Counter[str] = Counter()
    without_tools: list[int] = []
    unanswered: list[int] = []
    for conversation in conversations:
        found = check_tool_turns(report, conversation)
        counts.update(found)
        if found.get("unanswered_calls"):
            unanswered.append(conversation.line)
        if conversation.tools:
            counts["rows_with_tools"] += 1
            last = next((m for m in reversed(conversation.messages) if m.role == "assistant"), None)
            counts["no_call_answers"] += bool(last and not last.tool_calls)
        else:
            without_tools.append(conversation.line)
        counts["reasoning_turns"] += sum(m.reasoning is not None for m in conversation.messages)
    called_blind = [c.line for c in conversations if not c.tools and any(m.tool_calls for m in c.messages)]
    report.tools = {key: counts[key] for key in TOOL_COUNTS} | {
        "rows_without_tools": len(without_tools),
        "calls_without_tools": len(called_blind),
    }
    if unanswered:
        report.warn(
            "unanswered_calls",
            f"{counts['unanswered_calls']} tool call(s) in {len(unanswered)} row(s) get no tool result before the "
            f"conversation goes on (lines {_shown(unanswered)}): the model learns to answer without the result. Add "
            "a tool turn with each result (tool_call_id: the call's id), or end the conversation at the call.",
        )
    if called_blind:
        report.warn(
            "calls_without_tools",
            f"{len(called_blind)} row(s) make tool calls but list no 'tools' (lines {_shown(called_blind)}): their "
            "calls cannot be checked, and the model learns to call tools it was never shown. Add each row's tools.",
        )


def shown_masks(path: str | Path, fmt: str, tokenizer: Any, count: int, options: CheckOptions) -> list[dict[str, Any]]:
    """The first `count` examples as the tokenizer's template renders them: {"line", "pieces": [[text, learned]]}."""
    examples = []
    learned = [c for c in parse_file(path, fmt).conversations if c.text is not None or c.reference is not None]
    for conversation in learned[:count]:
        tokenized = tokenize_conversation(tokenizer, conversation, options.train_on, options.reasoning)
        pieces = [[text, learned] for text, learned in learned_runs(tokenizer, tokenized)]
        examples.append({"line": conversation.line, "pieces": pieces})
    return examples


def check_pairs(report: CheckReport, conversations: list[Conversation], options: CheckOptions) -> None:
    """Pairs that teach nothing or contradict each other, and DPO's length bias."""
    identical, near, lines_of = [], [], defaultdict(list)
    longer, ratios = 0, []
    for c in conversations:
        chosen, rejected = answer_text(c), str(c.rejected)
        if chosen.strip() == rejected.strip():
            identical.append(c.line)
        elif normalise_text(chosen) == normalise_text(rejected) or answers_agree(
            chosen, rejected, options.near_threshold
        ):
            near.append(c.line)
        key = (normalise_text(prompt_text(c)), normalise_text(chosen), normalise_text(rejected))
        lines_of[key].append(c.line)
        longer += len(chosen) > len(rejected)
        ratios.append(len(chosen) / max(1, len(rejected)))
    for line in identical:
        report.errors.append(
            {
                "line": line,
                "code": "identical_pair",
                "message": "chosen and rejected are the same answer: the pair teaches nothing. "
                "Replace the rejected answer or remove the pair.",
            }
        )
    if near:
        report.warn(
            "near_identical_pairs",
            f"{len(near)} pair(s) have chosen and rejected answers that say the same (they differ only in case, "
            f"punctuation, spacing or typos; lines {_shown(near)}). The preference is noise: make the rejected "
            "answer differ in what matters, or remove them.",
        )
    contradicting = sorted(
        sorted(lines + lines_of[(prompt, rejected, chosen)])
        for (prompt, chosen, rejected), lines in lines_of.items()
        if chosen < rejected and (prompt, rejected, chosen) in lines_of
    )
    if contradicting:
        report.warn(
            "contradicting_pairs",
            f"{len(contradicting)} prompt(s) prefer A over B in one pair and B over A in another, e.g. lines "
            f"{_shown(contradicting[0])}. Decide which answer is better and keep one direction.",
        )
    share = longer / len(conversations)
    report.preference = {
        "pairs": len(conversations),
        "identical": len(identical),
        "near_identical": len(near),
        "contradicting": contradicting,
        "chosen_longer_share": round(share, 4),
        "mean_length_ratio": round(statistics.fmean(ratios), 4),
        "length_bias_share": options.length_bias_share,
    }
    if share > options.length_bias_share:
        report.warn(
            "length_bias",
            f"the chosen answer is the longer one in {share:.0%} of pairs (over {options.length_bias_share:.0%}; "
            f"mean length ratio chosen/rejected {report.preference['mean_length_ratio']:.2f}): DPO then learns "
            "that longer is better. Add pairs where the shorter answer wins, or use a length-normalised "
            "objective (simpo).",
        )


def check_kto(report: CheckReport, conversations: list[Conversation], options: CheckOptions) -> None:
    """The balance of desirable and undesirable answers, and answers labelled both ways."""
    desirable = sum(1 for c in conversations if c.label)
    undesirable = len(conversations) - desirable
    labels: dict[tuple[str, str], dict[bool, list[int]]] = defaultdict(lambda: defaultdict(list))
    for c in conversations:
        labels[(normalise_text(prompt_text(c)), normalise_text(answer_text(c)))][bool(c.label)].append(c.line)
    contradicting = sorted(sorted(by[True] + by[False]) for by in labels.values() if len(by) == 2)
    report.preference = {
        "desirable": desirable,
        "undesirable": undesirable,
        "desirable_share": round(desirable / len(conversations), 4),
        "contradicting": contradicting,
        "kto_min_share": options.kto_min_share,
    }
    rare, rare_n = ("desirable", desirable) if desirable <= undesirable else ("undesirable", undesirable)
    if rare_n / len(conversations) < options.kto_min_share:
        report.warn(
            "kto_imbalance",
            f"only {rare_n} of {len(conversations)} rows ({rare_n / len(conversations):.1%}) are {rare}, under "
            f"{options.kto_min_share:.0%}: KTO learns little from the rare side. Add {rare} answers, or weigh them "
            f"up (preference.{rare}_weight).",
        )
    if contradicting:
        report.warn(
            "contradicting_labels",
            f"{len(contradicting)} answer(s) are labelled both desirable and undesirable for the same prompt, e.g. "
            f"lines {_shown(contradicting[0])}. Keep one label for each.",
        )


def labels_of(path: Path, conversations: list[Conversation], options: CheckOptions) -> dict[int, str] | None:
    """Line -> class label: from label_field, or the answers when they take few distinct values."""
    if options.label_field:
        wanted = {c.line for c in conversations}
        found = {}
        for line, record in iter_raw_records(path, Problems(path)):
            if line in wanted and isinstance(record, dict) and record.get(options.label_field) is not None:
                found[line] = str(record[options.label_field])
        return found
    answers = {c.line: normalise_text(answer_text(c)) for c in conversations if has_answer(c)}
    distinct = set(answers.values())
    if len(answers) >= 20 and 2 <= len(distinct) <= min(20, len(answers) // 5):
        return answers
    return None


def check_references(report: CheckReport, conversations: list[Conversation], rewards: list[str]) -> None:
    """objective grpo: what the rewards need (the names of those that score against the reference answer) and
    how many rows lack an answer; an error when a reward needs one and some row has none."""
    missing = [c.line for c in conversations if c.reference is None]
    report.rewards = {"need_reference": rewards, "rows_without_reference": len(missing)}
    if missing and rewards:
        report.errors.append(
            {
                "line": missing[0],
                "message": f"rl.rewards {', '.join(rewards)} score against the reference answer, but {len(missing)} "
                f"rows have none (lines {missing[:10]}): add the answers, or use rewards that need none (regex, "
                "length, json_valid, json_schema, code).",
            }
        )


def check_balance(report: CheckReport, labels: dict[int, str] | None, options: CheckOptions) -> None:
    if not labels:
        return
    counts = Counter(labels.values())
    report.class_balance = dict(counts.most_common())
    ratio = max(counts.values()) / min(counts.values())
    report.diversity["imbalance_ratio"] = round(ratio, 3)
    if ratio > options.imbalance_ratio:
        (top, top_n), (low, low_n) = counts.most_common()[0], counts.most_common()[-1]
        report.warn(
            "class_imbalance",
            f"classes are imbalanced {ratio:.1f}:1 ('{top}' {top_n} vs '{low}' {low_n}; "
            f"limit {options.imbalance_ratio}:1). "
            "Add examples of the rare classes, downsample the common ones, or split with --stratify.",
        )


def check_diversity(report: CheckReport, conversations: list[Conversation], labelled: bool) -> None:
    prompts = [words(prompt_text(c)) for c in conversations if c.text is None] or [
        words(c.text or "") for c in conversations
    ]
    unigrams = [w for p in prompts for w in p]
    bigrams = [tuple(p[i : i + 2]) for p in prompts for i in range(len(p) - 1)]
    report.diversity["distinct_1"] = round(len(set(unigrams)) / max(1, len(unigrams)), 4)
    report.diversity["distinct_2"] = round(len(set(bigrams)) / max(1, len(bigrams)), 4)
    prefixes = Counter(" ".join(p[:5]) for p in prompts if p)
    report.diversity["top_prompt_prefixes"] = [{"prefix": k, "count": n} for k, n in prefixes.most_common(5)]
    if not labelled:
        by_answer: dict[str, set[str]] = defaultdict(set)
        for c in conversations:
            if has_answer(c):
                by_answer[normalise_text(answer_text(c))].add(normalise_text(prompt_text(c)))
        repeated = sorted(((a, len(p)) for a, p in by_answer.items() if len(p) >= 3), key=lambda x: -x[1])
        report.diversity["repeated_answers"] = [{"answer": a[:80], "prompts": n} for a, n in repeated[:5]]
        if repeated:
            report.warn(
                "repeated_answers",
                f"{len(repeated)} answer(s) are given to 3 or more different prompts (e.g. '{repeated[0][0][:60]}' x"
                f"{repeated[0][1]}). The model may learn to give them regardless of the prompt; vary them.",
            )
    share = report.diversity.get("largest_near_duplicate_cluster_share", 0)
    if len(prompts) >= 50 and (report.diversity["distinct_2"] < 0.05 or share > 0.1):
        report.warn(
            "low_diversity",
            f"prompts are repetitive (distinct-2 {report.diversity['distinct_2']}, largest near-duplicate cluster "
            f"{share:.0%} of the data). Add examples that cover the variety of real use.",
        )


def _luhn(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char) * (2 if index % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


def check_hygiene(report: CheckReport, conversations: list[Conversation]) -> None:
    short = [c.line for c in conversations if has_answer(c) and len(answer_text(c).strip()) < SHORT_ANSWER_CHARS]
    markers: dict[str, list[int]] = defaultdict(list)
    pii: dict[str, list[int]] = defaultdict(list)
    for c in conversations:
        text = full_text(c)
        for marker in TEMPLATE_MARKERS:
            if marker in text:
                markers[marker].append(c.line)
        for kind, pattern in PII_PATTERNS.items():
            for match in pattern.finditer(text):
                if kind != "card_number" or _luhn(re.sub(r"\D", "", match.group())):
                    pii[kind].append(c.line)
                    break
    report.hygiene = {
        "short_answers": {"count": len(short), "lines": short[:20]},
        "template_markers": {m: {"count": len(ls), "lines": ls[:20]} for m, ls in markers.items()},
        "pii": {k: {"count": len(ls), "lines": ls[:20]} for k, ls in pii.items()},
    }
    if short:
        report.warn(
            "short_answers",
            f"{len(short)} answer(s) shorter than {SHORT_ANSWER_CHARS} characters (lines "
            f"{_shown(short)}). Check they are complete.",
        )
    for marker, lines in markers.items():
        report.warn(
            "template_markers",
            f"'{marker}' appears in {len(lines)} example(s) (lines {_shown(lines)}): a "
            "leftover chat-template marker. Remove it; tunesmith adds the template itself.",
        )
    for kind, lines in pii.items():
        report.warn(
            "pii",
            f"{len(lines)} example(s) contain what looks like a {kind.replace('_', ' ')} (lines "
            f"{_shown(lines)}). Remove or mask personal data before training.",
        )


def check_leakage(
    report: CheckReport,
    conversations: list[Conversation],
    other: list[Conversation],
    other_path: str,
    options: CheckOptions,
) -> None:
    texts, others = [full_text(c) for c in conversations], [full_text(c) for c in other]
    other_keys = {normalise_text(t) for t in others}
    exact = [c.line for c, t in zip(conversations, texts, strict=True) if normalise_text(t) in other_keys]
    answers, other_answers = [answer_text(c) for c in conversations], [answer_text(c) for c in other]
    found = near_duplicates_across(texts, others, options.near_threshold, answers, other_answers)
    near = sorted({conversations[i].line for i, _ in found})
    ngram = [conversations[i].line for i in ngram_overlaps(texts, others)]
    report.leakage = {
        "against": other_path,
        "exact": {"count": len(exact), "lines": exact},
        "near_duplicate": {"count": len(near), "lines": near},
        "ngram": {"count": len(ngram), "lines": ngram},
    }
    if exact or near or ngram:
        report.warn(
            "leakage",
            f"{len(exact)} exact, {len(near)} near-duplicate and {len(ngram)} n-gram overlap(s) with {other_path} "
            f"(lines {_shown(sorted(set(exact + near + ngram)))}). Remove them from one file, or re-split with "
            "`tunesmith data split`.",
        )


def check_data(
    path: str | Path,
    fmt: str = "auto",
    tokenizer: Any = None,
    options: CheckOptions | None = None,
    against: str | Path | None = None,
) -> CheckReport:
    """Run every check on one data file. Raises TunesmithError only if the file cannot be read."""
    prompt_only = bool(options and options.for_rewards)
    return check_parsed(parse_file(path, fmt, prompt_only), tokenizer, options, against, fmt)[0]


def check_parsed(
    parsed: ParsedFile,
    tokenizer: Any = None,
    options: CheckOptions | None = None,
    against: str | Path | None = None,
    fmt: str = "auto",
) -> tuple[CheckReport, list[tuple[int, int]]]:
    """Every check on a file already parsed; also returns the near-duplicate pairs found (for the split).
    `fmt` is the format asked for, used for the `against` file too."""
    options = options or CheckOptions()
    path = parsed.problems.path
    conversations = parsed.conversations
    report = CheckReport(path=str(path), format=parsed.format, examples=len(conversations) + len(parsed.problems.items))
    report.errors = [{"line": line, "message": message} for line, message in parsed.problems.items]
    if report.examples < MIN_EXAMPLES:
        report.errors.append(
            {
                "line": 0,
                "message": f"only {report.examples} examples; at least {MIN_EXAMPLES} are "
                "needed to fine-tune. Add more examples.",
            }
        )
    elif len(conversations) < RECOMMENDED_EXAMPLES:
        report.warn(
            "small_dataset",
            f"{len(conversations)} valid examples; significant improvements usually need "
            f"{RECOMMENDED_EXAMPLES}-1000+ examples.",
        )
    if not conversations:
        return report, []
    report.kind = conversations[0].kind
    pairs = check_duplicates(report, conversations, options)
    if report.kind == "pair":
        check_pairs(report, conversations, options)
    elif report.kind == "kto":
        check_kto(report, conversations, options)
    else:
        # Several answers to one prompt is what pairs and KTO rows are made of; for SFT it is a conflict.
        check_conflicts(report, conversations)
    if any(c.uses_tools for c in conversations):
        check_tools(report, conversations)
    if tokenizer is not None:
        use_chat_template(tokenizer, tokenizer.chat_template, any(c.uses_tools for c in conversations))
        check_token_lengths(report, conversations, tokenizer, options)
    if options.reference_rewards is not None:
        check_references(report, conversations, options.reference_rewards)
    labels = labels_of(path, conversations, options)
    check_balance(report, labels, options)
    check_diversity(report, conversations, labelled=bool(labels))
    check_hygiene(report, conversations)
    if against is not None:
        other = parse_file(against, fmt, options.for_rewards).conversations
        check_leakage(report, conversations, other, str(against), options)
    return report, pairs
