"""Group tokenized examples into batches in a seeded order: padded, or packed without padding.

Length grouping keeps padding low: examples are shuffled, sorted by length inside large windows, cut
into batches, and the batches shuffled again so lengths do not trend over time. Packing goes further:
a batch's examples are laid end to end in rows of at most `row_tokens`, position ids restart at each
example and no attention mask is passed, so transformers builds a block-diagonal causal mask and no
example attends to another. The loss is the same as unpacked (tested), with almost no padding.
"""

from __future__ import annotations

import random

import torch

from tunesmith.data.tokenize import TokenizedExample
from tunesmith.train.loss import IGNORE, MAX_SHARED_ROW

WINDOW_BATCHES = 50


def batch_order(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Indices of each batch for one epoch."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * WINDOW_BATCHES
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def collate(examples: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask, and labels that are IGNORE wherever no loss is taken."""
    width = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example)
        ids = torch.tensor(example.input_ids, dtype=torch.long)
        input_ids[row, :n] = ids
        attention[row, :n] = 1
        labels[row, :n] = torch.where(torch.tensor(example.loss_mask, dtype=torch.bool), ids, IGNORE)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def pack(examples: list[TokenizedExample], pad_id: int, row_tokens: int) -> dict[str, torch.Tensor]:
    """Rows of whole examples (first fit, longest first), position ids restarting per example.

    The first token of each example is never a label: it must not be predicted from the example before.
    """
    rows: list[list[TokenizedExample]] = []
    space: list[int] = []
    for example in sorted(examples, key=len, reverse=True):
        fit = next((i for i, free in enumerate(space) if free >= len(example)), None)
        if fit is None:
            rows.append([example])
            space.append(max(row_tokens, len(example)) - len(example))
        else:
            rows[fit].append(example)
            space[fit] -= len(example)
    width = max(sum(len(e) for e in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    real = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for example in row:
            n = len(example)
            ids = torch.tensor(example.input_ids, dtype=torch.long)
            input_ids[r, start : start + n] = ids
            positions[r, start : start + n] = torch.arange(n)
            mask = torch.tensor(example.loss_mask, dtype=torch.bool)
            mask[0] = False
            labels[r, start : start + n] = torch.where(mask, ids, IGNORE)
            real[r, start : start + n] = 1
            start += n
        # Padding forms its own segment (positions restart), so it is never attended to by an example.
        positions[r, start:] = torch.arange(width - start)
    return {"input_ids": input_ids, "position_ids": positions, "labels": labels, "real_tokens": real}


SHARE_SAVES = 0.25  # share a micro-batch's common prefix where that leaves out at least this share of its tokens


def share_prefixes(
    sequences: list[tuple[list[int], list[int]]], masks: list[list[int]] | None = None
) -> dict[str, torch.Tensor]:
    """(prompt, completion) token lists in one row, each run of equal consecutive prompts held once: [p0, c0, c1,
    p1, c2, ...]. Position ids restart at each prompt and continue from it in each completion; the 4D attention
    mask lets a completion see its prompt and itself (causally), never another completion. The loss path reads the
    hidden state that predicts each completion token through `sources` (flat indices into the row: the prompt's
    last token for a completion's first) with its `targets`, in the order of the sequences, and `token_rows` says
    which sequence each belongs to; `masks` (per completion token, 1 = learned) keeps only those targets. A group's
    completions then compute their shared prompt once (GRPO's update; an SFT batch's system prompt and tools
    block), and a token's hidden state is the one it has in its own padded row, up to the order of the sums."""
    ids: list[int] = []
    positions: list[int] = []
    blocks: list[int] = []  # which held prompt each token belongs to
    parts: list[int] = []  # -1 in a prompt, else the completion's index
    sources: list[int] = []
    targets: list[int] = []
    rows: list[int] = []
    last_prompt: list[int] | None = None
    prompt_end = 0
    for index, (prompt, completion) in enumerate(sequences):
        if not prompt:
            raise ValueError("share_prefixes: a sequence has an empty prompt")
        if prompt != last_prompt:
            block = blocks[-1] + 1 if blocks else 0
            ids += prompt
            positions += range(len(prompt))
            blocks += [block] * len(prompt)
            parts += [-1] * len(prompt)
            last_prompt, prompt_end = prompt, len(ids) - 1
        start = len(ids)
        ids += completion
        positions += range(len(prompt), len(prompt) + len(completion))
        blocks += [blocks[prompt_end]] * len(completion)
        parts += [index] * len(completion)
        learned = masks[index] if masks is not None else [1] * len(completion)
        before = [prompt_end, *range(start, start + len(completion) - 1)][: len(completion)]
        for source, token, keep in zip(before, completion, learned, strict=True):
            if keep:
                sources.append(source)
                targets.append(token)
                rows.append(index)
    block_of = torch.tensor(blocks)
    part_of = torch.tensor(parts)
    causal = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
    same_block = block_of[:, None] == block_of[None, :]
    visible = (part_of[None, :] == -1) | (part_of[None, :] == part_of[:, None])
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "attention_mask": (causal & same_block & visible)[None, None],
        "sources": torch.tensor(sources, dtype=torch.long),
        "targets": torch.tensor(targets, dtype=torch.long),
        "token_rows": torch.tensor(rows, dtype=torch.long),
    }


def shared_batch(examples: list[TokenizedExample], longest: int) -> dict[str, torch.Tensor] | None:
    """The examples as one share_prefixes row where they begin alike (the same system prompt and tools block, up
    to the first learned token of any of them) and holding that beginning once leaves out at least SHARE_SAVES of
    their tokens; None where it does not pay, or where an example is longer than `longest` (the longest sequence
    the model computes in such a row exactly) or the row would pass MAX_SHARED_ROW."""
    if len(examples) < 2 or max(map(len, examples)) > longest:
        return None
    first = examples[0].input_ids
    common = min(len(e) for e in examples) - 1  # every example keeps a token after the prefix
    for example in examples:
        learned = next((i for i, m in enumerate(example.loss_mask) if m), len(example))
        common = min(common, learned)
        common = next((i for i in range(common) if example.input_ids[i] != first[i]), common)
    total = sum(map(len, examples))
    if (
        common < 1
        or (len(examples) - 1) * common < SHARE_SAVES * total
        or total - (len(examples) - 1) * common > MAX_SHARED_ROW
    ):
        return None
    prefix = first[:common]
    return share_prefixes([(prefix, e.input_ids[common:]) for e in examples], [e.loss_mask[common:] for e in examples])
