"""The driver: fan cases out as Ray tasks (or run them in-process), collect rows, write the Parquet manifest.

Each case is one Ray task calling a pure converter (`convert_brats_case` / `convert_2d_case`) that writes straight
to shared storage; the driver only gathers the small result rows and writes `<dst>/<name>.manifest.parquet`.
"""

from __future__ import annotations

import itertools
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from distseg.core import exit_codes
from preprocess.common import result_row

logger = logging.getLogger(__name__)

TASK_MAX_RETRIES = 3
"""Ray re-runs a case this many times when its worker process dies (node lost, OOM-kill); writes are atomic."""

WAIT_S = 0.05
"""The driver wakes at least this often to collect finished tasks and refill the window (seconds)."""

EXIT_OK, EXIT_USAGE, EXIT_SOME_FAILED = exit_codes.OK, exit_codes.USAGE, exit_codes.SOME_FAILED


def init_ray(address: str | None, num_cpus: int | None) -> None:
    """Connect to a cluster (`--address`, or RAY_ADDRESS inside `ray job submit`), else start local Ray on 127.0.0.1."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if address:
        ray.init(address=address, log_to_driver=True)
    elif os.environ.get("RAY_ADDRESS"):  # set by the job system for `ray job submit` entrypoints
        ray.init()
    else:
        # A throwaway one-machine cluster on 127.0.0.1 that lives only as long as this command. Left unset, Ray
        # enables token auth here and writes ~/.ray/auth_token, which silently switches every later
        # `ray start --head` on the machine to token mode. RAY_AUTH_MODE=token in the environment still wins.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(
            address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
            log_to_driver=True,
        )
    logger.info("Ray: %s CPUs available", ray.cluster_resources().get("CPU"))


MAX_CASES_PER_TASK = 64
"""Automatic batching never puts more cases than this into one Ray task (the unit of retry and of progress)."""

TASKS_PER_CPU = 64
"""Automatic batching keeps at least this many tasks per cluster CPU, so that the last tasks balance the load."""


def cases_per_task(n_cases: int, cpus: int) -> int:
    """How many cases one Ray task converts: n_cases // (cpus x `TASKS_PER_CPU`), clamped to [1,
    `MAX_CASES_PER_TASK`], so that every CPU still gets at least `TASKS_PER_CPU` tasks to balance the end of the run.

    Ray's per-task cost (submission, scheduling, the result's round trip: ~0.25 ms of driver CPU alone, measured)
    is nothing next to a 3-5 s BraTS case but a large share of a ~20 ms 2D slice; a batch pays it once
    (`tests/benchmarks/bench_ray_driver.py`). 1 251 BraTS cases on 64 CPUs stay one per task; 100 000 slices on 64
    CPUs go 24 per task."""
    return max(1, min(MAX_CASES_PER_TASK, n_cases // (max(1, cpus) * TASKS_PER_CPU)))


def convert_batch(fn: Callable[..., dict[str, Any]], batch: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """One Ray task: `fn(*args)` for each args of the batch, in order (converters return failed rows, never raise)."""
    return [fn(*args) for args in batch]


def run_cases(
    fn: Callable[..., dict[str, Any]],
    jobs: Sequence[tuple[str, tuple[Any, ...]]],
    use_ray: bool,
    desc: str,
    max_in_flight: int | None = None,
    batch: int | None = None,
) -> list[dict[str, Any]]:
    """Run `fn(*args)` for each (case_id, args); returns one row per job, failures included (never raises).

    With Ray, the jobs go `batch` at a time into one task (default `cases_per_task`: 1 unless there are many cases
    per CPU) and at most `max_in_flight` tasks (default: 4 per cluster CPU, at least 64) are submitted at a time and
    refilled as they finish: every `ray.wait` then looks at a window of bounded size, so the driver's work per
    finished task is constant and a 100 000-case conversion costs the driver linear time (a wait over every
    pending task, as before, made it quadratic: `tests/benchmarks/bench_ray_driver.py`). A task whose worker dies
    is retried `TASK_MAX_RETRIES` times as a whole (writes are atomic; a rerun skips unchanged cases); after that
    each of its cases gets a failed row."""
    from tqdm import tqdm

    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(jobs), desc=desc, unit="case", dynamic_ncols=True)
    if not use_ray:
        for _, args in jobs:
            rows.append(fn(*args))
            bar.update()
        bar.close()
        return rows
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    if max_in_flight is None:
        max_in_flight = max(64, 4 * cpus)
    if batch is None:
        batch = cases_per_task(len(jobs), cpus)
    if batch > 1:
        logger.info("%d cases per Ray task (%d tasks on %d CPUs)", batch, -(-len(jobs) // batch), cpus)
    remote = ray.remote(num_cpus=1, max_retries=TASK_MAX_RETRIES, retry_exceptions=False)(convert_batch)
    todo = iter(jobs)
    in_flight: dict[Any, list[str]] = {}
    failed = 0
    while True:
        while len(in_flight) < max_in_flight:
            chunk = list(itertools.islice(todo, batch))
            if not chunk:
                break
            in_flight[remote.remote(fn, [args for _, args in chunk])] = [cid for cid, _ in chunk]
        if not in_flight:
            break
        # One wait per batch of finished tasks, not per task: it returns when a quarter of the window is done or
        # after WAIT_S, and costs O(window) either way.
        refs = list(in_flight)
        done, _ = ray.wait(refs, num_returns=max(1, len(refs) // 4), timeout=WAIT_S, fetch_local=False)
        try:
            results = ray.get(done)
        except Exception:  # some task's worker died TASK_MAX_RETRIES + 1 times: find which, one by one
            results = [_get_or_failures(ray, ref, in_flight[ref]) for ref in done]
        for ref, task_rows in zip(done, results, strict=True):
            del in_flight[ref]
            rows.extend(task_rows)
            failed += sum(row["status"] == "failed" for row in task_rows)
            bar.update(len(task_rows))
        bar.set_postfix(failed=failed, refresh=False)
    bar.close()
    return rows


def _get_or_failures(ray: Any, ref: Any, cids: list[str]) -> list[dict[str, Any]]:
    """The task's rows, or a failed row for each of its cases when its worker died on every retry."""
    try:
        return ray.get(ref)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return [result_row(cid, "failed", f"{cid}: worker failed after retries: {msg}") for cid in cids]


def write_manifest(path: Path | str, rows: list[dict[str, Any]]) -> None:
    """Write the manifest atomically (temp file + rename; in a bucket one PUT) so readers never see a partial
    table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = sorted(rows, key=lambda r: r["case_id"])
    schema = pa.schema([
        ("case_id", pa.string()), ("status", pa.string()), ("error", pa.string()), ("source", pa.string()),
        ("naming", pa.string()), ("label_convention", pa.string()), ("has_label", pa.bool_()),
        ("original_shape_zyx", pa.list_(pa.int64())), ("stored_shape", pa.list_(pa.int64())),
        ("spacing_zyx", pa.list_(pa.float64())), ("crop_box_zyx", pa.string()), ("label_counts", pa.string()),
        ("label_counts_source", pa.string()), ("source_sha256", pa.string()), ("fold", pa.int64()),
        ("split", pa.string()), ("subject", pa.string()), ("slice_index", pa.int64()), ("seconds", pa.float64()),
    ])
    table = pa.Table.from_pylist(rows, schema=schema)
    if isinstance(path, str):  # s3://...: one PUT of the whole table
        from preprocess import bucket

        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        bucket.put_file(path, sink.getvalue().to_pybytes())
        return
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def summarize(rows: list[dict[str, Any]], store_path: Path, manifest: Path) -> int:
    """Log a summary and every failure reason; return the exit status (0 all ok, 3 some failed)."""
    n = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "failed")}
    for r in rows:
        if r["status"] == "failed":
            logger.error("FAILED %s: %s", r["case_id"], r["error"])
    logger.info(
        "%d cases: %d converted, %d skipped (unchanged), %d failed -> %s, %s",
        len(rows), n["ok"], n["skipped"], n["failed"], store_path, manifest,
    )
    return EXIT_SOME_FAILED if n["failed"] else EXIT_OK
