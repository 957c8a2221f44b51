"""Group tokenized examples into padded batches of similar length, in a seeded order.

Length grouping keeps padding low without packing: examples are shuffled, sorted by length inside
large windows, cut into batches, and the batches shuffled again so lengths do not trend over time.
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
