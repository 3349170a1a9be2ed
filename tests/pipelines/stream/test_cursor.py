"""The data cursor when shards finish out of order: what a resume skips, reads again and counts."""

from __future__ import annotations

import json

from pipelines.stream.cursor import (
    CursorTracker,
    DataCursor,
    epoch_groups,
    epoch_order,
    merge_checkpoint_parts,
)


def _part(tracker: CursorTracker, samples: dict[tuple[int, int], int], exhausted=False) -> dict:
    for (epoch, position), n in samples.items():
        tracker.observe([epoch] * n, [position] * n)
    return tracker.checkpoint_part(exhausted)


def test_the_watermark_moves_over_consumed_runs_and_keeps_the_rest_as_done():
    cursor = DataCursor(seed=3).advanced(5, [(0, 1), (0, 3)])
    assert (cursor.epoch, cursor.shards_consumed, cursor.done) == (0, 0, ((0, 1), (0, 3)))
    cursor = cursor.advanced(5, [(0, 0), (0, 4), (1, 0)])
    assert (cursor.epoch, cursor.shards_consumed, cursor.done) == (0, 2, ((0, 3), (0, 4), (1, 0)))
    cursor = cursor.advanced(5, [(0, 2)])  # the epoch's last gap closes: into the next epoch
    assert (cursor.epoch, cursor.shards_consumed, cursor.done) == (1, 1, ())
    assert DataCursor.from_dict(json.loads(json.dumps(cursor.to_dict()))) == cursor
    # A checkpoint of an earlier version (no "done") still loads.
    assert DataCursor.from_dict({"seed": 3, "epoch": 2, "shards_consumed": 4}).done == ()


def test_a_shard_is_consumed_only_when_trained_and_dropped_samples_add_up_to_what_was_read():
    start = DataCursor(seed=0)
    ranks = [CursorTracker(start), CursorTracker(start)]
    # Shard (0, 0): 6 read, 1 dropped, 5 trained across both ranks -> consumed.
    # Shard (0, 1): 4 read, 3 trained -> in flight (a sample is still in the stream).
    # Shard (0, 2): 3 read, all dropped, no rank saw it -> consumed.
    # Shard (0, 3): still being read (not in the ledger) -> in flight.
    parts = [_part(ranks[0], {(0, 0): 3, (0, 1): 2, (0, 3): 1}),
             _part(ranks[1], {(0, 0): 2, (0, 1): 1})]
    finished = {(0, 0): (6, 1), (0, 1): (4, 0), (0, 2): (3, 3)}
    cursor, in_flight, consumed = merge_checkpoint_parts(start, 5, 2, parts, finished)
    assert (cursor.shards_consumed, cursor.done) == (1, ((0, 2),))
    assert in_flight == 3 + 1  # shard (0, 1)'s and (0, 3)'s trained samples are read again
    assert consumed == {"0:0": 5, "0:1": 3, "0:3": 1}
    for tracker in ranks:
        tracker.close(cursor)
    assert set(ranks[0].open) == {(0, 1), (0, 3)} and set(ranks[1].open) == {(0, 1)}
    # The next checkpoint: the last sample of (0, 1) trained; (0, 3) and (0, 4) finish.
    parts = [_part(ranks[0], {(0, 1): 1, (0, 3): 1, (0, 4): 2}), _part(ranks[1], {})]
    finished = {(0, 1): (4, 0), (0, 3): (2, 0), (0, 4): (2, 0)}
    cursor, in_flight, consumed = merge_checkpoint_parts(cursor, 5, 2, parts, finished)
    assert (cursor.epoch, cursor.shards_consumed, cursor.done, in_flight) == (1, 0, (), 0)
    assert consumed == {"0:1": 1, "0:3": 1, "0:4": 2}  # only what was trained since


def test_a_stream_ended_on_every_rank_has_consumed_every_epoch():
    start = DataCursor(seed=0, epoch=1, shards_consumed=2)
    parts = [_part(CursorTracker(start), {(1, 2): 1}, exhausted=True),
             _part(CursorTracker(start), {}, exhausted=True)]
    cursor, in_flight, _ = merge_checkpoint_parts(start, 5, 2, parts, {})
    assert (cursor.epoch, cursor.shards_consumed, in_flight) == (2, 0, 0)


def test_groups_cover_what_the_cursor_does_not_in_the_epochs_order():
    cursor = DataCursor(seed=5, epoch=0, shards_consumed=3, done=((0, 5), (0, 6)))
    order = epoch_order(10, 5, 0)
    groups = epoch_groups(10, cursor, 0, 2)
    assert groups == [[(3, order[3]), (4, order[4])], [(7, order[7]), (8, order[8])],
                      [(9, order[9])]]
    # A later epoch is read whole.
    assert [p for group in epoch_groups(10, cursor, 1, 4) for p, _ in group] == list(range(10))
