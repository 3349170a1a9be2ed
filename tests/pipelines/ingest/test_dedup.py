"""The near-duplicate scheme finds every pair brute force finds, once, and keeps what the
sequential greedy rule keeps."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.ingest.dedup import (
    DROPPED,
    KEPT,
    UNDECIDED,
    BlockScheme,
    better,
    choose_scheme,
    grouped_pairs,
    resolve_round,
)
from pipelines.views.quality import NEAR_DUPLICATE, select_unique


def _hashes_with_planted_pairs(count: int, max_distance: int, seed: int) -> np.ndarray:
    """Random 64-bit hashes plus, for a tenth of them, a copy at each distance 0..d+2."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2**64, count, dtype=np.uint64)
    planted = []
    for index, value in enumerate(base[: count // 10]):
        bits = rng.choice(64, index % (max_distance + 3), replace=False)
        planted.append(int(value) ^ sum(1 << int(b) for b in bits))
    return np.concatenate([base, np.array(planted, dtype=np.uint64)])


def _brute_force_pairs(hashes: np.ndarray, max_distance: int) -> set[tuple[int, int]]:
    distances = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    return {(int(a), int(b)) for a, b in zip(*np.nonzero(np.triu(distances <= max_distance, 1)))}


def _scheme_pairs(hashes: np.ndarray, scheme: BlockScheme) -> list[tuple[int, int]]:
    tables = len(scheme.tables)
    table = np.repeat(np.arange(tables), len(hashes))
    keys = (hashes[None, :] & scheme.table_masks[:, None]).ravel()
    first, second = grouped_pairs(table, keys, np.tile(hashes, tables), scheme)
    n = len(hashes)
    return [tuple(sorted((int(a) % n, int(b) % n))) for a, b in zip(first, second)]


@pytest.mark.parametrize("max_distance,blocks", [(0, 1), (3, 5), (6, 7), (6, 8), (6, 10)])
def test_every_pair_within_the_distance_is_found_exactly_once(max_distance, blocks):
    hashes = _hashes_with_planted_pairs(2000, max_distance, seed=blocks)
    found = _scheme_pairs(hashes, BlockScheme(blocks, max_distance))
    assert len(found) == len(set(found))  # each pair reported by one table only
    expected = _brute_force_pairs(hashes, max_distance)
    assert len(expected) >= 150 * (max_distance + 1) // (max_distance + 3)
    assert set(found) == expected


def test_the_scheme_grows_its_tables_with_the_number_of_images():
    small, large = choose_scheme(6, 100_000), choose_scheme(6, 1_000_000_000)
    assert len(large.tables) > len(small.tables)
    # At 1B images a group holds a few dozen hashes at most (uniform hashes).
    assert large.expected_comparisons(1_000_000_000) / len(large.tables) < 50
    with pytest.raises(ValueError):
        BlockScheme(6, 6)


def _greedy_by_rounds(n: int, pairs: list[tuple[int, int]], area: np.ndarray,
                      keys: np.ndarray) -> np.ndarray:
    """The cluster's rounds, run on one bucket: every image's final status."""
    a = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    a_wins = better(area[a[0]], keys[a[0]], area[a[1]], keys[a[1]])
    winner, loser = np.where(a_wins, a[0], a[1]), np.where(a_wins, a[1], a[0])
    status = np.full(n, UNDECIDED, dtype=np.int8)
    status[np.setdiff1d(np.arange(n), loser)] = KEPT  # no better neighbour
    of = np.full(n, -1)
    # Grouped by the worse image, best neighbour first: largest area, then smallest key.
    order = np.lexsort((keys[winner], -area[winner], loser))
    winner, loser = winner[order], loser[order]
    for _ in range(n):
        if not (status == UNDECIDED).any():
            break
        pending = status[loser] == UNDECIDED
        images, decided, duplicated = resolve_round(loser[pending], winner[pending],
                                                    status[winner[pending]])
        status[images] = decided
        of[images] = np.where(decided == DROPPED, duplicated, -1)
    return status, of


def test_rounds_keep_what_the_sequential_greedy_rule_keeps():
    rng = np.random.default_rng(3)
    # Chains and clusters of near copies: a ~ b ~ c with a and c far apart is the case where
    # "drop whatever has a better neighbour" and the greedy rule differ.
    hashes = _hashes_with_planted_pairs(400, 6, seed=9)
    chained = [int(h) ^ (0b111111 << 20) for h in hashes[40:80]]  # 6 bits from each planted copy
    hashes = np.concatenate([hashes, np.array(chained, dtype=np.uint64)])
    n = len(hashes)
    area = rng.integers(1, 4, n) * 1000  # many ties, broken by key
    keys = np.array([f"img-{i:05d}" for i in rng.permutation(n)])
    pairs = _brute_force_pairs(hashes, 6)
    assert len(pairs) > 60
    status, of = _greedy_by_rounds(n, sorted(pairs), area, keys)
    priority = [(-int(area[i]), keys[i]) for i in range(n)]
    dropped = select_unique([f"content-{i}" for i in range(n)], [int(h) for h in hashes],
                            priority, 6)
    assert {i for i in range(n) if status[i] == DROPPED} == set(dropped)
    assert all(reason == NEAR_DUPLICATE for reason, _ in dropped.values())
    assert (status != UNDECIDED).all()
    # Each dropped image names a kept one within the distance, the best of them.
    for image in np.flatnonzero(status == DROPPED):
        original = of[image]
        assert status[original] == KEPT and (min(image, original), max(image, original)) in pairs
        kept_neighbours = [j for j in range(n) if status[j] == KEPT
                           and (min(image, j), max(image, j)) in pairs]
        assert original == min(kept_neighbours, key=lambda j: (-area[j], keys[j]))
