"""Near-duplicate search on 64-bit perceptual hashes that stays exact and small at 1B images.

The scheme (Manku, Jain and Das Sarma, WWW 2007): split the 64 bits into ``m`` blocks. Two hashes
at Hamming distance <= d differ in at most d blocks, so they agree on at least m - d whole
blocks: for every choice of m - d blocks (C(m, d) "tables"), hashes are grouped by their value on
those blocks, and only hashes in one group are compared. Every pair within d shares a group in
at least one table (recall 1 by construction); a pair is reported by the first table in which it
groups, so it is reported once. ``m`` trades tables (rows to shuffle) against group size
(comparisons): ``choose_scheme`` picks it for the expected number of images.

Which image of a near-duplicate group is kept is the greedy rule: images in priority order
(largest first, ties by key), each kept unless a better image within d (or with the same bytes)
was kept. ``resolve_round`` computes it on the cluster as rounds over the near-duplicate edges,
each deciding every image whose better neighbours are all decided; it ends with the same kept set
as the sequential rule (``pipelines.views.quality.select_unique``).

Pure functions of numpy arrays: no I/O, no Ray.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

# Emitting and shuffling one (image, table) row costs about as much as this many comparisons
# within a group: fitted to benchmarks/ingest_scale.py at 1M and 3M images with 8 blocks and at
# 1M with 9 (docs/scale.md).
EMIT_COST_IN_COMPARISONS = 150.0
MAX_BLOCKS = 16


@dataclass(frozen=True)
class BlockScheme:
    """m blocks of the 64 bits, and the C(m, d) tables of m - d blocks each."""

    blocks: int
    max_distance: int
    bounds: tuple[tuple[int, int], ...] = field(init=False)
    tables: tuple[tuple[int, ...], ...] = field(init=False)

    def __post_init__(self):
        m, d = self.blocks, self.max_distance
        if not 0 <= d < m <= MAX_BLOCKS:
            raise ValueError(f"need 0 <= max_distance < blocks <= {MAX_BLOCKS}, got d={d}, m={m}")
        edges = np.linspace(0, 64, m + 1).round().astype(int)
        object.__setattr__(self, "bounds", tuple(zip(edges[:-1].tolist(), edges[1:].tolist())))
        object.__setattr__(self, "tables", tuple(itertools.combinations(range(m), m - d)))

    @property
    def block_masks(self) -> np.ndarray:
        return np.array([((1 << (hi - lo)) - 1) << lo for lo, hi in self.bounds], dtype=np.uint64)

    @property
    def table_masks(self) -> np.ndarray:
        """(T,) the bits each table groups on."""
        blocks = self.block_masks
        return np.array([np.bitwise_or.reduce(blocks[list(t)]) for t in self.tables],
                        dtype=np.uint64)

    def key_bits(self, table: int) -> int:
        return sum(hi - lo for index, (lo, hi) in enumerate(self.bounds)
                   if index in self.tables[table])

    def first_table(self) -> np.ndarray:
        """For each m-bit set of agreeing blocks, the first table it contains (-1: none)."""
        lookup = np.full(1 << self.blocks, -1, dtype=np.int32)
        table_bits = [sum(1 << b for b in t) for t in self.tables]
        for agreeing in range(1 << self.blocks):
            for index, bits in enumerate(table_bits):
                if agreeing & bits == bits:
                    lookup[agreeing] = index
                    break
        return lookup

    def expected_comparisons(self, images: int) -> float:
        """Comparisons per image for uniformly spread hashes: tables x expected group size."""
        return sum(images / 2.0 ** self.key_bits(t) for t in range(len(self.tables)))

    def cost_per_image(self, images: int) -> float:
        return len(self.tables) * EMIT_COST_IN_COMPARISONS + self.expected_comparisons(images)


def choose_scheme(max_distance: int, images: int) -> BlockScheme:
    """The block count with the least expected work per image for ``images`` images."""
    options = [BlockScheme(m, max_distance) for m in range(max_distance + 1, MAX_BLOCKS + 1)
               if math.comb(m, max_distance) <= 5000]
    return min(options, key=lambda scheme: scheme.cost_per_image(max(images, 2)))


def block_agreement(a: np.ndarray, b: np.ndarray, scheme: BlockScheme) -> np.ndarray:
    """For hash pairs, the m-bit set of blocks on which they agree."""
    differing = np.bitwise_xor(a, b)
    agreeing = np.zeros(len(a), dtype=np.int64)
    for index, mask in enumerate(scheme.block_masks):
        agreeing |= ((differing & mask) == 0).astype(np.int64) << index
    return agreeing


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.bitwise_xor(a.astype(np.uint64), b.astype(np.uint64)))


def grouped_pairs(table_bn: np.ndarray, key_bn: np.ndarray, phash_bn: np.ndarray,
                  scheme: BlockScheme) -> tuple[np.ndarray, np.ndarray]:
    """Row pairs (i, j) of one bucket's rows that share a (table, key) group, are within the
    scheme's distance, and whose first shared table is this one: each pair exactly once."""
    order = np.lexsort((key_bn, table_bn))
    table, key, phash = table_bn[order], key_bn[order], phash_bn[order]
    n = len(order)
    if n < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    starts = np.flatnonzero(np.r_[True, (table[1:] != table[:-1]) | (key[1:] != key[:-1])])
    lengths = np.diff(np.r_[starts, n])
    run_start = np.repeat(starts, lengths)
    run_end = run_start + np.repeat(lengths, lengths)
    lookup = scheme.first_table()
    firsts, seconds = [], []
    # Offset k compares each row with the row k after it in its run: the work is the number of
    # pairs in runs, sum L(L-1)/2, however long the longest run.
    alive = np.flatnonzero(run_end - np.arange(n) > 1)
    offset = 1
    while len(alive):
        left, right = alive, alive + offset
        close = hamming(phash[left], phash[right]) <= scheme.max_distance
        left, right = left[close], right[close]
        first = lookup[block_agreement(phash[left], phash[right], scheme)]
        mine = first == table[left]
        firsts.append(order[left[mine]])
        seconds.append(order[right[mine]])
        offset += 1
        alive = alive[run_end[alive] - alive > offset]
    if not firsts:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(firsts), np.concatenate(seconds)


def better(area_a: np.ndarray, key_a: np.ndarray, area_b: np.ndarray,
           key_b: np.ndarray) -> np.ndarray:
    """Whether image a wins over image b: larger area first, ties by the smaller key."""
    return np.asarray((area_a > area_b) | ((area_a == area_b) & (key_a < key_b)), dtype=bool)


KEPT, DROPPED, UNDECIDED = 1, 2, 0


def resolve_round(worse: np.ndarray, better: np.ndarray,
                  better_status: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One round of the greedy rule over near-duplicate edges.

    Each row is an edge: ``worse`` image, its ``better`` neighbour and that neighbour's current
    status. Rows must be grouped by ``worse`` and, within a group, ordered best neighbour first.
    An image is dropped once a better neighbour is kept (and named as the best kept one), kept
    once every better neighbour is dropped; the others wait for a later round. Returns (images
    decided, their status, the image each dropped one duplicates).
    """
    if not len(worse):
        return worse[:0], np.empty(0, np.int8), better[:0]
    starts = np.flatnonzero(np.r_[True, worse[1:] != worse[:-1]])
    kept = better_status == KEPT
    any_kept = np.logical_or.reduceat(kept, starts)
    all_dropped = np.logical_and.reduceat(better_status == DROPPED, starts)
    first_kept = np.minimum.reduceat(np.where(kept, np.arange(len(worse)), len(worse)), starts)
    status = np.where(any_kept, DROPPED, np.where(all_dropped, KEPT, UNDECIDED)).astype(np.int8)
    of = better[np.minimum(first_kept, len(worse) - 1)]
    decided = status != UNDECIDED
    return worse[starts][decided], status[decided], of[decided]
