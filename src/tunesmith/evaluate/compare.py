"""`tunesmith eval` and `tunesmith compare`: score a model on a split, and base versus tuned with statistics.

Both generate on the run's saved split with the run's own chat rendering (greedy by default), save
every prediction, and score with the metrics of `eval.metrics`. Compare scores base and tuned on the
same items and reports, per metric, both values, the paired difference with a bootstrap 95% CI and a
p-value (Holm-corrected for all but the first, primary, metric), win/tie/loss counts and the items that
flipped on a per-item metric, and a verdict on the primary metric that says when nothing is significant.
`read_comparison` is the one reader of compare.json: every other module reads a comparison through it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.progress import Progress

from tunesmith.data.formats import Conversation
from tunesmith.data.tokenize import tokenize_all
from tunesmith.errors import TunesmithError
from tunesmith.evaluate import baselines, stats
from tunesmith.evaluate import metrics as m
from tunesmith.evaluate.general import general_ability
from tunesmith.evaluate.generate import generate, load_run
from tunesmith.evaluate.reward_scores import RewardScores, paired, score_answers
from tunesmith.files import json_line, own_dir, replacing, write_json
from tunesmith.generation import generation_view
from tunesmith.objectives.preference import prefers_chosen, tokenize_preferences
from tunesmith.objectives.reward_model import fresh_head, load_reward_model
from tunesmith.rundir import RunDir
from tunesmith.train.batching import collate
from tunesmith.train.loss import model_loss_sum

if TYPE_CHECKING:
    from tunesmith.config import EvalConfig

SPLITS = ("test", "val", "train")
# What preference accuracy counts, for a preference run (the default of a compare.json without `measure`) and a
# reward model.
PER_TOKEN = "a higher log-probability per token than the rejected one"
REWARD_SCORE = "a higher reward-model score than the rejected one (a tie counts half)"
COMPARE_VERSION = 2  # compare.json's shape; a file without `version` is version 1 (see _from_version_1)


@dataclass
class EvalSummary:
    run_dir: str
    split: str
    model: str  # "tuned" or "base"
    items: int
    metrics: dict[str, float]
    loss: float | None
    perplexity: float | None
    field_accuracy: dict[str, float] = field(default_factory=dict)
    confusion: dict[str, dict[str, int]] | None = None
    predictions: str = ""


@dataclass
class Versus:
    """The tuned model against one baseline on the same items: per-metric paired statistics (the primary
    metric tested alone, the others Holm-corrected), per-item wins/ties/losses and flips, and a verdict."""

    against: str  # the baseline's name, "zero_shot" or "few_shot": its answers' column in the item rows
    label: str  # the baseline as people read it: "zero-shot", "3-shot"
    metrics: dict[str, dict[str, Any]]  # name -> base (this baseline's value), tuned, diff, CI, p-values
    decided_by: str  # the per-item metric whose scores give wins, ties, losses and flipped items
    wins: int
    ties: int
    losses: int
    flipped: dict[str, list[dict[str, Any]]]
    verdict: str | None  # None in a comparison read from a version-1 file, which kept no zero-shot verdict


@dataclass
class CompareSummary:
    """compare.json: the tuned model against each prompting baseline (one `Versus` each, the same shape), and the
    verdict against the strongest. Contestants are named "zero_shot", "few_shot" and "tuned" throughout: baselines,
    strongest, seconds, field_accuracy and the answer columns of the item rows."""

    run_dir: str
    split: str
    items: int
    primary: str  # eval.metrics[0]: the verdict's metric, tested alone
    decided_by: str  # the per-item metric whose scores give wins, ties, losses and flipped items
    correction: str  # how the secondary metrics' p-values are corrected for multiple comparisons
    baselines: dict[str, Versus]  # "zero_shot", then "few_shot" when at least one shot fits the context
    verdict: str  # against the strongest prompting baseline
    examples: list[dict[str, Any]]  # the first item rows: every contestant's answer and scores
    field_accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    general_ability: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    shots: int = 0  # solved examples in each few-shot prompt (0: no few-shot baseline)
    strongest: str = "zero_shot"  # the key in `baselines` of the baseline the verdict is against
    chosen_on: str = ""  # the split (and primary-metric scores) the strongest baseline was chosen on
    seconds: dict[str, float] = field(default_factory=dict)  # generation time per contestant on the compared items
    preference: dict[str, Any] | None = None  # preference runs: how often each model prefers the chosen answer
    # A run that began from another (init_from: SFT then DPO or RL) against that starting run's answers, zero-shot
    # like the tuned model's: what this run added. Its answers are the item rows' "start" column.
    start: Versus | None = None
    # A grpo run: its rl.rewards on every contestant's answers (evaluate/reward_scores.py): the rewards used and
    # skipped (code not allowed on this command line), per contestant each reward's mean and the items skipped.
    # The combined reward is also a compared row ("reward") of every Versus.
    rewards: dict[str, Any] | None = None
    version: int = COMPARE_VERSION


def _answer_to_learn(conversation: Conversation) -> bool:
    """Whether the conversation's answer is one to imitate: not a KTO row marked undesirable."""
    return conversation.reference is not None and conversation.label is not False


def split_items(run_dir: Path, split: str, limit: int | None) -> list[Conversation]:
    if split not in SPLITS:
        raise TunesmithError(f"--split {split!r}: choose one of {', '.join(SPLITS)}.")
    path = RunDir(run_dir).split(split)
    if not path.is_file():
        raise TunesmithError(f"{path} does not exist: this run has no {split} split.")
    read = RunDir(run_dir).read_split(split)
    if read and all(c.text is not None for c in read):
        raise TunesmithError(
            f"{path}: plain-text (pretraining) records have no prompt and answer to compare. Measure such a run "
            "with eval.lm_eval_tasks (tunesmith eval), or train on chat or prompt/completion data."
        )
    items = [c for c in read if _answer_to_learn(c)][:limit]
    if read and all(c.text is None and c.reference is None for c in read):
        raise TunesmithError(
            f"{path} holds prompts without answers (objective grpo), and compare scores answers against the "
            "reference answers. Give the test prompts their answers (data.test_path) to compare this run."
        )
    if not items:
        raise TunesmithError(f"{path} is empty; set data.test_fraction / data.test_path (or val) and train again.")
    return items


@torch.inference_mode()
@torch.no_grad()
def item_losses(model: Any, tokenizer: Any, items: list[Conversation], config: Any) -> list[tuple[float, int]]:
    """(summed answer-token loss, answer tokens) per item, teacher-forced, as in training."""
    examples, _ = tokenize_all(tokenizer, items, config.data.max_length, config.data.train_on, config.data.reasoning)
    by_line = {e.line: e for e in examples}
    device = next(model.parameters()).device
    results: list[tuple[float, int]] = []
    for item in items:
        example = by_line.get(item.line)
        if example is None:
            results.append((0.0, 0))
            continue
        batch = {k: v.to(device) for k, v in collate([example], tokenizer.pad_token_id).items() if k != "real_tokens"}
        count = int((batch["labels"][:, 1:] != -100).sum())
        results.append((float(model_loss_sum(model, batch)), count))
    return results


@torch.no_grad()
def mean_answer_loss(model: Any, examples: list[Any], pad_id: int, batch_size: int) -> float:
    """Answer-token loss averaged over every answer token of the examples, teacher-forced as in training."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id)
        batch = {k: v.to(device) for k, v in batch.items() if k != "real_tokens"}
        total += float(model_loss_sum(model, batch))
        count += int((batch["labels"][:, 1:] != -100).sum())
    return total / max(1, count)


def _generate(
    loaded: Any,
    prompts: list[tuple[Any, ...]],
    base: bool,
    console: Console,
    label: str,
    stops: list[str],
    tools: list[tuple[dict[str, Any], ...]],
) -> list[str]:
    """Each prompt's answer, rendered with the tools of its item (`tools`, in the same order)."""
    eval_config = loaded.config.eval
    if eval_config.temperature > 0:
        torch.manual_seed(eval_config.seed)  # sampled answers repeat for the same eval.seed
    with Progress(console=console, disable=not console.is_terminal) as progress:
        task = progress.add_task(f"generate ({label})", total=len(prompts))
        with loaded.base_only() if base else nullcontext():
            return generate(
                loaded.model,
                loaded.tokenizer,
                prompts,
                eval_config.max_new_tokens,
                eval_config.batch_size,
                progress=lambda n: progress.advance(task, n),
                temperature=eval_config.temperature,
                top_p=eval_config.top_p,
                stops=stops,
                tools=tools,
            )


def _loss_of(losses: list[tuple[float, int]]) -> tuple[float | None, float | None]:
    tokens = sum(n for _, n in losses)
    if not tokens:
        return None, None
    loss = sum(s for s, _ in losses) / tokens
    return round(loss, 6), round(math.exp(min(loss, 50)), 4)


def _classification(names: list[str]) -> bool:
    return any(n in ("accuracy", "macro_f1") for n in names)


def eval_run(
    run_dir: str | Path,
    split: str = "test",
    base: bool = False,
    limit: int | None = None,
    console: Console | None = None,
) -> EvalSummary:
    console = console or Console(stderr=True)
    run_dir = Path(run_dir)
    loaded = load_run(run_dir, base=base)
    eval_config = loaded.config.eval
    items = split_items(run_dir, split, limit or eval_config.limit)
    label = "base" if base else "tuned"
    references = [str(c.reference) for c in items]
    stops = baselines.turn_stops(loaded.tokenizer)
    tools = [c.tools for c in items]
    predictions = _generate(loaded, [c.prompt_messages for c in items], False, console, label, stops, tools)
    per_item = m.score(eval_config.metrics, predictions, references, eval_config.schema_path)
    values = {k: round(v, 6) for k, v in m.summary(per_item, eval_config.metrics, predictions, references).items()}
    loss, perplexity = _loss_of(item_losses(loaded.model, loaded.tokenizer, items, loaded.config))
    layout = RunDir(run_dir)
    own_dir(layout.eval)
    path = layout.eval_predictions(split, label)
    with replacing(path) as handle:
        for item, prediction, *scores in zip(items, predictions, *per_item.values(), strict=True):
            row = {"line": item.line, "prompt": item.prompt_messages[-1].content, "reference": str(item.reference)}
            row |= {"prediction": prediction, "scores": dict(zip(per_item, scores, strict=True))}
            handle.write(json_line(row))
    summary = EvalSummary(
        str(run_dir),
        split,
        label,
        len(items),
        values,
        loss,
        perplexity,
        m.field_accuracy(predictions, references),
        m.confusion(predictions, references) if _classification(eval_config.metrics) else None,
        str(path),
    )
    write_json(layout.eval_summary(split, label), asdict(summary))
    return summary


def compare_run(
    run_dir: str | Path, limit: int | None = None, console: Console | None = None, split: str = "test"
) -> CompareSummary:
    """Generate with the base model (zero-shot and few-shot) and the tuned model on the same items and compare
    the tuned model with each prompting baseline, with paired statistics; the verdict is against the strongest
    baseline, chosen on the validation split (choosing on the compared items would flatter it)."""
    console = console or Console(stderr=True)
    run_dir = Path(run_dir)
    if RunDir(run_dir).read_config_fields().get("objective") == "reward_model":
        return compare_reward_model(run_dir, split)
    loaded = load_run(run_dir)
    # A PEFT run answers as its base with the adapter off, so it needs no second copy of the weights.
    base = loaded if loaded.shares_base else load_run(run_dir, base=True)
    eval_config = loaded.config.eval
    every = split_items(run_dir, split, None)  # preference accuracy scores them all (no generation)
    items = every[: limit or eval_config.limit]
    references = [str(c.reference) for c in items]
    pool = _shot_pool(run_dir, eval_config)
    prompting = _prompting(loaded, base, items, pool)
    with generation_view(loaded.model):  # packed and merged once for every contestant of the same model
        outputs, seconds = _answers(loaded, base, prompting, items, [c.prompt_messages for c in items], console)
        start = time.perf_counter()
        strongest, chosen_on = _strongest(run_dir, loaded, base, prompting, pool, split, limit, console)
        seconds["choosing the strongest baseline"] = round(time.perf_counter() - start, 2)
    started = _start_answers(loaded, items, console, outputs, seconds)
    base_losses, tuned_losses = _losses_of_both(loaded, base, items)
    scores = {
        label: m.score(eval_config.metrics, outputs[label], references, eval_config.schema_path) for label in outputs
    }
    rows = _compare_rows(items, references, outputs, scores)
    losses = _compare_losses(eval_config, base_losses, tuned_losses)  # the base's own, so against zero-shot only
    rewarded = score_answers(loaded.config, loaded.tokenizer, items, outputs)
    versus = {
        b.name: _versus(
            eval_config, b, prompting, scores, outputs, references, rows,
            (losses if b.name == "zero_shot" else {}) | _reward_row(eval_config, rewarded, b.name),
        )
        for b in prompting
    }  # fmt: skip
    if started is not None:
        start_extra = _reward_row(eval_config, rewarded, "start")
        start_versus = _versus(eval_config, started, [started], scores, outputs, references, rows, start_extra)
        start_versus.label = f"start ({loaded.config.init_from})"
    primary = eval_config.metrics[0]
    summary = CompareSummary(
        run_dir=str(run_dir),
        split=split,
        items=len(items),
        primary=primary,
        decided_by=versus["zero_shot"].decided_by,
        correction=SECONDARY_CORRECTION,
        baselines=versus,
        verdict=_nothing_works(primary, _contestant_values(versus, primary), len(items))
        or _final_verdict(versus[strongest], primary, chosen_on),
        examples=rows[:3],
        field_accuracy={label: m.field_accuracy(outputs[label], references) for label in outputs},
        shots=prompting[-1].k,
        strongest=strongest,
        chosen_on=chosen_on,
        seconds=seconds,
        start=start_versus if started is not None else None,
        rewards=rewarded.summary if rewarded else None,
    )
    if summary.start is not None:
        summary.verdict += f" Against the starting run {loaded.config.init_from}: {summary.start.verdict}"
    if eval_config.lm_eval_tasks:
        summary.general_ability = general_ability(loaded, base, eval_config)
    if items[0].kind == "pair":  # every held-out pair: a forward pass each, no generation, so no eval.limit
        summary.preference = _preference_accuracy(loaded, base, every)
    _write_compare(RunDir(run_dir), rows, summary)
    return summary


def _reward_row(eval_config: EvalConfig, rewarded: RewardScores | None, against: str) -> dict[str, dict[str, Any]]:
    """A grpo run's combined reward, tuned against one contestant on the items both were scored on, as one more
    compared row (a secondary: Holm-corrected with the others); nothing for other runs."""
    base, tuned = paired(rewarded, against)
    if not tuned:
        return {}
    compared = stats.compare_per_item("reward", base, tuned, False, eval_config.bootstrap, eval_config.seed)
    return {"reward": compared.to_dict() | {"items": len(tuned)}}


def _shot_pool(run_dir: Path, eval_config: EvalConfig) -> list[Conversation]:
    """The training examples few-shot prompts draw from; none when eval.shots is 0 or the run kept no train split."""
    if eval_config.shots == 0 or not RunDir(run_dir).split("train").is_file():
        return []
    return [c for c in RunDir(run_dir).read_split("train") if _answer_to_learn(c)]


def _prompting(loaded: Any, base: Any, items: list[Conversation], pool: list[Conversation]) -> list[baselines.Baseline]:
    """The prompting baselines on `items`: zero-shot, and few-shot from `pool` when it is not empty and
    at least one shot fits the model's context."""
    eval_config = loaded.config.eval
    zero = baselines.zero_shot(items)
    if not pool:
        return [zero]
    few = baselines.few_shot(
        loaded.tokenizer,
        items,
        pool,
        shots=eval_config.shots,
        limit=baselines.context_limit(base.model),
        max_new_tokens=eval_config.max_new_tokens,
        seed=eval_config.seed,
        similar=eval_config.similar_shots,
    )
    return [zero, few] if few.k else [zero]


def _answers(
    loaded: Any,
    base: Any,
    prompting: list[baselines.Baseline],
    items: list[Conversation],
    tuned: list[tuple[Any, ...]] | None,
    console: Console,
) -> tuple[dict[str, list[str]], dict[str, float]]:
    """Every contestant's answers to `items` (the tuned model's to `tuned` unless None), each stopped at the
    template's turn boundary and rendered with its item's tools, and its generation seconds."""
    stops = baselines.turn_stops(loaded.tokenizer)
    contestants = [(b.name, base, b.prompts, base is loaded, _label(prompting, b.name)) for b in prompting]
    if tuned is not None:
        contestants.append(("tuned", loaded, tuned, False, "tuned"))
    outputs, seconds = {}, {}
    for name, model, prompts, as_base, label in contestants:
        start = time.perf_counter()
        outputs[name] = _generate(model, prompts, as_base, console, label, stops, [c.tools for c in items])
        seconds[name] = round(time.perf_counter() - start, 2)
    return outputs, seconds


def _start_answers(
    loaded: Any, items: list[Conversation], console: Console, outputs: dict[str, list[str]], seconds: dict[str, float]
) -> baselines.Baseline | None:
    """For a run that began from another (init_from), that run's answers to the tuned model's prompts, added to
    `outputs` and `seconds` as "start"; its model is loaded for them and dropped after. None for other runs."""
    init_from = loaded.config.init_from
    if not init_from:
        return None
    if not Path(init_from).is_dir():
        console.print(f"[yellow]The starting run {init_from} is not here: compared with the base model only.[/]")
        return None
    began = time.perf_counter()
    started = load_run(init_from)
    prompts = [c.prompt_messages for c in items]
    stops, tools = baselines.turn_stops(loaded.tokenizer), [c.tools for c in items]
    outputs["start"] = _generate(started, prompts, False, console, "start", stops, tools)
    seconds["start"] = round(time.perf_counter() - began, 2)
    del started
    return baselines.Baseline("start", 0, prompts)


def _label(prompting: list[baselines.Baseline], name: str) -> str:
    k = next((b.k for b in prompting if b.name == name), 0)
    return f"{k}-shot" if k else "zero-shot"


def _strongest(
    run_dir: Path,
    loaded: Any,
    base: Any,
    prompting: list[baselines.Baseline],
    pool: list[Conversation],
    split: str,
    limit: int | None,
    console: Console,
) -> tuple[str, str]:
    """The prompting baseline with the best primary metric on the validation split, and how it was chosen.
    Without a separate validation split the few-shot baseline is taken (the usual stronger one) and said so."""
    if len(prompting) == 1:
        return prompting[0].name, "the only prompting baseline (no few-shot examples fit or eval.shots is 0)"
    eval_config = loaded.config.eval
    try:
        items = split_items(run_dir, "val", limit or eval_config.limit) if split != "val" else []
    except TunesmithError:
        items = []
    if not items:
        return "few_shot", "no separate validation split: the few-shot baseline is taken as the stronger"
    chosen = _prompting(loaded, base, items, pool)
    if len(chosen) == 1:
        return "zero_shot", "the few-shot prompts of the validation split do not fit the context"
    outputs, _ = _answers(loaded, base, chosen, items, None, console)
    references = [str(c.reference) for c in items]
    primary = eval_config.metrics[0]
    value = {
        b.name: baselines.metric_value(primary, outputs[b.name], references, eval_config.schema_path) for b in chosen
    }
    strongest = max(value, key=lambda name: (value[name], name == "zero_shot"))  # a tie goes to the cheaper one
    shown = ", ".join(f"{_label(chosen, name)} {score:.3f}" for name, score in value.items())
    return strongest, f"{primary} on {len(items)} validation items: {shown}"


def _versus(
    eval_config: EvalConfig,
    baseline: baselines.Baseline,
    prompting: list[baselines.Baseline],
    scores: dict[str, dict[str, list[float]]],
    outputs: dict[str, list[str]],
    references: list[str],
    rows: list[dict[str, Any]],
    extra: dict[str, dict[str, Any]],
) -> Versus:
    """The tuned model against one baseline's answers to the same items; `extra` holds further compared
    metrics (the answer loss), corrected for multiple comparisons with the others."""
    pair = {"base": scores[baseline.name], "tuned": scores["tuned"]}
    answers = {"base": outputs[baseline.name], "tuned": outputs["tuned"]}
    compared = compare_metrics(eval_config, pair, answers, references)
    results = {name: result.to_dict() for name, result in compared.items()} | extra
    primary = eval_config.metrics[0]
    _correct_secondaries(primary, results)
    decided_by = m.deciding_metric(eval_config.metrics)
    decider_base, decider_tuned = _deciding_scores(decided_by, pair, answers, references, eval_config.schema_path)
    wins, ties, losses = stats.wins_ties_losses(decider_base, decider_tuned)
    flipped = _flipped(rows, decider_base, decider_tuned)
    verdict = stats.verdict(primary, compared[primary])
    label = _label(prompting, baseline.name)
    return Versus(baseline.name, label, results, decided_by, wins, ties, losses, flipped, verdict)


def _contestant_values(versus: dict[str, Versus], primary: str) -> dict[str, float]:
    """Every contestant's primary-metric value on the compared items: each prompting baseline, then the tuned model."""
    values = {v.label: float(v.metrics[primary]["base"]) for v in versus.values()}
    return values | {"tuned": float(versus["zero_shot"].metrics[primary]["tuned"])}


def _nothing_works(primary: str, values: dict[str, float], items: int) -> str | None:
    """The verdict when every contestant scores 0 on the primary metric (the floor of every built-in metric), else
    None. A tie at the floor is no evidence that prompting is as good: neither works yet."""
    if any(abs(value) > 1e-12 for value in values.values()):
        return None
    shown = ", ".join(f"{label} {value:.3f}" for label, value in values.items())
    return (
        f"Neither prompting nor fine-tuning works yet for {primary}: {shown} on {items} items, every one at the "
        "floor, so this says nothing about which is better. Try training longer or with a higher learning rate "
        "(train.max_steps or train.epochs, train.lr), a larger model, and check the data and the metric: read "
        f"eval/predictions.jsonl to see whether the answers come near the references and whether {primary} "
        "measures what you want."
    )


def _final_verdict(versus: Versus, primary: str, chosen_on: str) -> str:
    """Whether the tuned model beat the strongest prompting baseline on the primary metric, in plain words."""
    result, label = versus.metrics[primary], versus.label
    detail = (
        f"{primary} {label} {result['base']:.3f} -> tuned {result['tuned']:.3f} (diff {result['diff']:+.3f}, 95% CI "
        f"[{result['ci_low']:+.3f}, {result['ci_high']:+.3f}], {result['p_text']}, {result['test']}); strongest "
        f"baseline chosen by {chosen_on}"
    )
    if not result["significant"]:
        items = versus.wins + versus.ties + versus.losses
        return (
            f"Prompting is as good: fine-tuning not needed for {primary}, as far as {items} items can tell (no "
            f"significant difference; more test items could show a smaller effect). {label} prompting vs tuned: "
            f"{detail}."
        )
    if result["diff"] > 0:
        return f"Fine-tuning beat the strongest prompting baseline ({label}): {detail}."
    return f"Prompting is better: {label} prompting beat the tuned model: {detail}."


def _preference_accuracy(loaded: Any, base: Any, items: list[Conversation]) -> dict[str, Any]:
    """On held-out pairs, how often the base, the starting model (init_from's run, when there is one) and the
    tuned model give the chosen answer a higher per-token log-probability than the rejected one; the tuned
    model against each, paired (McNemar's exact test)."""
    config, tokenizer = loaded.config, loaded.tokenizer
    examples, _ = tokenize_preferences(tokenizer, items, config.data.max_length, "pair")
    pad, size = tokenizer.pad_token_id, config.eval.batch_size
    with base.base_only() if base is loaded else nullcontext():
        wins = {"base": prefers_chosen(base.model, examples, pad, size)}
    if config.init_from:
        wins["start"] = prefers_chosen(load_run(config.init_from).model, examples, pad, size)
    wins["tuned"] = prefers_chosen(loaded.model, examples, pad, size)
    result: dict[str, Any] = {"items": len(examples), "start_run": config.init_from, "measure": PER_TOKEN}
    result |= {name: round(sum(values) / max(1, len(values)), 4) for name, values in wins.items()}
    for against in ("base", "start"):
        if against in wins and examples:
            compared = stats.compare_per_item(
                "preference_accuracy", wins[against], wins["tuned"], True, config.eval.bootstrap, config.eval.seed
            )
            result[f"tuned_vs_{against}"] = compared.to_dict()
    return result


def compare_reward_model(run_dir: Path, split: str = "test") -> CompareSummary:
    """A reward model scores answers rather than writing them: its comparison is held-out pair accuracy of the trained
    scorer against its untrained start (the base, and init_from's run when there is one, each with the fresh head
    training began with), paired, with a bootstrap CI. No generation, so no prompting baselines."""
    scorer = load_reward_model(run_dir)
    config, items = scorer.run.config, split_items(run_dir, split, None)
    pairs, _ = tokenize_preferences(scorer.run.tokenizer, items, config.data.max_length, "pair")
    fresh = fresh_head(scorer.run.model.config, config.train.seed)
    starts = {"base": scorer.run if scorer.run.shares_base else load_run(run_dir, base=True)}
    if config.init_from:
        starts["start"] = load_run(config.init_from)
    scores = {}
    for name, start in starts.items():
        with start.base_only() if start is scorer.run else nullcontext():
            scores[name] = dataclasses.replace(scorer, run=start, head=fresh).pair_scores(pairs)
    scores["tuned"] = scorer.pair_scores(pairs)
    wins = {name: [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in pair] for name, pair in scores.items()}
    result: dict[str, Any] = {"items": len(pairs), "start_run": config.init_from, "measure": REWARD_SCORE}
    result |= {name: round(sum(values) / max(1, len(values)), 4) for name, values in wins.items()}
    for against in starts:
        compared = stats.compare_per_item(
            "pair_accuracy", wins[against], wins["tuned"], False, config.eval.bootstrap, config.eval.seed
        )
        result[f"tuned_vs_{against}"] = compared.to_dict()
    by_line = {c.line: c for c in items}
    rows = [
        {"line": p.line, "prompt": by_line[p.line].prompt_messages[-1].content}
        | {"chosen": str(by_line[p.line].reference), "rejected": by_line[p.line].rejected}
        | {name: [round(v, 6) for v in scores[name][i]] for name in scores}
        for i, p in enumerate(pairs)
    ]
    summary = CompareSummary(
        run_dir=str(run_dir), split=split, items=len(pairs), primary="pair_accuracy", decided_by="pair_accuracy",
        correction="none (one comparison per start)", baselines={}, verdict=_reward_verdict(result),
        examples=rows[:3], preference=result,
    )  # fmt: skip
    _write_compare(RunDir(run_dir), rows, summary)
    return summary


def _reward_verdict(result: dict[str, Any]) -> str:
    """What the trained scorer's held-out pair accuracy says against its untrained start on the base."""
    versus = result["tuned_vs_base"]
    detail = (
        f"{result['tuned']:.3f} of {result['items']} held-out pairs ranked right, against {result['base']:.3f} for "
        f"the base with a fresh head (diff {versus['diff']:+.3f}, 95% CI [{versus['ci_low']:+.3f}, "
        f"{versus['ci_high']:+.3f}])"
    )
    if versus["ci_low"] > 0:
        return f"The reward model learned the preference: {detail}."
    return f"No measurable gain: {detail}; more pairs or steps may help."


def _losses_of_both(
    loaded: Any, base: Any, items: list[Conversation]
) -> tuple[list[tuple[float, int]], list[tuple[float, int]]]:
    """Per-item answer losses of (base, tuned), both with the tuned run's tokenizer and data settings."""
    with base.base_only() if base is loaded else nullcontext():
        base_losses = item_losses(base.model, loaded.tokenizer, items, loaded.config)
    return base_losses, item_losses(loaded.model, loaded.tokenizer, items, loaded.config)


def compare_metrics(
    eval_config: EvalConfig,
    scores: dict[str, dict[str, list[float]]],
    outputs: dict[str, list[str]],
    references: list[str],
) -> dict[str, stats.Comparison]:
    """Paired statistics per metric: per-item metrics item by item, corpus metrics (BLEU-like) on the whole set."""
    compared: dict[str, stats.Comparison] = {}
    for index, name in enumerate(scores["tuned"]):
        compared[name] = stats.compare_per_item(
            name,
            scores["base"][name],
            scores["tuned"][name],
            name in m.BINARY,
            eval_config.bootstrap,
            eval_config.seed + index,
        )
    for name in eval_config.metrics:
        if name in m.CORPUS_METRICS:
            compared[name] = stats.compare_corpus(
                m.CORPUS_METRICS[name],
                outputs["base"],
                outputs["tuned"],
                references,
                eval_config.bootstrap // 2,
                eval_config.seed,
                m.sacrebleu_metric(name),
            )
    return compared


SECONDARY_CORRECTION = (
    "holm: the primary metric (first in eval.metrics) is tested alone; the others, loss included, carry "
    "Holm-Bonferroni adjusted p-values (p_holm) and count as significant only when p_holm < 0.05"
)


def _correct_secondaries(primary: str, results: dict[str, dict[str, Any]]) -> None:
    """Mark the primary metric, and give every other tested metric its Holm-adjusted p-value and significance."""
    tested = {name: r["p_value"] for name, r in results.items() if "p_value" in r and name != primary}
    for name, adjusted in stats.holm(tested).items():
        significant = adjusted < stats.ALPHA
        results[name] |= {"role": "secondary", "p_holm": float(f"{adjusted:.3g}"), "significant": significant}
    if primary in results:
        results[primary]["role"] = "primary"


def _deciding_scores(
    name: str,
    scores: dict[str, dict[str, list[float]]],
    outputs: dict[str, list[str]],
    references: list[str],
    schema_path: str | None,
) -> tuple[list[float], list[float]]:
    """Per-item (base, tuned) scores of the deciding metric, scored here when eval.metrics lists only corpus ones."""
    if name not in scores["tuned"]:
        scores = {label: m.score([name], outputs[label], references, schema_path) for label in outputs}
    return scores["base"][name], scores["tuned"][name]


def _compare_losses(
    eval_config: EvalConfig, base_losses: list[tuple[float, int]], tuned_losses: list[tuple[float, int]]
) -> dict[str, dict[str, Any]]:
    """Paired loss per answer token and corpus perplexity, over the items both models have answer tokens for."""
    scored = [i for i, (_, n) in enumerate(tuned_losses) if n and base_losses[i][1]]
    if not scored:
        return {}
    per_base = [base_losses[i][0] / base_losses[i][1] for i in scored]
    per_tuned = [tuned_losses[i][0] / tuned_losses[i][1] for i in scored]
    loss = stats.compare_per_item("loss", per_base, per_tuned, False, eval_config.bootstrap, eval_config.seed)
    base_ppl, tuned_ppl = _loss_of(base_losses)[1], _loss_of(tuned_losses)[1]
    return {
        "loss": loss.to_dict() | {"lower_is_better": True},
        "perplexity": {"base": base_ppl, "tuned": tuned_ppl, "diff": round((tuned_ppl or 0) - (base_ppl or 0), 4)},
    }


def _compare_rows(
    items: list[Conversation],
    references: list[str],
    outputs: dict[str, list[str]],
    scores: dict[str, dict[str, list[float]]],
) -> list[dict[str, Any]]:
    """One row per item with every contestant's answer and score on each per-item metric."""
    return [
        {
            "line": c.line,
            "prompt": c.prompt_messages[-1].content,
            "reference": references[i],
            **{label: answers[i] for label, answers in outputs.items()},
            "scores": {name: {label: scores[label][name][i] for label in scores} for name in scores["tuned"]},
        }
        for i, c in enumerate(items)
    ]


def _flipped(
    rows: list[dict[str, Any]], primary_base: list[float], primary_tuned: list[float]
) -> dict[str, list[dict[str, Any]]]:
    """Rows the tuned model fixed or broke on the deciding metric; the epsilon keeps float noise from counting."""
    return {
        "fixed": [r for r, b, t in zip(rows, primary_base, primary_tuned, strict=True) if t > b + 1e-12],
        "broken": [r for r, b, t in zip(rows, primary_base, primary_tuned, strict=True) if b > t + 1e-12],
    }


def _write_compare(layout: RunDir, rows: list[dict[str, Any]], summary: CompareSummary) -> None:
    own_dir(layout.eval)
    with replacing(layout.predictions) as handle:
        handle.writelines(json_line(row) for row in rows)
    write_json(layout.compare, asdict(summary))


def read_comparison(run_dir: str | Path) -> CompareSummary | None:
    """The run's compare.json, None before the run is compared. A file written before version 2 (no `version`:
    the zero-shot comparison at the top level, the few-shot one under `few_shot`) is converted as it is read."""
    path = RunDir(Path(run_dir)).compare
    if not path.is_file():
        return None
    written = json.loads(path.read_text())
    version = written.pop("version", 1)
    if version not in (1, COMPARE_VERSION):
        raise TunesmithError(
            f"{path} is compare.json version {version}; this tunesmith reads versions 1 and {COMPARE_VERSION}. "
            f"Upgrade tunesmith, or compare again: tunesmith compare {run_dir}"
        )
    try:
        written = _from_version_1(written) if version == 1 else written
        found = {name: Versus(**versus) for name, versus in written.pop("baselines").items()}
        start = written.pop("start", None)
        return CompareSummary(**written, baselines=found, start=Versus(**start) if start else None)
    except (KeyError, TypeError) as exc:
        raise TunesmithError(
            f"{path} is not a comparison tunesmith wrote ({exc}). Compare again: tunesmith compare {run_dir}"
        ) from None


def _from_version_1(old: dict[str, Any]) -> dict[str, Any]:
    """A version-1 compare.json in the version-2 shape. Version 1 named the zero-shot contestant "base" (now
    "zero_shot"), kept its comparison at the top level and the few-shot one under `few_shot`, and stored no
    zero-shot verdict of its own; older files may also lack decided_by, shots and strongest."""
    primary = old["primary"]
    shots = old.get("shots") or 0
    moved = ("metrics", "wins", "ties", "losses", "flipped")
    zero = {key: old[key] for key in moved} | {"verdict": None}
    found = {"zero_shot": zero} | ({"few_shot": old["few_shot"]} if old.get("few_shot") else {})
    kept = {key: value for key, value in old.items() if key not in (*moved, "few_shot")}
    return kept | {
        "decided_by": old.get("decided_by", primary),
        "baselines": {
            name: versus
            | {
                "against": name,
                "label": f"{shots}-shot" if name == "few_shot" else "zero-shot",
                "decided_by": versus.get("decided_by", primary),
                "flipped": {kind: [_version_1_row(r) for r in rows] for kind, rows in versus["flipped"].items()},
            }
            for name, versus in found.items()
        },
        "examples": [_version_1_row(row) for row in old.get("examples", [])],
        "strongest": _version_1_name(old.get("strongest", "base")),
        "seconds": {_version_1_name(name): value for name, value in (old.get("seconds") or {}).items()},
        "field_accuracy": {_version_1_name(name): value for name, value in (old.get("field_accuracy") or {}).items()},
    }


def _version_1_name(contestant: str) -> str:
    return "zero_shot" if contestant == "base" else contestant


def _version_1_row(row: dict[str, Any]) -> dict[str, Any]:
    """An item row with version 2's contestant names: its answer columns, and those of its per-metric scores."""
    renamed = {_version_1_name(key): value for key, value in row.items()}
    if "scores" in renamed:
        renamed["scores"] = {
            metric: {_version_1_name(name): score for name, score in by.items()}
            for metric, by in renamed["scores"].items()
        }
    return renamed
