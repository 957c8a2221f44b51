"""`tunesmith monitor`: what production traffic looks like next to the data the model was trained on.

Reads the server's request log and the run's own training split and reports:
- traffic: requests, errors, latency and time-to-first-token percentiles, tokens;
- drift: prompt length in tokens (quantiles, scipy's two-sample Kolmogorov-Smirnov statistic and
  p-value, the share of prompts longer than any training prompt) and vocabulary (Jensen-Shannon
  divergence of the word distributions, from scipy, and the share of words never seen in training);
- format: the share of answers failing the run's own format check (json_valid / json_schema from
  eval.metrics);
- feedback: ratings and corrections, which `export_feedback` turns into a dataset in tunesmith's own
  format for the next fine-tune, and `export_preferences` into preference pairs or KTO rows.
Alerts name what crossed a threshold and what to do about it.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tunesmith.data.formats import ROLES, Conversation, Message, chat_messages, read_conversations, write_jsonl
from tunesmith.data.tokenize import prompt_ids
from tunesmith.data.tools import parse_any
from tunesmith.deploy.requestlog import CLIENT_GONE, read_feedback, read_requests
from tunesmith.errors import TunesmithError
from tunesmith.files import check_file_target, write_file_atomic
from tunesmith.rundir import RunDir

WORD = re.compile(r"\w+", re.UNICODE)
# /v1/feedback takes ratings from -1 to 5; these defaults read them as 1-5 stars.
GOOD_RATING = 4.0
BAD_RATING = 2.0
LIMITS = {"error_rate": 0.05, "js_divergence": 0.2, "ks_statistic": 0.3, "format_failures": 0.05, "longer": 0.1}


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def js_divergence(p: Counter, q: Counter) -> float:
    """Jensen-Shannon divergence (base 2: 0 = same distribution, 1 = disjoint) of two word counts.

    scipy returns the Jensen-Shannon distance, the divergence's square root.
    """
    from scipy.spatial.distance import jensenshannon

    if not sum(p.values()) or not sum(q.values()):
        return 0.0
    words = sorted(set(p) | set(q))
    distance = jensenshannon([p[w] for w in words], [q[w] for w in words], base=2)
    return float(distance**2)


def _prompt_text(messages: list[dict[str, Any]]) -> str:
    """What the users and the tools said (an assistant turn that only calls has no content)."""
    return "\n".join(m.get("content") or "" for m in messages if m.get("role") != "assistant")


def _messages(row: dict[str, Any]) -> list[dict[str, str]]:
    return json.loads(row["messages"]) if row.get("messages") else []


def _format_checks(config: Any) -> dict[str, Any]:
    from tunesmith.evaluate.metrics import json_valid, schema_checker

    checks: dict[str, Any] = {}
    if "json_valid" in config.eval.metrics:
        checks["json_valid"] = json_valid
    if "json_schema" in config.eval.metrics:
        checks["json_schema"] = schema_checker(config.eval.schema_path)
    return checks


def _training_prompts(run_dir: Path) -> list[Conversation]:
    """Each training conversation up to its last answer, with its tools (its prompt is rendered with them)."""
    path = RunDir(run_dir).split("train")
    if not path.is_file():
        raise TunesmithError(
            f"{run_dir} has no {path.relative_to(run_dir)}; monitor compares traffic with the run's training split."
        )
    conversations, _ = read_conversations(path)
    prompts = []
    for conversation in conversations:
        last = max((i for i, m in enumerate(conversation.messages) if m.role == "assistant"), default=None)
        prompts.append(replace(conversation, messages=conversation.messages[:last] if last else conversation.messages))
    return prompts


def monitor_report(run_dir: str | Path, db: str | Path | None = None, since: float = 0.0) -> dict[str, Any]:
    from tunesmith.deploy.export import run_tokenizer
    from tunesmith.deploy.serve import default_log_path

    run_dir = Path(run_dir)
    config = RunDir(run_dir).read_config()
    db = Path(db) if db else default_log_path(run_dir)
    if not db.is_file():
        raise TunesmithError(f"No request log at {db}. Serve the run first (tunesmith serve {run_dir}) or pass --db.")
    rows = read_requests(db, since)
    tokenizer = run_tokenizer(run_dir)
    ok = [r for r in rows if r["status"] == 200]
    report = {
        "run": str(run_dir),
        "log": str(db),
        "traffic": _traffic(rows, ok),
        "drift": _drift(_training_prompts(run_dir), tokenizer, [r for r in ok if r["endpoint"] == "chat"]),
        "format": _format_failures(_format_checks(config), ok),
        "feedback": _feedback(db),
    }
    report["alerts"] = _alerts(report)
    return report


def _traffic(rows: list[dict[str, Any]], ok: list[dict[str, Any]]) -> dict[str, Any]:
    """Requests, errors, latency percentiles and tokens; `ok` are the rows answered with status 200."""
    # 499: the client left before its answer (serve logs those); the server did not fail them.
    failed = [r for r in rows if r["status"] not in (200, CLIENT_GONE)]
    latencies = [r["latency_ms"] for r in ok if r["latency_ms"] is not None]
    first = [r["first_token_ms"] for r in ok if r["first_token_ms"] is not None]
    span_h = (rows[-1]["created"] - rows[0]["created"]) / 3600 if len(rows) > 1 else 0.0
    return {
        "requests": len(rows),
        "errors": len(failed),
        "error_rate": round(len(failed) / len(rows), 4) if rows else 0.0,
        "client_gone": sum(r["status"] == CLIENT_GONE for r in rows),
        "by_model": dict(Counter(r["model"] for r in rows)),
        "by_status": {str(k): v for k, v in Counter(r["status"] for r in rows).items()},
        "latency_ms": {f"p{int(q * 100)}": _round(quantile(latencies, q)) for q in (0.5, 0.95, 0.99)},
        "first_token_ms": {f"p{int(q * 100)}": _round(quantile(first, q)) for q in (0.5, 0.95)},
        "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in ok),
        "completion_tokens": sum(r["completion_tokens"] or 0 for r in ok),
        "requests_per_hour": round(len(rows) / span_h, 2) if span_h else None,
    }


def _drift(train_prompts: list[Conversation], tokenizer: Any, chat: list[dict[str, Any]]) -> dict[str, Any]:
    """Prompt length and vocabulary of answered chat requests against the training prompts."""
    from scipy.stats import ks_2samp

    train_lengths = [len(prompt_ids(tokenizer, p.messages, p.tools)) for p in train_prompts]
    live_lengths = [r["prompt_tokens"] for r in chat if r["prompt_tokens"] is not None]
    train_words = Counter(
        w.lower() for p in train_prompts for m in p.messages if m.role != "assistant" for w in WORD.findall(m.content)
    )
    live_words = Counter(w.lower() for r in chat for w in WORD.findall(_prompt_text(_messages(r))))
    drift: dict[str, Any] = {"requests_compared": len(chat), "training_prompts": len(train_prompts)}
    # With no chat request that logged its prompt length there is nothing to compare; only the counts are reported.
    if not live_lengths:
        return drift
    # Prompt lengths are integers with many ties; scipy's exact and asymptotic p-values are then conservative.
    ks = ks_2samp(train_lengths, live_lengths)
    statistic, p_value = float(ks.statistic), float(ks.pvalue)
    drift["prompt_tokens"] = {
        "training": {f"p{int(q * 100)}": _round(quantile(train_lengths, q)) for q in (0.05, 0.5, 0.95)},
        "production": {f"p{int(q * 100)}": _round(quantile(live_lengths, q)) for q in (0.05, 0.5, 0.95)},
        "ks_statistic": round(statistic, 4),
        "ks_p_value": float(f"{p_value:.3g}"),
        "longer_than_training": round(sum(x > max(train_lengths) for x in live_lengths) / len(live_lengths), 4),
    }
    unseen = sum(count for word, count in live_words.items() if word not in train_words)
    drift["vocabulary"] = {
        "js_divergence": round(js_divergence(train_words, live_words), 4),
        "unseen_word_share": round(unseen / max(1, sum(live_words.values())), 4),
        "top_unseen": [
            w for w, _ in Counter({w: c for w, c in live_words.items() if w not in train_words}).most_common(10)
        ],
    }
    return drift


def _format_failures(checks: dict[str, Any], ok: list[dict[str, Any]]) -> dict[str, Any]:
    """Per format check, how many logged answers fail it, their share and the first few request ids."""
    answered = [r for r in ok if r["output"] is not None]
    formats: dict[str, Any] = {"checks": list(checks)}
    for name, check in checks.items():
        failing = [r["id"] for r in answered if not check(r["output"], "")]
        formats[name] = {
            "failing": len(failing),
            "share": round(len(failing) / len(answered), 4) if answered else 0.0,
            "examples": failing[:5],
        }
    return formats


def _feedback(db: Path) -> dict[str, Any]:
    feedback = read_feedback(db)
    ratings = [f["rating"] for f in feedback if f["rating"] is not None]
    return {
        "count": len(feedback),
        "mean_rating": round(sum(ratings) / len(ratings), 3) if ratings else None,
        "corrections": sum(1 for f in feedback if f["correction"]),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _alerts(report: dict[str, Any]) -> list[str]:
    alerts = []
    traffic, drift = report["traffic"], report["drift"]
    if traffic["requests"] and traffic["error_rate"] > LIMITS["error_rate"]:
        alerts.append(
            f"{traffic['error_rate']:.0%} of requests failed (by status: {traffic['by_status']}); "
            "read the log's error column."
        )
    lengths = drift.get("prompt_tokens")
    if lengths and lengths["ks_statistic"] > LIMITS["ks_statistic"] and lengths["ks_p_value"] < 0.01:
        alerts.append(
            f"Prompt lengths drifted from training (KS D={lengths['ks_statistic']}, p={lengths['ks_p_value']}): "
            "production prompts are not like the training prompts; collect and label some for the next run."
        )
    if lengths and lengths["longer_than_training"] > LIMITS["longer"]:
        alerts.append(f"{lengths['longer_than_training']:.0%} of prompts are longer than any training prompt.")
    vocabulary = drift.get("vocabulary")
    if vocabulary and vocabulary["js_divergence"] > LIMITS["js_divergence"]:
        alerts.append(
            f"Vocabulary drifted (Jensen-Shannon {vocabulary['js_divergence']}, {vocabulary['unseen_word_share']:.0%} "
            f"of words unseen in training, e.g. {', '.join(vocabulary['top_unseen'][:5])})."
        )
    for name in report["format"]["checks"]:
        share = report["format"][name]["share"]
        if share > LIMITS["format_failures"]:
            alerts.append(
                f"{share:.0%} of answers fail {name}; export the corrections (tunesmith monitor export RUN "
                "--out FILE) and retrain."
            )
    return alerts


def export_feedback(
    run_dir: str | Path,
    target: str | Path,
    db: str | Path | None = None,
    min_rating: float | None = None,
    overwrite: bool = False,
) -> int:
    """Write corrected (and, with min_rating, well-rated) answers as chat examples; returns how many."""
    target = Path(target)
    latest = _latest_feedback(run_dir, db)
    check_file_target(target, overwrite, "a feedback export")
    conversations = []
    for item in latest:
        if item["endpoint"] != "chat":
            continue
        if item["correction"]:
            answer = item["correction"]
        elif min_rating is not None and item["rating"] is not None and item["rating"] >= min_rating and item["output"]:
            answer = item["output"]
        else:
            continue
        messages = tuple(chat_messages(json.loads(item["messages"])))
        tools = tuple(json.loads(item["tools"])) if item.get("tools") else ()
        conversations.append(Conversation(messages=(*messages, _answer_turn(answer)), tools=tools))
    if not conversations:
        raise TunesmithError("No feedback with a correction (or a rating at or above --min-rating) to export yet.")
    write_file_atomic(target, lambda tmp: write_jsonl(tmp, conversations), overwrite, "a feedback export")
    return len(conversations)


def _answer_turn(text: str) -> Message:
    """A logged answer or a correction as an assistant turn: calls written in it (as the server logs an answer's
    output, call markup and all) become its tool calls, so a corrected call is learned as a call."""
    parsed = parse_any(text)
    if parsed.tool_calls and not parsed.malformed:
        return Message("assistant", parsed.content, parsed.tool_calls, parsed.reasoning)
    return Message("assistant", text)


def _latest_feedback(run_dir: str | Path, db: str | Path | None) -> list[dict[str, Any]]:
    """Each rated or corrected response once, with its newest feedback (joined with the request)."""
    from tunesmith.deploy.serve import default_log_path

    db = Path(db) if db else default_log_path(Path(run_dir))
    if not db.is_file():
        raise TunesmithError(f"No request log at {db}. Serve the run first or pass --db.")
    latest: dict[str, dict[str, Any]] = {}
    for item in read_feedback(db):  # ordered by time: the newest feedback on a response wins
        latest[item["request_id"]] = item
    return list(latest.values())


@dataclass
class PreferenceExport:
    """What `export_preferences` wrote: rows of one kind ("pair" or "kto") and where they came from."""

    target: str
    kind: str
    rows: int
    from_corrections: int
    from_ratings: int
    good_rating: float
    bad_rating: float
    dropped_conflicts: int


@dataclass(frozen=True)
class _Answer:
    text: str
    model: str | None  # None: a person's correction
    request: str
    source: str


def _prompt_of(item: dict[str, Any]) -> tuple[Message, ...] | None:
    """The chat prompt of a logged request, or None when it cannot be a training prompt."""
    if item["endpoint"] != "chat" or not item["messages"]:
        return None
    turns = json.loads(item["messages"])
    if not turns or any(t.get("role") not in ROLES or not isinstance(t.get("content"), str) for t in turns):
        return None
    if turns[-1]["role"] == "assistant":
        return None
    return tuple(Message(t["role"], t["content"]) for t in turns)


def _thresholds(items: list[dict[str, Any]], good: float | None, bad: float | None) -> tuple[float, float]:
    ratings = [item["rating"] for item in items if item["rating"] is not None]
    if (good is None or bad is None) and ratings and max(ratings) <= 1:
        raise TunesmithError(
            "Every rating in the log is 1 or below: thumbs up/down (1 and -1 or 0) rather than the 1-5 stars the "
            f"default --good-rating {GOOD_RATING:g} and --bad-rating {BAD_RATING:g} assume. Pass both for the "
            "clients' scale, e.g. --good-rating 1 --bad-rating 0."
        )
    good = GOOD_RATING if good is None else good
    bad = BAD_RATING if bad is None else bad
    if bad >= good:
        raise TunesmithError(f"--bad-rating {bad:g} must be below --good-rating {good:g}.")
    return good, bad


def _record(prompt: tuple[Message, ...]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in prompt]


def _same(first: str, second: str) -> bool:
    return " ".join(first.split()) == " ".join(second.split())


def export_preferences(
    run_dir: str | Path,
    target: str | Path,
    db: str | Path | None = None,
    good_rating: float | None = None,
    bad_rating: float | None = None,
    kto: bool = False,
    overwrite: bool = False,
) -> PreferenceExport:
    """Write served traffic's feedback as preference pairs (or, with `kto`, KTO rows) for `data check` and training.

    Pairs: a correction (chosen) against the model's answer (rejected); and for one prompt, answers rated at least
    `good_rating` against answers rated at most `bad_rating`, each answer used at least once. KTO rows: corrections
    and well-rated answers are desirable, corrected and poorly rated answers undesirable. An answer rated both well
    and poorly for one prompt is dropped. Every row names the served model that wrote each side (None: a person).
    """
    target = Path(target)
    items = _latest_feedback(run_dir, db)
    check_file_target(target, overwrite, "a preference export")
    good_rating, bad_rating = _thresholds(items, good_rating, bad_rating)
    # Per prompt: (answer, desirable) for every rated or corrected answer, in the order of the log.
    judged: dict[tuple[Message, ...], list[tuple[_Answer, bool]]] = defaultdict(list)
    for item in items:
        prompt = _prompt_of(item)
        if prompt is None:
            continue
        output = item["output"] if item["output"] and item["output"].strip() else None
        if item["correction"] and item["correction"].strip():
            judged[prompt].append((_Answer(item["correction"], None, item["request_id"], "correction"), True))
            if output is not None and not _same(output, item["correction"]):
                judged[prompt].append((_Answer(output, item["model"], item["request_id"], "correction"), False))
        elif output is not None and item["rating"] is not None:
            if item["rating"] >= good_rating:
                judged[prompt].append((_Answer(output, item["model"], item["request_id"], "rating"), True))
            elif item["rating"] <= bad_rating:
                judged[prompt].append((_Answer(output, item["model"], item["request_id"], "rating"), False))
    rows: list[dict[str, Any]] = []
    dropped = 0
    for prompt, answers in judged.items():
        verdicts: dict[str, set[bool]] = defaultdict(set)
        for answer, desirable in answers:
            verdicts[" ".join(answer.text.split())].add(desirable)
        clear = [(a, d) for a, d in answers if len(verdicts[" ".join(a.text.split())]) == 1]
        dropped += len(answers) - len(clear)
        rows += _kto_rows(prompt, clear) if kto else _pair_rows(prompt, clear)
    if not rows:
        raise TunesmithError(
            "No feedback to export as preferences yet: it takes a correction, or for one prompt an answer rated at "
            f"least {good_rating:g} and one rated at most {bad_rating:g}"
            + (" (with --kto: one rated answer)." if kto else ".")
        )
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    write_file_atomic(target, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite, "a preference export")
    return PreferenceExport(
        target=str(target),
        kind="kto" if kto else "pair",
        rows=len(rows),
        from_corrections=sum(row["source"] == "correction" for row in rows),
        from_ratings=sum(row["source"] == "rating" for row in rows),
        good_rating=good_rating,
        bad_rating=bad_rating,
        dropped_conflicts=dropped,
    )


def _pair_rows(prompt: tuple[Message, ...], answers: list[tuple[_Answer, bool]]) -> list[dict[str, Any]]:
    """Correction pairs first, then the prompt's well-rated answers against its poorly rated ones."""
    rows, seen = [], set()

    def add(chosen: _Answer, rejected: _Answer, source: str) -> None:
        key = (" ".join(chosen.text.split()), " ".join(rejected.text.split()))
        if key in seen or _same(chosen.text, rejected.text):
            return
        seen.add(key)
        rows.append(
            {
                "prompt": _record(prompt),
                "chosen": chosen.text,
                "rejected": rejected.text,
                "chosen_model": chosen.model,
                "rejected_model": rejected.model,
                "source": source,
                "chosen_request": chosen.request,
                "rejected_request": rejected.request,
            }
        )

    by_request: dict[str, list[_Answer]] = defaultdict(list)
    for answer, _ in answers:
        if answer.source == "correction":
            by_request[answer.request].append(answer)
    for correction, *model_answer in by_request.values():
        if model_answer:
            add(correction, model_answer[0], "correction")
    good = [a for a, desirable in answers if desirable and a.source == "rating"]
    bad = [a for a, desirable in answers if not desirable and a.source == "rating"]
    if good and bad:
        for index in range(max(len(good), len(bad))):
            add(good[index % len(good)], bad[index % len(bad)], "rating")
    return rows


def _kto_rows(prompt: tuple[Message, ...], answers: list[tuple[_Answer, bool]]) -> list[dict[str, Any]]:
    rows, seen = [], set()
    for answer, desirable in answers:
        key = " ".join(answer.text.split())
        if key in seen:
            continue
        seen.add(key)
        rows.append(
            {
                "prompt": _record(prompt),
                "completion": answer.text,
                "label": desirable,
                "completion_model": answer.model,
                "source": answer.source,
                "request": answer.request,
            }
        )
    return rows
