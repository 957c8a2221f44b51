"""Preference objectives on top of any method: what their batches hold, their loss, what they log.

A pair is one prompt with a chosen and a rejected answer (dpo, ipo, orpo, simpo); a KTO row one prompt with
one answer marked desirable or not, plus the same prompt with another row's answer (KTO's KL estimate).
Both sides are tokenized like SFT examples (loss mask over the answer) and stacked into one batch: the
chosen rows, then the rejected (or mismatched) rows, so one forward pass scores both. Sequence log-probs
go through the SFT loss's chunked output layer (train/loss.py: model_logps), never the full logits.

The reference of dpo, ipo and kto is the model the run starts from (the base with the fresh adapter, which
starts as a no-op, or the earlier run of init_from). Its log-probs are computed once before training
(`attach_reference`, no second copy of any weights, for every method), kept in the run directory and
reused on resume.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.progress import Progress

import tunesmith.objectives.losses as formulas
from tunesmith.config import PreferenceConfig, RunConfig
from tunesmith.data.formats import Conversation, Message
from tunesmith.data.tokenize import TokenizedExample, tokenize_all
from tunesmith.errors import TunesmithError
from tunesmith.files import sha256_file, write_text_atomic
from tunesmith.objectives.losses import reward_stats
from tunesmith.objectives.objective import Objective, objective_of
from tunesmith.rundir import RunDir
from tunesmith.train import distributed
from tunesmith.train.batching import collate
from tunesmith.train.loss import model_logps

STATS = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp")


@dataclass
class PreferenceExample:
    """A tokenized pair (first: chosen, second: rejected) or KTO row (first: the answer, second: the prompt with
    another row's answer); `reference` holds the starting model's summed log-probs of both, when measured."""

    first: TokenizedExample
    second: TokenizedExample
    line: int
    desirable: bool | None = None  # KTO rows only
    reference: tuple[float, float] | None = None

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    @property
    def token_ids(self) -> tuple[list[int], list[int]]:
        return self.first.input_ids, self.second.input_ids


def _answered(conversation: Conversation, answer: str) -> Conversation:
    return Conversation((*conversation.prompt_messages, Message("assistant", answer)), line=conversation.line)


def tokenize_preferences(
    tokenizer: Any, conversations: list[Conversation], max_length: int, holds: str, seed: int = 0
) -> tuple[list[PreferenceExample], dict[str, Any]]:
    """Both sides of every pair (or KTO row) tokenized and truncated like SFT examples; a pair either side of
    which keeps no answer token is dropped. The counts as the SFT tokenize report gives them."""
    wrong = [c.line for c in conversations if c.kind != holds]
    if wrong:
        need = "chosen/rejected pairs" if holds == "pair" else "KTO rows (prompt, completion, label)"
        raise TunesmithError(
            f"This objective trains on {need}, but records {wrong[:10]} are not: see `tunesmith data check` for the "
            "format detected, or set objective: sft."
        )
    if holds == "pair":
        second = [_answered(c, str(c.rejected)) for c in conversations]
    else:  # KTO: each prompt with another row's answer, for the KL estimate (a seeded shift, never its own)
        order = list(range(len(conversations)))
        random.Random(seed).shuffle(order)
        other = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}
        second = [_answered(c, str(conversations[other[i]].reference)) for i, c in enumerate(conversations)]
    # Only the last answer is scored: earlier assistant turns are part of the prompt both sides share.
    firsts, stats = tokenize_all(tokenizer, conversations, max_length, "last")
    seconds, more = tokenize_all(tokenizer, second, max_length, "last")
    by_line, labels = {e.line: e for e in seconds}, {c.line: c.label for c in conversations}
    examples = [
        PreferenceExample(e, by_line[e.line], e.line, labels[e.line] if holds == "kto" else None)
        for e in firsts
        if e.line in by_line
    ]
    report = stats.summary() | {
        "pairs": len(examples),
        "truncated_second": more.truncated,
        "dropped": len(conversations) - len(examples),
        "tokens": sum(len(e) for e in examples),
    }
    return examples, report


def collate_preferences(examples: list[PreferenceExample], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch: the first rows of every example, then their second rows; reference log-probs
    and KTO labels alongside."""
    batch = collate([e.first for e in examples] + [e.second for e in examples], pad_id)
    if all(e.reference is not None for e in examples):
        reference = torch.tensor([e.reference for e in examples], dtype=torch.float32)
        batch["ref_first"], batch["ref_second"] = reference[:, 0], reference[:, 1]
    if examples[0].desirable is not None:
        batch["desirable"] = torch.tensor([bool(e.desirable) for e in examples])
    return batch


def sequences(examples: list[PreferenceExample]) -> list[TokenizedExample]:
    """Both sequences of every example, as the model runs them (for lengths and token counts)."""
    return [side for example in examples for side in (example.first, example.second)]


def _batches(
    examples: list[PreferenceExample], pad_id: int, batch_size: int, device: Any
) -> Iterator[tuple[list[PreferenceExample], dict[str, torch.Tensor]]]:
    """Consecutive batches of `examples`, each with its collated tensors on `device`."""
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        yield chunk, {k: v.to(device) for k, v in collate_preferences(chunk, pad_id).items()}


@dataclass(frozen=True)
class Preference(Objective):
    def units(self, example: Any) -> int:
        return 1  # the loss is a mean over pairs (rows for KTO)

    def collate(
        self, examples: list[Any], pad_id: int, row_tokens: int, packing: bool, share_limit: int | None = None
    ) -> dict[str, torch.Tensor]:
        return collate_preferences(examples, pad_id)  # pairs are never packed: each side is scored on its own

    def loss_sum(
        self, model: Any, batch: dict[str, torch.Tensor], preference: PreferenceConfig | None
    ) -> tuple[torch.Tensor, dict]:
        """Summed loss of the batch's pairs (rows) and summed statistics; reference log-probs come in the batch."""
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
        logps, counts = model_logps(model, inputs)
        half = logps.shape[0] // 2
        first, second, n_first, n_second = logps[:half], logps[half:], counts[:half], counts[half:]
        if preference is None:
            raise TunesmithError(f"objective {self.name} needs the run's preference settings.")
        beta = preference.beta_for(self.name)
        if self.needs_reference and "ref_first" not in batch:
            raise TunesmithError(f"objective {self.name} needs the reference log-probs (attach_reference) first.")
        if self.name == "kto":
            kl = formulas.kto_kl(second, batch["ref_second"], sum_over_processes)
            desirable = batch["desirable"]
            losses, _, _ = formulas.kto(
                first,
                batch["ref_first"],
                desirable,
                kl,
                beta,
                preference.desirable_weight,
                preference.undesirable_weight,
            )
            # Right when a desirable answer's implicit reward is above the KL baseline and an undesirable one's below.
            reward = (beta * (first - batch["ref_first"])).detach()
            right = torch.where(desirable, reward > beta * kl, reward < beta * kl).float()
            stats = {"reward_accuracy": float(right.sum()), "kl": float(kl) * len(first)}
            return losses.sum(), stats
        if self.name == "dpo":
            losses, chosen, rejected = formulas.dpo(
                first, second, batch["ref_first"], batch["ref_second"], beta, preference.label_smoothing
            )
        elif self.name == "ipo":
            losses, chosen, rejected = formulas.ipo(
                first, second, batch["ref_first"], batch["ref_second"], n_first, n_second, beta
            )
        elif self.name == "orpo":
            losses, chosen, rejected = formulas.orpo(first, second, n_first, n_second, beta)
        else:
            losses, chosen, rejected = formulas.simpo(first, second, n_first, n_second, beta, preference.gamma)
        return losses.sum(), pair_stats(chosen, rejected, first / n_first, second / n_second)


def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over the data-parallel processes (itself in a single process). Every process calls it
    for every micro-batch and validation batch alike (all validate the same set), so the collectives match."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return tensor
    summed = tensor.clone()
    dist.all_reduce(summed)
    return summed


def kto_batch_warning(objective: Objective, batch_size: int, processes: int) -> str | None:
    """A warning when KTO's KL reference point would rest on fewer than 2 mismatched pairs per process and
    micro-batch (train.batch_size examples split over the processes), else None."""
    per_process = batch_size // max(1, processes)
    if objective.name != "kto" or per_process >= 2:
        return None
    over = f", {batch_size} over all {processes} processes" if processes > 1 else ""
    return (
        f"KTO estimates its KL reference point from each micro-batch's mismatched pairs: {per_process} per "
        f"process{over} is a noisy estimate (one sample moves it as much as the whole batch). Set "
        f"train.batch_size to {2 * processes} or more (and train.grad_accum lower to keep the examples per step)."
    )


def pair_stats(
    chosen: torch.Tensor, rejected: torch.Tensor, chosen_logp: torch.Tensor, rejected_logp: torch.Tensor
) -> dict[str, float]:
    """Statistics summed over the pairs (the step divides by its pair count): reward_stats' accuracy (the share of
    pairs whose chosen reward beats the rejected one), margin and mean rewards; log-probs are per answer token."""
    means = reward_stats(chosen, rejected)
    pairs = len(chosen)
    summed = [means[name] * pairs for name in ("accuracy", "margin", "chosen", "rejected")]
    summed += [float(chosen_logp.detach().sum()), float(rejected_logp.detach().sum())]
    return dict(zip(STATS, summed, strict=True))


def reference_key(examples: list[PreferenceExample], start: str) -> str:
    """What the reference log-probs depend on: every token id and the starting weights (their identity and, from
    the caller, a digest of their files' content: see weights_digest)."""
    digest = hashlib.sha256(start.encode())
    for example in examples:
        first, second = example.token_ids
        digest.update(json.dumps([first, second]).encode())
    return digest.hexdigest()


def read_reference(cache: Path | None, key: str, counts: dict[str, int]) -> dict[str, list[list[float]]] | None:
    """The saved log-probs per split when `cache` holds them under `key` (None when it is absent or for other
    examples or weights); a cache that is not what attach_reference writes (damaged, edited, of another count, a
    non-finite value) is an error naming it, never trusted."""
    if cache is None or not cache.is_file():
        return None

    def damaged(problem: str) -> TunesmithError:
        return TunesmithError(
            f"{cache}: {problem}, so the reference log-probs saved there cannot be used. Delete {cache.name} and "
            "run again (--resume keeps the checkpoints): they are measured again from the starting model."
        )

    try:
        saved = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise damaged(f"not readable JSON ({exc})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("logps"), dict):
        raise damaged("no 'key' and 'logps' object as tunesmith writes it")
    if saved.get("key") != key:
        return None  # measured for other examples or other starting weights: measure again and replace it
    logps = saved["logps"]
    for name, count in counts.items():
        pairs = logps.get(name)
        if not isinstance(pairs, list) or len(pairs) != count:
            found = len(pairs) if isinstance(pairs, list) else "no"
            raise damaged(f"{found} {name} entries for the {count} {name} examples")
        for index, pair in enumerate(pairs):
            numbers = isinstance(pair, list) and len(pair) == 2 and all(type(v) in (int, float) for v in pair)
            if not numbers or not all(math.isfinite(v) for v in pair):
                raise damaged(f"{name} entry {index} is {pair!r}, not two finite log-probs")
    return logps


@torch.no_grad()
def attach_reference(
    model: Any,
    splits: dict[str, list[PreferenceExample]],
    pad_id: int,
    batch_size: int,
    cache: Path | None = None,
    start: str = "",
    autocast: Any = None,
    progress: Any = None,
) -> bool:
    """Give every example the starting model's summed log-probs of both its sides, from `cache` when it holds
    them for these examples and this start (True), else measured in eval mode and written there (False)."""

    key = reference_key([e for examples in splits.values() for e in examples], start)
    saved = read_reference(cache, key, {name: len(examples) for name, examples in splits.items()})
    if saved is not None:
        for name, examples in splits.items():
            for example, pair in zip(examples, saved[name], strict=True):
                example.reference = (pair[0], pair[1])
        return True
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for examples in splits.values():
            for chunk, batch in _batches(examples, pad_id, batch_size, device):
                with autocast() if autocast else nullcontext():
                    logps, _ = model_logps(model, batch)
                half = len(chunk)
                for example, first, second in zip(chunk, logps[:half].tolist(), logps[half:].tolist(), strict=True):
                    example.reference = (first, second)
                if progress is not None:
                    progress(len(chunk))
    finally:
        model.train(was_training)
    if cache is not None:
        logps = {name: [list(e.reference or (0.0, 0.0)) for e in examples] for name, examples in splits.items()}
        write_text_atomic(cache, json.dumps({"key": key, "logps": logps}))
    return False


def weights_digest(files: list[Path]) -> str:
    """One sha256 over the content of weight files, in the order given, each with its name."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}:{sha256_file(path)}\n".encode())
    return digest.hexdigest()


@torch.no_grad()
def preference_scores(
    model: Any,
    objective: Preference,
    examples: list[PreferenceExample],
    preference: PreferenceConfig,
    pad_id: int,
    batch_size: int,
) -> dict[str, float]:
    """Mean loss and statistics over `examples` (validation): val_loss, val_reward_accuracy, ..."""
    total: dict[str, float] = {}
    loss = 0.0
    for _, batch in _batches(examples, pad_id, batch_size, next(model.parameters()).device):
        value, stats = objective.loss_sum(model, batch, preference)
        loss += float(value)
        for name, amount in stats.items():
            total[name] = total.get(name, 0.0) + amount
    count = max(1, len(examples))
    return {"val_loss": loss / count} | {f"val_{name}": amount / count for name, amount in total.items()}


@torch.no_grad()
def prefers_chosen(model: Any, examples: list[PreferenceExample], pad_id: int, batch_size: int) -> list[float]:
    """Per pair, 1.0 when the model gives the chosen answer a higher log-probability per answer token than the
    rejected one (length-normalised, so a longer answer is not penalised for its length), else 0.0."""
    wins: list[float] = []
    for chunk, batch in _batches(examples, pad_id, batch_size, next(model.parameters()).device):
        logps, counts = model_logps(model, batch)
        average = (logps / counts.clamp(min=1)).tolist()
        pairs = zip(average[: len(chunk)], average[len(chunk) :], strict=True)
        wins.extend(1.0 if chosen > rejected else 0.0 for chosen, rejected in pairs)
    return wins


def starting_weights(config: RunConfig, source: str) -> list[Path]:
    """The weight files a run starts from: the base model's, then init_from's trained weights when it has one."""
    suffixes = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
    base = Path(source)
    files = sorted(p for p in base.iterdir() if p.suffix in suffixes) if base.is_dir() else [base]
    if config.init_from:
        start = RunDir(Path(str(config.init_from)))
        trained = start.trained_weights(start.read_config())
        files += sorted(p for p in trained.rglob("*") if p.is_file())
    return [p for p in files if p.is_file()]


def measure_reference(
    config: Any,
    model: Any,
    splits: dict[str, list[Any]],
    pad_id: int,
    run_dir: Path,
    world: Any,
    console: Any,
    precision: Any,
    source: str,
) -> None:
    """For dpo, ipo and kto: the starting model's log-probs of every train and val pair, measured once before
    training (no second copy of any weights) and kept in the run directory for a resume. Dropout is turned off
    for these objectives (as TRL does): the policy must equal the reference at the start, not a noisy copy."""

    if not objective_of(config).needs_reference:
        return
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if torch.cuda.is_available() and next(model.parameters()).device.type == "cpu":
        model.to("cuda")
    device = next(model.parameters()).device.type
    weights = weights_digest(starting_weights(config, source))  # the same names can hold other weights
    start = f"{config.model}|{config.method}|{config.init_from or ''}|{precision.name}|{weights}"

    def autocast() -> Any:
        return torch.autocast(device, dtype=precision.dtype, enabled=precision.name != "fp32")

    # The main process measures and writes the cache; data-parallel workers then read it.
    with (
        distributed.main_first(world),
        Progress(console=console, transient=True, disable=not console.is_terminal) as bar,
    ):
        task = bar.add_task("reference log-probs", total=sum(map(len, splits.values())))
        cached = attach_reference(
            model, splits, pad_id, config.train.batch_size, RunDir(run_dir).reference, start, autocast,
            lambda done: bar.advance(task, done),
        )  # fmt: skip
    where = "reused from the run directory" if cached else "measured"
    console.print(f"reference log-probs of {sum(map(len, splits.values()))} pairs {where}")
