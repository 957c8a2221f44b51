"""Text normalisation, exact and near-duplicate clustering (MinHash LSH) and n-gram overlap.

Shared by the data check (report duplicates and leakage) and the data split (keep each cluster inside
one split). Only reads texts; never changes data.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from collections.abc import Iterable

NUM_PERM = 128
SHINGLE = 5
_WORD = re.compile(r"\w+", re.UNICODE)


def normalise_text(text: str) -> str:
    """Case- and whitespace-insensitive form used for exact-duplicate and conflict checks."""
    return " ".join(text.lower().split())


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def shingles(text: str, size: int = SHINGLE) -> set[bytes]:
    """Word n-gram shingles; a text shorter than one shingle is its own single shingle."""
    tokens = words(text)
    if len(tokens) < size:
        return {" ".join(tokens).encode()}
    return {" ".join(tokens[i : i + size]).encode() for i in range(len(tokens) - size + 1)}


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


def _minhashes(texts: Iterable[str]):
    from datasketch import LeanMinHash, MinHash

    return [LeanMinHash(m) for m in MinHash.bulk([shingles(t) for t in texts], num_perm=NUM_PERM)]


def _lsh(threshold: float):
    from datasketch import MinHashLSH

    # Banding tuned for recall (about 95% of pairs at the threshold, all above 0.9 become candidates);
    # every candidate is then confirmed by its estimated Jaccard, so precision is not lost.
    return MinHashLSH(threshold=threshold, num_perm=NUM_PERM, weights=(0.05, 0.95))


def near_duplicate_pairs(texts: list[str], threshold: float = 0.8) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, whose estimated word-5-gram Jaccard similarity is at least threshold."""
    hashes = _minhashes(texts)
    lsh = _lsh(threshold)
    pairs = []
    for index, minhash in enumerate(hashes):
        for other in lsh.query(minhash):
            if minhash.jaccard(hashes[other]) >= threshold:
                pairs.append((other, index))
        lsh.insert(index, minhash)
    return pairs


def clusters_from_pairs(n: int, pairs: Iterable[tuple[int, int]]) -> list[list[int]]:
    union = UnionFind(n)
    for a, b in pairs:
        union.union(a, b)
    return sorted((g for g in union.groups() if len(g) > 1), key=lambda g: (-len(g), g[0]))


def near_duplicates_across(texts: list[str], others: list[str], threshold: float = 0.8) -> list[tuple[int, int]]:
    """Pairs (i in texts, j in others) that are near duplicates of each other."""
    if not texts or not others:
        return []
    other_hashes = _minhashes(others)
    lsh = _lsh(threshold)
    for index, minhash in enumerate(other_hashes):
        lsh.insert(index, minhash)
    pairs = []
    for index, minhash in enumerate(_minhashes(texts)):
        for other in lsh.query(minhash):
            if minhash.jaccard(other_hashes[other]) >= threshold:
                pairs.append((index, other))
    return pairs


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
