"""Objective grpo: online RL with verifiable rewards (GRPO, Dr. GRPO, DAPO), on the generation engine.

Each rollout picks prompts from a seeded order (the data position is TrainState.micro_batches, counted in prompts),
samples rl.group_size completions of each with the engine (seeded per run seed, step, prompt and sample, so a resumed
run draws the same), scores them with the rewards (rewards.py), and turns each group's rewards into advantages
(losses.py: group_advantages). Groups whose rewards are all equal carry no signal: with dynamic sampling they are
dropped and new prompts drawn in their place (counted). A completion a reward skipped, or one cut at the length limit
under overlong: mask, is left out of the advantages and the loss; it is never scored 0 silently.

The batch is prompt + completion tokens with the loss over the completion; log-probs come per token through the
chunked output layer (train/loss.py: token_logps), never the full logits. With rl.iterations > 1 a rollout feeds
that many optimizer steps and the ratio is against the sampling policy's log-probs; the pending rollout is kept in
the checkpoint's state so that a resume mid-way continues exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

import tunesmith.objectives.losses as formulas
from tunesmith.config import PreferenceConfig, RlConfig, RunConfig
from tunesmith.data.formats import Conversation
from tunesmith.data.tokenize import TokenizedExample, prompt_ids
from tunesmith.errors import TunesmithError
from tunesmith.evaluate.baselines import turn_stops
from tunesmith.evaluate.generate import Asked
from tunesmith.generation import Engine, generation_view
from tunesmith.objectives.objective import Objective, StepBatch
from tunesmith.rewards import Reward, Sample, Scored, build_rewards, score
from tunesmith.train.batching import collate, share_prefixes
from tunesmith.train.loss import model_token_logps, shares_prefixes

MAX_ROWS = 64  # engine rows generated at once: a step's whole group set on a small model, bounded for memory
SAMPLES_LOGGED = 3  # sample completions written into metrics.jsonl per validation


@dataclass
class Prompt:
    """A training or validation prompt: its token ids as the model is asked, and the example it came from."""

    ids: list[int]
    conversation: Conversation
    line: int

    def __len__(self) -> int:
        return len(self.ids)


def tokenize_prompts(
    tokenizer: Any, conversations: list[Conversation], max_length: int, rl: RlConfig
) -> tuple[list[Prompt], dict[str, Any]]:
    """Every example's prompt tokenized with the chat template's answer cue; a prompt that leaves no room for
    rl.max_completion_tokens within data.max_length is dropped and counted."""
    room = max_length - rl.max_completion_tokens
    prompts, dropped = [], 0
    for conversation in conversations:
        ids = prompt_ids(tokenizer, conversation.prompt_messages, conversation.tools)
        if len(ids) > room:
            dropped += 1
            continue
        prompts.append(Prompt(ids, conversation, conversation.line))
    tokens = sum(len(p) for p in prompts)
    references = sum(p.conversation.reference is not None for p in prompts)
    return prompts, {"prompts": len(prompts), "dropped": dropped, "tokens": tokens, "with_reference": references}


def planned_rows(prompts: list[Prompt], rl: RlConfig) -> list[TokenizedExample]:
    """What the model trains on per prompt at most, for the plan's estimate: the prompt and a full-length answer."""
    return [TokenizedExample(p.ids + [0] * rl.max_completion_tokens, [0] * len(p) + [1] * rl.max_completion_tokens)
            for p in prompts]  # fmt: skip


def check_references(rewards: list[Reward], prompts: list[Prompt], split: str = "train") -> None:
    """Refuse data some of whose prompts lack the reference answer a reward scores against."""
    needing = [r.name for r in rewards if r.needs_reference]
    missing = [p.line for p in prompts if p.conversation.reference is None]
    if needing and missing:
        raise TunesmithError(
            f"rl.rewards {', '.join(needing)} score against the example's reference answer, but {len(missing)} "
            f"{split} examples have none (lines {missing[:10]}). Add the answers, or use rewards that need none "
            "(regex, length, json_valid, json_schema, code)."
        )


# --- The objective ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GRPO(Objective):
    """The clipped policy loss of a batch of rollouts, normalised as loss_type says (weights come in the batch)."""

    loss_type: str = "dapo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0

    def units(self, example: Any) -> int:
        return 1  # each token's weight in the step's loss comes in the batch (losses.sequence_token_weights)

    def loss_sum(
        self, model: Any, batch: dict[str, torch.Tensor], preference: PreferenceConfig | None
    ) -> tuple[torch.Tensor, dict]:
        """The batch's share of the step's loss, and its share of the step's token means (clip ratio, entropy, KL)."""
        logps, entropy = model_token_logps(model, batch)
        rows = batch["token_rows"]
        # The first iteration on a rollout: the policy IS the sampling policy (ratio 1, its gradient the plain
        # policy gradient); later ones: the ratio against the log-probs the completions were sampled with.
        old = batch["old_logps"] if "old_logps" in batch else logps.detach()
        losses, bound = formulas.clipped_token_losses(
            logps, old, batch["advantages"][rows], self.epsilon_low, self.epsilon_high
        )
        share = batch["token_share"][rows]
        stats = {"clip_ratio": float((bound.float() * share).sum()), "entropy": float((entropy * share).sum())}
        if self.beta > 0:
            kl = formulas.k3_kl(logps, batch["ref_logps"])
            losses = losses + self.beta * kl
            stats["kl"] = float((kl.detach() * share).sum())
        return (losses * batch["token_weight"][rows]).sum(), stats


# --- Rollouts -----------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One completion the step trains on: its prompt and sampled tokens, their sampling log-probs, its advantage,
    and the starting model's log-probs of its tokens (beta > 0)."""

    prompt: list[int]
    tokens: list[int]
    logprobs: list[float]
    advantage: float
    line: int
    reference: list[float] | None = None


@dataclass
class Group:
    """One prompt's sampled completions with their samples (for the rewards) and rewards."""

    prompt: int  # index into the prompts
    requests: list[Any]
    samples: list[Sample]
    scored: Scored | None = None
    rewards: list[float | None] = field(default_factory=list)  # combined, after overlong; None: left out

    @property
    def spread(self) -> bool:
        valid = [r for r in self.rewards if r is not None]
        return len(valid) > 1 and max(valid) > min(valid)


def _seed(*parts: int) -> int:
    """A 31-bit seed from the run seed, step and prompt position: the same numbers give the same completions."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big") % (2**31 - 2**20)


def _last_user(conversation: Conversation) -> str:
    users = [m.content for m in conversation.prompt_messages if m.role == "user"]
    return users[-1] if users else ""


def generate_groups(
    model: Any,
    tokenizer: Any,
    prompts: list[Prompt],
    group_size: int,
    rl: RlConfig,
    temperature: float,
    seed: int | None,
    logprobs: bool,
) -> tuple[list[list[Any]], list[list[str]]]:
    """group_size completions of each prompt through the engine, cut at the template's turn stops as eval answers
    are (evaluate/generate.py: Asked); per prompt its requests (tokens, log-probs, finish reason) and texts."""
    messages = [p.conversation.prompt_messages for p in prompts for _ in range(group_size)]
    tools = [p.conversation.tools for p in prompts for _ in range(group_size)]
    stops = turn_stops(tokenizer)
    asked = Asked(tokenizer, messages, rl.max_completion_tokens, temperature, rl.top_p, stops, seed, tools)
    for request in asked.requests:
        request.logprobs = logprobs
    length = max(len(r.prompt_ids) for r in asked.requests) + rl.max_completion_tokens
    was_training = model.training
    model.eval()
    try:
        # The view merges the adapter and packs the weights afresh for each rollout (they change every step): well
        # under a second on Gemma 3 270M, against a rollout of tens of seconds that then runs at the engine's speed.
        with torch.no_grad(), generation_view(model):
            Engine(model, max_rows=min(len(asked.requests), MAX_ROWS), max_length=length).run(asked.requests)
    finally:
        model.train(was_training)
    texts = asked.answers()
    cut = [slice(i * group_size, (i + 1) * group_size) for i in range(len(prompts))]
    return [asked.requests[c] for c in cut], [texts[c] for c in cut]


def samples_of(prompt: Prompt, requests: list[Any], texts: list[str]) -> list[Sample]:
    conversation = prompt.conversation
    return [
        Sample(
            _last_user(conversation), text, conversation.reference, conversation.to_record(), len(request.tokens),
            request.finish_reason == "length",
        )
        for request, text in zip(requests, texts, strict=True)
    ]  # fmt: skip


def overlong_penalty(tokens: int, rl: RlConfig) -> float:
    """DAPO's soft overlong punishment: 0 until the last overlong_buffer tokens before the limit, then falling
    linearly to -1 at max_completion_tokens."""
    start = rl.max_completion_tokens - rl.buffer
    return -min(1.0, max(0, tokens - start) / rl.buffer)


def combined_rewards(group: Group, rl: RlConfig) -> list[float | None]:
    """The group's combined rewards with rl.overlong applied: None for a skipped completion and, under mask, for
    one cut at the length limit."""
    assert group.scored is not None
    rewards: list[float | None] = []
    for sample, value in zip(group.samples, group.scored.combined, strict=True):
        if value is None or (sample.truncated and rl.overlong == "mask"):
            rewards.append(None)
        elif rl.overlong == "penalty":
            rewards.append(value + overlong_penalty(sample.tokens, rl))
        else:
            rewards.append(value)
    return rewards


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))
    return round(mean, 6), round(std, 6)


def rollout_stats(groups: list[Group], rewards: list[Reward], dropped: int, draws: int) -> dict[str, Any]:
    """What a rollout logs: per reward and combined the mean and std, the share of groups with zero spread, the
    completions' lengths and share truncated, how many completions a reward skipped."""
    samples = [s for g in groups for s in g.samples]
    stats: dict[str, Any] = {}
    combined = [r for g in groups for r in g.rewards if r is not None]
    stats["reward"], stats["reward_std"] = _mean_std(combined)
    for reward in rewards:
        values = [v for g in groups if g.scored for v in g.scored.values[reward.name] if v is not None]
        stats[f"reward_{reward.name}"], stats[f"reward_{reward.name}_std"] = _mean_std(values)
    lengths = [s.tokens for s in samples]
    stats |= {
        "zero_spread": round(sum(not g.spread for g in groups) / max(1, len(groups)), 6),
        "groups_dropped": dropped,
        "draws": draws,
        "completion_len_mean": round(sum(lengths) / max(1, len(lengths)), 3),
        "completion_len_max": max(lengths, default=0),
        "truncated": round(sum(s.truncated for s in samples) / max(1, len(samples)), 6),
        "skipped": sum(1 for g in groups if g.scored for v in g.scored.combined if v is None),
    }
    return stats


class Rollouts:
    """The step source of objective grpo (train/loop.py: Session.source): one StepBatch of fresh rollouts every
    rl.iterations steps, the same rollouts in between."""

    def __init__(self, config: RunConfig, tokenizer: Any, prompts: list[Prompt], model: Any, uses_peft: bool) -> None:
        if not prompts:
            raise TunesmithError(
                "objective grpo: no prompts are left (see data.max_length and rl.max_completion_tokens)."
            )
        self.rl, self.tokenizer, self.prompts = config.rl, tokenizer, prompts
        self.seed, self.batch_size = config.train.seed, config.train.batch_size
        self.rewards = build_rewards(config.rl.rewards, config.eval.schema_path, config.rl.max_completion_tokens)
        check_references(self.rewards, prompts)
        rl = config.rl
        self.objective = GRPO("grpo", loss_type=rl.loss_type, epsilon_low=rl.epsilon_low, epsilon_high=rl.clip_high,
                              beta=rl.beta)  # fmt: skip
        self.epoch_size = len(prompts)  # the data position counts prompts
        self.steps_per_epoch = math.ceil(len(prompts) / rl.prompts_per_step) * rl.iterations
        # The reference of beta > 0: a fresh adapter switched off is the starting model (no copy); otherwise
        # (init_from, full, bottleneck adapters) the trainable weights as they start, swapped in for the pass.
        self.model = model
        self.switch_off = uses_peft and not config.init_from
        self.start: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        # A group's completions share one copy of their prompt in the update's forward (half the tokens with a
        # prompt as long as the completions) where the model's attention computes that exactly.
        self.shared = rl.share_prompts and shares_prefixes(model, max(map(len, prompts)) + rl.max_completion_tokens)
        if rl.beta > 0 and not self.switch_off:
            self.start = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]

    def prompt_at(self, position: int) -> int:
        """The prompt at a data position: each epoch a seeded shuffle of every prompt."""
        epoch, offset = divmod(position, len(self.prompts))
        order = list(range(len(self.prompts)))
        random.Random(self.seed + epoch).shuffle(order)
        return order[offset]

    def stream(self, trainer: Any) -> Iterator[StepBatch]:
        if trainer.world.size > 1:
            raise TunesmithError("objective grpo trains in one process for now: run it without torchrun/accelerate.")
        state, iterations = trainer.state, self.rl.iterations
        step = state.step
        pending = state.rollouts if step % iterations else None  # resumed in the middle of a rollout's iterations
        rows, logged = self._thaw(pending) if pending else ([], {})
        while True:
            step += 1
            if (step - 1) % iterations == 0:
                started = time.perf_counter()
                rows, logged, advance = self.rollout(trainer, step, state.micro_batches)
                logged["rollout_s"] = round(time.perf_counter() - started, 3)
                state.rollouts = self._freeze(rows, logged) if iterations > 1 else None
            else:
                advance = 0
                logged = logged | {"rollout_s": 0.0}
            iteration = (step - 1) % iterations
            yield self.step_batch(rows, logged | {"iteration": iteration}, advance, sampled=iteration > 0)

    def rollout(self, trainer: Any, step: int, position: int) -> tuple[list[Row], dict[str, Any], int]:
        """Sample and score groups until rl.prompts_per_step of them have spread (dynamic sampling, at most
        rl.max_draws rounds) or once (without); the rows to train on, the rollout's statistics, prompts drawn."""
        rl, model = self.rl, trainer.model
        kept: list[Group] = []
        sampled: list[Group] = []
        dropped = draws = drawn = 0
        while draws < rl.max_draws and len(kept) < rl.prompts_per_step:
            indices = [self.prompt_at(position + drawn + k) for k in range(rl.prompts_per_step - len(kept))]
            chosen = [self.prompts[i] for i in indices]
            with trainer.autocast():
                requests, texts = generate_groups(
                    model, self.tokenizer, chosen, rl.group_size, rl, rl.temperature,
                    _seed(self.seed, step, position + drawn), logprobs=True,
                )  # fmt: skip
            drawn, draws = drawn + len(indices), draws + 1
            for index, prompt, asked, answers in zip(indices, chosen, requests, texts, strict=True):
                group = Group(index, asked, samples_of(prompt, asked, answers))
                group.scored = score(self.rewards, group.samples)
                group.rewards = combined_rewards(group, rl)
                sampled.append(group)
                if group.spread or not rl.dynamic_sampling:
                    kept.append(group)
                else:
                    dropped += 1
            if not rl.dynamic_sampling:
                break
        logged = rollout_stats(sampled, self.rewards, dropped, draws) | {"prompts_drawn": drawn}
        rows = self._rows(kept)
        if rl.beta > 0 and rows:
            with trainer.autocast():
                self._attach_reference(rows, model)
        return rows, logged, drawn

    def _rows(self, groups: list[Group]) -> list[Row]:
        if not groups:
            return []
        width = self.rl.group_size
        table = torch.tensor([[math.nan if r is None else r for r in g.rewards] for g in groups], dtype=torch.float64)
        advantages = formulas.group_advantages(table, self.rl.scale_advantages, self.rl.rloo)
        rows = []
        for g, group in enumerate(groups):
            for k in range(width):
                if group.rewards[k] is None:
                    continue
                request = group.requests[k]
                line = self.prompts[group.prompt].line
                rows.append(Row(list(request.prompt_ids), list(request.tokens), list(request.token_logprobs),
                                float(advantages[g, k]), line))  # fmt: skip
        return rows

    def _reference_view(self, model: Any) -> contextlib.AbstractContextManager:
        if self.switch_off:
            return model.disable_adapter()
        return _swapped(self.start)

    @torch.no_grad()
    def _attach_reference(self, rows: list[Row], model: Any) -> None:
        """Each row's per-token log-probs under the starting model (eval mode: no dropout)."""
        was_training = model.training
        model.eval()
        try:
            with self._reference_view(model):
                for start in range(0, len(rows), self.batch_size):
                    chunk = rows[start : start + self.batch_size]
                    device = next(model.parameters()).device
                    logps, _ = model_token_logps(model, {k: v.to(device) for k, v in self.layout(chunk).items()})
                    for row, values in zip(chunk, logps.split([len(r.tokens) for r in chunk]), strict=True):
                        row.reference = values.float().tolist()
        finally:
            model.train(was_training)

    def step_batch(self, rows: list[Row], logged: dict[str, Any], advance: int, sampled: bool) -> StepBatch:
        """The rows in micro-batches of train.batch_size, each token weighted for loss_type over the whole step."""
        lengths = torch.tensor([len(r.tokens) for r in rows], dtype=torch.float64)
        weights = formulas.sequence_token_weights(lengths, self.rl.loss_type, self.rl.max_completion_tokens)
        share = 1.0 / max(1.0, float(lengths.sum()))
        micro = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            batch = self.layout(chunk)
            batch["advantages"] = torch.tensor([r.advantage for r in chunk], dtype=torch.float32)
            batch["token_weight"] = weights[start : start + len(chunk)]
            batch["token_share"] = torch.full((len(chunk),), share, dtype=torch.float32)
            if sampled:
                batch["old_logps"] = _flat([r.logprobs for r in chunk])
            if self.rl.beta > 0:
                batch["ref_logps"] = _flat([r.reference or [] for r in chunk])
            micro.append((list(range(start, start + len(chunk))), batch, 1.0))
        tokens = sum(len(r.prompt) + len(r.tokens) for r in rows)
        return StepBatch(micro, 1, tokens, sorted({r.line for r in rows}), advance, logged)

    def layout(self, rows: list[Row]) -> dict[str, torch.Tensor]:
        """A micro-batch's tensors: the group's completions after one copy of their prompt (share_prefixes) where
        the model computes that exactly, else padded rows; either way `token_rows` names each completion token's
        row in the order the loss path returns their log-probs."""
        if self.shared:
            return share_prefixes([(r.prompt, r.tokens) for r in rows])
        batch = collate(_examples(rows), self.tokenizer.pad_token_id)
        lengths = torch.tensor([len(r.tokens) for r in rows])
        return batch | {"token_rows": torch.arange(len(rows)).repeat_interleave(lengths)}

    @staticmethod
    def _freeze(rows: list[Row], logged: dict[str, Any]) -> dict[str, Any]:
        return {"rows": [dataclasses.asdict(r) for r in rows], "logged": logged}

    @staticmethod
    def _thaw(saved: dict[str, Any]) -> tuple[list[Row], dict[str, Any]]:
        return [Row(**r) for r in saved["rows"]], dict(saved["logged"])


def _examples(rows: list[Row]) -> list[TokenizedExample]:
    return [TokenizedExample(r.prompt + r.tokens, [0] * len(r.prompt) + [1] * len(r.tokens), r.line) for r in rows]


def _flat(values: list[list[float]]) -> torch.Tensor:
    """Per-token values of a micro-batch's rows end to end, in the order the loss path returns log-probs."""
    return torch.tensor([v for row in values for v in row], dtype=torch.float32)


@contextlib.contextmanager
def _swapped(start: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> Iterator[None]:
    """The trainable weights set to their starting values for the block, then back."""
    current = [p.data for p, _ in start]
    try:
        for parameter, value in start:
            parameter.data = value
        yield
    finally:
        for (parameter, _), value in zip(start, current, strict=True):
            parameter.data = value


# --- Validation ---------------------------------------------------------------------------------------------------


def reward_validator(config: RunConfig, tokenizer: Any, prompts: list[Prompt]) -> Any:
    """Validation of grpo: greedy answers to up to validation.generate_limit val prompts, scored by the rewards:
    val_reward (combined), val_reward_<name>, and a few sample completions."""
    rewards = build_rewards(config.rl.rewards, config.eval.schema_path, config.rl.max_completion_tokens)
    check_references(rewards, prompts, "val")
    chosen = prompts[: config.validation.generate_limit]

    def validate(model: Any) -> dict[str, Any]:
        requests, texts = generate_groups(model, tokenizer, chosen, 1, config.rl, 0.0, None, logprobs=False)
        samples = [s for p, r, t in zip(chosen, requests, texts, strict=True) for s in samples_of(p, r, t)]
        scored = score(rewards, samples)
        results: dict[str, Any] = {}
        combined = [v for v in scored.combined if v is not None]
        results["val_reward"] = sum(combined) / len(combined) if combined else float("nan")
        for name, values in scored.values.items():
            kept = [v for v in values if v is not None]
            results[f"val_reward_{name}"] = sum(kept) / len(kept) if kept else float("nan")
        results["val_samples"] = [
            {"prompt": s.prompt, "completion": s.completion, "reward": r}
            for s, r in zip(samples[:SAMPLES_LOGGED], scored.combined, strict=False)
        ]
        return results

    return validate
