"""Ingest's duplicate search on the cluster: exact copies, near copies, and which image stays.

Passes over the record parts (``pipelines.ingest.workarea``): exact duplicates grouped by content hash;
the survivors' perceptual hashes grouped by blocks (``pipelines.ingest.dedup``'s scheme) and compared
within groups; then the greedy keep rule (largest first, ties by key) in rounds over the pairs
found; last, every drop sent to its record part as a decision (key, reason, what it duplicates).
No bucket grows with the input: each is sized by rows (``ROWS_PER_BUCKET``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa

from pipelines.ingest import dedup
from pipelines.ingest.config import Job
from pipelines.ingest.workarea import (
    bucket_of,
    buckets_for,
    hash_integers,
    hash_strings,
    once,
    part_name,
    read_bucket,
    run_stage,
    run_starts,
    total,
    write_buckets,
)
from pipelines.views.quality import EXACT_DUPLICATE, NEAR_DUPLICATE

# Rows a bucket of each pass is sized for: tens of MB of Parquet, whatever the input's size.
ROWS_PER_BUCKET = {"exact": 200_000, "near": 2_000_000, "graph": 500_000}


# ------------------------------------------------------------------------------ 4. exact

def _exact_map(job: Job, buckets: int) -> Callable[[int], dict]:
    def task(index: int) -> dict:
        area = job.area()

        def work() -> dict:
            records = area.read_table(f"records/{part_name(index)}")
            keep = np.asarray(records["drop_reason"].to_numpy(zero_copy_only=False) == "")
            records = records.filter(pa.array(keep))
            area_px = np.asarray(records["width"]) * np.asarray(records["height"])
            table = pa.table({"key": records["key"], "loc": np.full(len(records), index),
                              "sha256": records["sha256"], "phash": records["phash"],
                              "area": area_px})
            hashes = np.array([int(s[:16], 16) for s in records["sha256"].to_pylist()],
                              dtype=np.uint64)
            return {"rows": write_buckets(area, "exact-in", index, table,
                                          bucket_of(hashes, buckets))}

        return once(area, f"exact-in/m={index:06d}", work)
    return task


EXACT_SCHEMA = pa.schema([("key", pa.string()), ("loc", pa.int64()), ("sha256", pa.string()),
                          ("phash", pa.uint64()), ("area", pa.int64())])


def _exact_reduce(job: Job) -> Callable[[int], dict]:
    def task(index: int) -> dict:
        area = job.area()

        def work() -> dict:
            table = read_bucket(area, "exact-in", index, EXACT_SCHEMA).sort_by(
                [("sha256", "ascending"), ("area", "descending"), ("key", "ascending")])
            sha = table["sha256"].to_numpy(zero_copy_only=False)
            first = run_starts(sha)
            group_start = np.maximum.accumulate(np.where(first, np.arange(len(sha)), 0))
            reps = table.filter(pa.array(first))
            members = table.filter(pa.array(~first))
            member_rep = table.take(pa.array(group_start[~first]))
            area.write_table(f"reps/{part_name(index)}", reps.select(["key", "loc", "phash",
                                                                       "area"]))
            area.write_table(f"members/{part_name(index)}", pa.table({
                "key": members["key"], "loc": members["loc"], "rep": member_rep["key"]}))
            return {"reps": len(reps), "members": len(members)}

        return once(area, f"reps/{part_name(index)}", work)
    return task


# ------------------------------------------------------------------------------ 5. near

NEAR_SCHEMA = pa.schema([("table", pa.int16()), ("tkey", pa.uint64()), ("phash", pa.uint64()),
                         ("area", pa.int64()), ("key", pa.string()), ("loc", pa.int64())])


def _near_map(job: Job, scheme: dedup.BlockScheme, buckets: int) -> Callable[[int], dict]:
    def task(index: int) -> dict:
        area = job.area()

        def work() -> dict:
            reps = area.read_table(f"reps/{part_name(index)}")
            phash = np.asarray(reps["phash"], dtype=np.uint64)
            tables = len(scheme.tables)
            table_id = np.repeat(np.arange(tables, dtype=np.int16), len(reps))
            tkey = (phash[None, :] & scheme.table_masks[:, None]).ravel()
            repeat = pa.array(np.tile(np.arange(len(reps)), tables))
            rows = pa.table({"table": table_id, "tkey": tkey}).append_column(
                "phash", pa.array(np.tile(phash, tables))).append_column(
                "area", reps["area"].take(repeat)).append_column(
                "key", reps["key"].take(repeat)).append_column("loc", reps["loc"].take(repeat))
            salt = table_id.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
            mixed = hash_integers(tkey ^ salt)
            return {"rows": write_buckets(area, "near-in", index, rows, bucket_of(mixed, buckets))}

        return once(area, f"near-in/m={index:06d}", work)
    return task


def _near_reduce(job: Job, scheme: dedup.BlockScheme) -> Callable[[int], dict]:
    def task(index: int) -> dict:
        area = job.area()

        def work() -> dict:
            rows = read_bucket(area, "near-in", index, NEAR_SCHEMA)
            first, second = dedup.grouped_pairs(
                np.asarray(rows["table"]), np.asarray(rows["tkey"], dtype=np.uint64),
                np.asarray(rows["phash"], dtype=np.uint64), scheme)
            key = rows["key"].to_numpy(zero_copy_only=False)
            area_px, loc = np.asarray(rows["area"]), np.asarray(rows["loc"])
            a_wins = dedup.better(area_px[first], key[first], area_px[second], key[second])
            winner = np.where(a_wins, first, second)
            loser = np.where(a_wins, second, first)
            edges = pa.table({"better": key[winner].tolist(), "better_area": area_px[winner],
                              "worse": key[loser].tolist(), "worse_loc": loc[loser],
                              "worse_area": area_px[loser]},
                             schema=EDGE_SCHEMA)
            area.write_table(f"edges/{part_name(index)}", edges)
            return {"edges": len(edges)}

        return once(area, f"edges/{part_name(index)}", work)
    return task


EDGE_SCHEMA = pa.schema([("better", pa.string()), ("better_area", pa.int64()),
                         ("worse", pa.string()), ("worse_loc", pa.int64()),
                         ("worse_area", pa.int64())])
VERTEX_SCHEMA = pa.schema([("key", pa.string()), ("loc", pa.int64()), ("worse", pa.bool_())])
STATUS_SCHEMA = pa.schema([("key", pa.string()), ("loc", pa.int64()), ("status", pa.int8()),
                           ("of", pa.string())])
JOIN_SCHEMA = pa.schema([("worse", pa.string()), ("better", pa.string()),
                         ("better_area", pa.int64()), ("better_status", pa.int8())])


def _graph_map(job: Job, buckets: int) -> Callable[[int], dict]:
    """Edges to the graph's buckets: its vertices by key, its edges by their better image."""
    def task(index: int) -> dict:
        area = job.area()

        def work() -> dict:
            edges = area.read_table(f"edges/{part_name(index)}")
            vertices = pa.concat_tables([
                pa.table({"key": edges["better"], "loc": pa.nulls(len(edges), pa.int64()),
                          "worse": pa.array(np.zeros(len(edges), bool))}, schema=VERTEX_SCHEMA),
                pa.table({"key": edges["worse"], "loc": edges["worse_loc"],
                          "worse": pa.array(np.ones(len(edges), bool))}, schema=VERTEX_SCHEMA),
            ])
            write_buckets(area, "vertices", index, vertices,
                          bucket_of(hash_strings(vertices["key"]), buckets))
            write_buckets(area, "edges-by-better", index, edges,
                          bucket_of(hash_strings(edges["better"]), buckets))
            return {"edges": len(edges)}

        return once(area, f"vertices/m={index:06d}", work)
    return task


def _status_init(job: Job) -> Callable[[int], dict]:
    """Images with no better neighbour are kept; the others wait for the rounds."""
    def task(index: int) -> dict:
        area = job.area()

        def work() -> dict:
            vertices = read_bucket(area, "vertices", index, VERTEX_SCHEMA).sort_by(
                [("key", "ascending"), ("worse", "descending")])
            key = vertices["key"].to_numpy(zero_copy_only=False)
            first = run_starts(key)
            firsts = vertices.filter(pa.array(first))  # a worse row first, if the key has one
            status = np.where(np.asarray(firsts["worse"]), dedup.UNDECIDED,
                              dedup.KEPT).astype(np.int8)
            area.write_table(f"status-0/{part_name(index)}", pa.table(
                {"key": firsts["key"], "loc": firsts["loc"], "status": status,
                 "of": pa.nulls(len(firsts), pa.string())}, schema=STATUS_SCHEMA))
            return {"undecided": int((status == dedup.UNDECIDED).sum())}

        return once(area, f"status-0/{part_name(index)}", work)
    return task


def _round_join(job: Job, round_: int, buckets: int) -> Callable[[int], dict]:
    """Each edge, with the current status of its better image, to its worse image's bucket."""
    def task(index: int) -> dict:
        area = job.area()

        def work() -> dict:
            status = area.read_table(f"status-{round_}/{part_name(index)}")
            edges = read_bucket(area, "edges-by-better", index, EDGE_SCHEMA)
            lookup = dict(zip(status["key"].to_pylist(), status["status"].to_pylist()))
            better_status = np.array([lookup[k] for k in edges["better"].to_pylist()],
                                     dtype=np.int8)
            joined = pa.table({"worse": edges["worse"], "better": edges["better"],
                               "better_area": edges["better_area"],
                               "better_status": better_status}, schema=JOIN_SCHEMA)
            return {"rows": write_buckets(area, f"join-{round_}", index, joined,
                                          bucket_of(hash_strings(joined["worse"]), buckets))}

        return once(area, f"join-{round_}/m={index:06d}", work)
    return task


def _round_update(job: Job, round_: int) -> Callable[[int], dict]:
    def task(index: int) -> dict:
        area = job.area()

        def work() -> dict:
            status = area.read_table(f"status-{round_}/{part_name(index)}")
            joined = read_bucket(area, f"join-{round_}", index, JOIN_SCHEMA).sort_by(
                [("worse", "ascending"), ("better_area", "descending"), ("better", "ascending")])
            images, decided, of = dedup.resolve_round(
                joined["worse"].to_numpy(zero_copy_only=False),
                joined["better"].to_numpy(zero_copy_only=False),
                np.asarray(joined["better_status"]))
            keys = status["key"].to_pylist()
            new_status = status["status"].to_numpy(zero_copy_only=False).copy()
            new_of = status["of"].to_pylist()
            position = {k: i for i, k in enumerate(keys)}
            for image, value, original in zip(images.tolist(), decided.tolist(), of.tolist()):
                i = position[image]
                if new_status[i] == dedup.UNDECIDED:
                    new_status[i] = value
                    new_of[i] = original if value == dedup.DROPPED else None
            area.write_table(f"status-{round_ + 1}/{part_name(index)}", pa.table(
                {"key": keys, "loc": status["loc"], "status": new_status, "of": new_of},
                schema=STATUS_SCHEMA))
            return {"undecided": int((new_status == dedup.UNDECIDED).sum())}

        return once(area, f"status-{round_ + 1}/{part_name(index)}", work)
    return task


# ------------------------------------------------------------------------------ decisions

DECISION_SCHEMA = pa.schema([("key", pa.string()), ("reason", pa.string()), ("of", pa.string())])


def _members_map(job: Job, buckets: int) -> Callable[[int], dict]:
    def task(index: int) -> dict:
        area = job.area()

        def work() -> dict:
            members = area.read_table(f"members/{part_name(index)}")
            return {"rows": write_buckets(area, "members-by-rep", index, members,
                                          bucket_of(hash_strings(members["rep"]), buckets))}

        return once(area, f"members-by-rep/m={index:06d}", work)
    return task


def _decide(job: Job, final_round: int, graph: bool) -> Callable[[int], dict]:
    """Drops of one graph bucket, sent to their records' parts: near-duplicate images, and
    exact copies of every image of the bucket (of the image if kept, else of what it copies)."""
    members_schema = pa.schema([("key", pa.string()), ("loc", pa.int64()),
                                ("rep", pa.string())])

    def task(index: int) -> dict:
        area = job.area()

        def work() -> dict:
            status = (area.read_table(f"status-{final_round}/{part_name(index)}")
                      if graph else STATUS_SCHEMA.empty_table())
            members = read_bucket(area, "members-by-rep", index, members_schema)
            dropped = status.filter(pa.array(
                np.asarray(status["status"].to_numpy(zero_copy_only=False)) == dedup.DROPPED))
            of_dropped = dict(zip(dropped["key"].to_pylist(), dropped["of"].to_pylist()))
            member_reason = [NEAR_DUPLICATE if rep in of_dropped else EXACT_DUPLICATE
                             for rep in members["rep"].to_pylist()]
            member_of = [of_dropped.get(rep, rep) for rep in members["rep"].to_pylist()]
            decisions = pa.concat_tables([
                pa.table({"key": dropped["key"],
                          "reason": [NEAR_DUPLICATE] * len(dropped), "of": dropped["of"]},
                         schema=DECISION_SCHEMA),
                pa.table({"key": members["key"], "reason": member_reason, "of": member_of},
                         schema=DECISION_SCHEMA),
            ])
            locations = np.concatenate([np.asarray(dropped["loc"].to_numpy(zero_copy_only=False),
                                                   dtype=np.int64),
                                        np.asarray(members["loc"], dtype=np.int64)])
            return {"rows": write_buckets(area, "decisions", index, decisions, locations)}

        return once(area, f"decisions/m={index:06d}", work)
    return task


def find_duplicates(job: Job, parts: int, candidates: int, log: Callable[[str], None],
                    blocks: int | None = None) -> int:
    """Exact and near duplicates of the records parts, decided into ``decisions``; returns how
    many images were dropped as duplicates. ``blocks`` overrides the scheme's choice."""
    exact_buckets = buckets_for(candidates, ROWS_PER_BUCKET["exact"])
    run_stage(parts, _exact_map(job, exact_buckets))
    exact = run_stage(exact_buckets, _exact_reduce(job))
    reps = total(exact, "reps")
    distance = job.config.quality.near_duplicate_distance
    scheme = (dedup.BlockScheme(blocks, distance) if blocks else
              dedup.choose_scheme(distance, reps))
    near_buckets = buckets_for(reps * len(scheme.tables), ROWS_PER_BUCKET["near"])
    log(f"ingest: near duplicates: {reps} distinct images, {scheme.blocks} blocks, "
        f"{len(scheme.tables)} tables, {near_buckets} buckets")
    run_stage(exact_buckets, _near_map(job, scheme, near_buckets))
    edges = total(run_stage(near_buckets, _near_reduce(job, scheme)), "edges")
    graph_buckets = buckets_for(2 * edges, ROWS_PER_BUCKET["graph"])
    round_ = 0
    if edges:  # without pairs every representative is kept: no graph to resolve
        run_stage(near_buckets, _graph_map(job, graph_buckets))
        undecided = total(run_stage(graph_buckets, _status_init(job)), "undecided")
        while undecided:
            run_stage(graph_buckets, _round_join(job, round_, graph_buckets))
            undecided = total(run_stage(graph_buckets, _round_update(job, round_)), "undecided")
            round_ += 1
    log(f"ingest: near duplicates: {edges} pairs within {distance} bits, resolved in "
        f"{round_} round(s)")
    run_stage(exact_buckets, _members_map(job, graph_buckets))
    decided = run_stage(graph_buckets, _decide(job, round_, bool(edges)))
    return total(decided, "rows")
