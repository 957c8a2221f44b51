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
from tunesmith.train.loss import IGNORE

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
