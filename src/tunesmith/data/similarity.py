"""Text normalisation, exact and near-duplicate clustering (MinHash LSH) and n-gram overlap.

Shared by the data check (report duplicates and leakage) and the data split (keep each cluster inside
one split). Only reads texts; never changes data.

Near duplicates are length-aware. Fine-tuning examples are often 10-60 words, where one changed word
kills up to five of fourteen word 5-grams; so examples are compared on character 5-grams of their
normalised text, and the difference allowed stops shrinking below `SHORT_SHINGLES` 5-grams: two
examples are near duplicates when the 5-grams they do not share are at most (1 - threshold) of all
their 5-grams, or of `SHORT_SHINGLES` when they have fewer (32 at 0.8: one changed word of up to
about twelve letters, or three typos), with a Jaccard similarity of at least `MIN_JACCARD`.

A tolerant measure alone would join examples that share a prompt template and differ in one value
(another age, another medication, another label): different examples, though a word or two apart.
Their difference is in the answer, which is what a model learns, so near duplicates must also have
answers that agree: the same words, numbers and symbols in the same order (sentence punctuation aside,
a word of four or more letters also when one interior letter is mistyped). A replaced, added or moved
word makes short answers different ("this set contains another set" is not its reverse); answers of
LONG_ANSWER tokens or more may also differ in (1 - threshold) / 4 of their words, never in a number.
Prompts may differ freely within the 5-gram rule. A plain-text record is its own answer.
Measured by bench/data_check.py: planted pairs by length, and no false clusters on the quickstart data
or on a real-text file of standard-library docstrings.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

SHINGLE_CHARS = 5
SHORT_SHINGLES = 160
MIN_JACCARD = 0.5
LONG_ANSWER = 100
NUM_PERM = 128
_WORD = re.compile(r"\w+", re.UNICODE)
_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)
_SENTENCE_MARKS = frozenset(".,;:!?'\"")
_SEED = 20251117
_rng = np.random.default_rng(_SEED)
# Multiply-shift hashing (odd 64-bit multipliers, high 32 bits kept): one hash function per permutation.
_MULTIPLIERS = _rng.integers(1, 2**63, NUM_PERM, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
_OFFSETS = _rng.integers(0, 2**63, NUM_PERM, dtype=np.uint64)
_BAND_MIX = _rng.integers(1, 2**63, NUM_PERM, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def normalise_text(text: str) -> str:
    """Case- and whitespace-insensitive form used for exact-duplicate and conflict checks."""
    return " ".join(text.lower().split())


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def char_shingles(text: str, size: int = SHINGLE_CHARS) -> np.ndarray:
    """The distinct character 5-grams of the normalised text (UTF-8 bytes), each as its exact integer value,
    sorted; a text shorter than one 5-gram is its own single shingle."""
    data = np.frombuffer(normalise_text(text).encode(), dtype=np.uint8).astype(np.uint64)
    if len(data) < size:
        return np.array([int.from_bytes(data.astype(np.uint8).tobytes() or b"\0", "little")], dtype=np.uint64)
    value = np.zeros(len(data) - size + 1, dtype=np.uint64)
    for offset in range(size):
        value |= data[offset : len(data) - size + 1 + offset] << np.uint64(8 * offset)
    return np.unique(value)


def text_hash(text: str) -> str:
    return hashlib.sha256(normalise_text(text).encode()).hexdigest()


class UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def groups(self) -> list[list[int]]:
        found: dict[int, list[int]] = defaultdict(list)
        for i in range(len(self.parent)):
            found[self.find(i)].append(i)
        return list(found.values())


def exact_clusters(texts: list[str]) -> list[list[int]]:
    """Indices of texts equal after normalisation, clusters of two or more."""
    by_key: dict[str, list[int]] = defaultdict(list)
    for index, text in enumerate(texts):
        by_key[normalise_text(text)].append(index)
    return [group for group in by_key.values() if len(group) > 1]


def is_near(shared: int, union: int, threshold: float) -> bool:
    """The length-aware rule on the 5-gram counts of two texts (see the module docstring)."""
    allowed = (1 - threshold) * max(union, SHORT_SHINGLES) + 1e-9  # 0.2 * 160 is 31.999... in floating point
    return union - shared <= allowed and shared >= min(threshold, MIN_JACCARD) * union


def _typo(a: str, b: str) -> bool:
    """One interior letter substituted, dropped, added or swapped with its neighbour (words of four or more
    letters, first and last letters kept: "true" and "tue" are one typo apart, "extension" and "extensions"
    or "index" and "rindex" are different words)."""
    if max(len(a), len(b)) < 4 or abs(len(a) - len(b)) > 1 or not (a.isalpha() and b.isalpha()):
        return False
    if a[0] != b[0] or a[-1] != b[-1]:
        return False
    start = 0
    while start < min(len(a), len(b)) and a[start] == b[start]:
        start += 1
    ra, rb = a[start:], b[start:]
    return ra[1:] == rb[1:] or ra[1:] == rb or ra == rb[1:] or (ra[:2] == rb[1::-1] and ra[2:] == rb[2:])


def _answer_tokens(text: str) -> list[str]:
    return [t for t in _TOKEN.findall(text.lower()) if t not in _SENTENCE_MARKS]


def answers_agree(first: str, second: str, threshold: float = 0.8) -> bool:
    """Whether two answers say the same (see the module docstring): the same words, numbers and symbols in
    the same order, sentence punctuation aside and a word also when misspelt; answers of LONG_ANSWER tokens
    or more may also be reordered and differ in (1 - threshold) / 4 of their words, never in a number."""
    a, b = _answer_tokens(first), _answer_tokens(second)
    if len(a) == len(b) and all(x == y or _typo(x, y) for x, y in zip(a, b, strict=True)):
        return True
    if max(len(a), len(b)) < LONG_ANSWER:
        return False
    ca, cb = Counter(a), Counter(b)
    missing, spare = list((ca - cb).elements()), list((cb - ca).elements())
    unmatched = []
    for token in missing:
        match = next((i for i, other in enumerate(spare) if _typo(token, other)), None)
        if match is None:
            unmatched.append(token)
        else:
            spare.pop(match)
    if any(char.isdigit() for token in unmatched + spare for char in token):
        return False
    return max(len(unmatched), len(spare)) <= (1 - threshold) / 4 * max(len(a), len(b))


def _signatures(shingle_sets: Sequence[np.ndarray], chunk: int = 1 << 20) -> np.ndarray:
    """MinHash signatures (n x NUM_PERM, uint32) of the shingle sets, computed a chunk of shingles at a time."""
    signatures = np.empty((len(shingle_sets), NUM_PERM), dtype=np.uint32)
    start = 0
    while start < len(shingle_sets):
        stop, total = start, 0
        while stop < len(shingle_sets) and (total == 0 or total + len(shingle_sets[stop]) <= chunk):
            total += len(shingle_sets[stop])
            stop += 1
        values = np.concatenate(shingle_sets[start:stop])
        offsets = np.cumsum([0] + [len(s) for s in shingle_sets[start : stop - 1]])
        for first in range(0, NUM_PERM, 16):
            block = slice(first, first + 16)
            hashed = ((_MULTIPLIERS[block, None] * values + _OFFSETS[block, None]) >> np.uint64(32)).astype(np.uint32)
            signatures[start:stop, block] = np.minimum.reduceat(hashed, offsets, axis=1).T
        start = stop
    return signatures


def _band_rows(threshold: float) -> int:
    """Rows per LSH band: the most (fewest chance candidates) that still make 95% of pairs at the threshold
    candidates, with NUM_PERM // rows bands."""
    return max(r for r in range(1, 17) if 1 - (1 - threshold**r) ** (NUM_PERM // r) >= 0.95 or r == 1)


def _candidates(signatures: np.ndarray, members: np.ndarray, rows: int, left: int | None) -> set[tuple[int, int]]:
    """Pairs of members sharing an LSH band; with `left`, only pairs of one index below it and one not."""
    found: set[tuple[int, int]] = set()
    if len(members) < 2:
        return found
    for band in range(NUM_PERM // rows):
        block = slice(band * rows, (band + 1) * rows)
        keys = (signatures[members, block].astype(np.uint64) * _BAND_MIX[block]).sum(axis=1)
        order = np.argsort(keys, kind="stable")
        ordered = keys[order]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        sizes = np.diff(np.r_[starts, len(ordered)])
        for start, size in zip(starts[sizes > 1].tolist(), sizes[sizes > 1].tolist(), strict=True):
            bucket = sorted(members[order[start : start + size]].tolist())
            if left is None:
                found.update((a, b) for i, a in enumerate(bucket) for b in bucket[i + 1 :])
            else:
                found.update((a, b) for a in bucket if a < left for b in bucket if b >= left)
    return found


def _near_pairs(
    texts: list[str], answers: list[str], threshold: float, left: int | None = None
) -> list[tuple[int, int]]:
    """Confirmed near-duplicate pairs among texts, or with `left` across texts[:left] and texts[left:].

    Copies of one text on one side are hashed once and joined to their first (a star: enough for clusters)."""
    copies: dict[tuple[bool, str], list[int]] = defaultdict(list)
    for index, text in enumerate(texts):
        copies[(left is not None and index >= left, normalise_text(text))].append(index)
    unique = [group[0] for group in copies.values()]
    copies_of = {group[0]: group for group in copies.values()}
    pairs = {(group[0], other) for group in copies.values() for other in group[1:]} if left is None else set()
    shingles = [char_shingles(texts[i]) for i in unique]
    signatures = _signatures(shingles)
    sizes = np.array([len(s) for s in shingles])
    everyone = np.arange(len(unique))
    cut = None if left is None else int(np.searchsorted(unique, left))
    candidates = _candidates(signatures, everyone, _band_rows(threshold), cut)
    # Short texts may be near at a lower Jaccard; only they can be (both have under SHORT_SHINGLES 5-grams).
    low = max(min(threshold, MIN_JACCARD), threshold - 0.25)
    if low < threshold:
        candidates |= _candidates(signatures, everyone[sizes < SHORT_SHINGLES], _band_rows(low), cut)
    for a, b in candidates:
        shared = len(np.intersect1d(shingles[a], shingles[b], assume_unique=True))
        i, j = unique[a], unique[b]
        if is_near(shared, int(sizes[a] + sizes[b]) - shared, threshold) and answers_agree(
            answers[i], answers[j], threshold
        ):
            pairs.update((c, j) for c in (copies_of[i] if left is not None else [i]))
    return sorted(pairs)


def near_duplicate_pairs(
    texts: list[str], threshold: float = 0.8, answers: list[str] | None = None
) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, that are near duplicates (length-aware 5-gram rule, answers that agree).
    `answers`: each text's answer; the whole text when not given."""
    return _near_pairs(texts, texts if answers is None else answers, threshold)


def clusters_from_pairs(n: int, pairs: Iterable[tuple[int, int]]) -> list[list[int]]:
    union = UnionFind(n)
    for a, b in pairs:
        union.union(a, b)
    return sorted((g for g in union.groups() if len(g) > 1), key=lambda g: (-len(g), g[0]))


def near_duplicates_across(
    texts: list[str],
    others: list[str],
    threshold: float = 0.8,
    answers: list[str] | None = None,
    other_answers: list[str] | None = None,
) -> list[tuple[int, int]]:
    """Pairs (i in texts, j in others) that are near duplicates of each other."""
    if not texts or not others:
        return []
    both = (texts if answers is None else answers) + (others if other_answers is None else other_answers)
    pairs = _near_pairs(texts + others, both, threshold, left=len(texts))
    return [(i, j - len(texts)) for i, j in pairs]


def ngram_size(text: str) -> int:
    """13-grams as in contamination studies; 8-grams for short texts that have few 13-grams."""
    return 13 if len(words(text)) >= 40 else 8


def _ngrams(tokens: list[str], size: int) -> set[int]:
    # Hashes, not tuples: a large reference file holds millions of n-grams.
    return {hash(tuple(tokens[i : i + size])) for i in range(len(tokens) - size + 1)}


def ngram_overlaps(texts: list[str], others: list[str], boilerplate_share: float = 0.01) -> list[int]:
    """Indices of texts sharing at least one n-gram with any of others.

    N-grams found in more than boilerplate_share of the other texts (and in at least 5 of them) are
    shared instructions or templates, not leaked content, and are ignored.
    """
    tokenised = [words(t) for t in others]
    sizes = {ngram_size(t) for t in texts} or {13}
    seen: dict[int, Counter] = {size: Counter() for size in sizes}
    for tokens in tokenised:
        for size in sizes:
            seen[size].update(_ngrams(tokens, size))
    limit = max(5, int(boilerplate_share * len(others)))
    leaked = []
    for index, text in enumerate(texts):
        size = ngram_size(text)
        grams = _ngrams(words(text), size)
        if any(0 < seen[size][g] < limit for g in grams):
            leaked.append(index)
    return leaked
