"""The preprocessing driver's own cost at scale: `preprocess.runner.run_cases` over N trivial Ray tasks.

    python tests/benchmarks/bench_ray_driver.py [--tasks 100000] [--old-tasks 10000]

Each task returns a result row at once, so the wall time is Ray's scheduling plus the driver; the driver's own
work is the CPU time of its main thread (submitting, waiting, collecting rows, the progress bar), measured with
`time.thread_time`, which leaves out the time it sleeps in `ray.wait` and Ray's own background threads. The old
loop (a `ray.wait` over every pending task and a `sum` over every row on each completion) runs at `--old-tasks`
for comparison: its cost grows with the square of N. Run on a shared 2-core machine: timings are indicative.

The driver's CPU is split in two: inside Ray's API (`.remote()` submission and argument pickling, `ray.wait`,
`ray.get` with the rows' unpickling: timed by wrapping those three calls for the benchmark's duration) and the
loop's own work outside them (batching, bookkeeping, the progress bar). Issue 14's target is about the second:
the driver's own loop under 5 % of the conversion.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402

from preprocess.common import result_row  # noqa: E402
from preprocess.runner import cases_per_task, init_ray, run_cases  # noqa: E402


def trivial(case_id: str) -> dict[str, Any]:
    return result_row(case_id, "ok", "")


def old_loop(jobs: list[tuple[str, tuple[Any, ...]]]) -> list[dict[str, Any]]:
    """The driver loop before issue 14 (kept here only to measure it)."""
    import ray

    remote = ray.remote(num_cpus=1)(trivial)
    rows: list[dict[str, Any]] = []
    pending = {remote.remote(*args): cid for cid, args in jobs}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            pending.pop(ref)
            rows.append(ray.get(ref))
            _ = sum(r["status"] == "failed" for r in rows)
    return rows


class RayApiClock:
    """Main-thread CPU spent inside `ray.remote(...)(f).remote`, `ray.wait` and `ray.get` while installed (the
    module attributes are wrapped, then restored; the code under test calls them through `import ray`)."""

    def __init__(self) -> None:
        self.cpu = 0.0
        self._saved: dict[str, Any] = {}

    def _timed(self, fn):
        def call(*args, **kwargs):
            c0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.cpu += time.thread_time() - c0
        return call

    def __enter__(self) -> RayApiClock:
        self._saved = {name: getattr(ray, name) for name in ("remote", "wait", "get")}
        clock, remote = self, self._saved["remote"]

        def timed_remote(*args, **kwargs):
            decorate = remote(*args, **kwargs)

            def apply(fn):
                task = decorate(fn)
                return type("TimedRemote", (), {"remote": staticmethod(clock._timed(task.remote))})()
            return apply

        ray.remote, ray.wait, ray.get = timed_remote, self._timed(ray.wait), self._timed(ray.get)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, fn in self._saved.items():
            setattr(ray, name, fn)


def measure(run, n: int) -> tuple[float, float, float]:
    """(wall s, driver main-thread CPU s, of which inside Ray's API s)."""
    jobs = [(f"c{i:07d}", (f"c{i:07d}",)) for i in range(n)]
    with RayApiClock() as clock:
        t0, c0 = time.perf_counter(), time.thread_time()
        rows = run(jobs)
        wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
    assert len(rows) == n and all(r["status"] == "ok" for r in rows)
    return wall, cpu, clock.cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, nargs="+", default=[100_000])
    parser.add_argument("--old-tasks", type=int, nargs="*", default=[10_000])
    parser.add_argument("--per-task-s", type=float, default=0.05,
                        help="a real conversion's time per case, to put the driver's cost in proportion")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    init_ray(None, None)
    measure(lambda jobs: run_cases(trivial, jobs, True, "warm-up"), 200)
    cpus = int(ray.cluster_resources()["CPU"])
    print("| loop | cases | wall s | driver main-thread CPU s | of which in Ray's API s | driver us/case |"
          " driver share of trivial run | own loop's share of trivial run | driver share of a real run |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    cases = [(f"bounded window, {cases_per_task(n, cpus)} cases per task (auto, now)", n,
              lambda jobs: run_cases(trivial, jobs, True, "bench")) for n in args.tasks]
    cases += [("bounded window, 1 case per task", n, lambda jobs: run_cases(trivial, jobs, True, "bench", batch=1))
              for n in args.tasks]
    cases += [("wait over all pending (before)", n, old_loop) for n in args.old_tasks]
    for name, n, run in cases:
        wall, cpu, in_ray = measure(run, n)
        # a real run of n cases takes at least n * per_task_s / CPUs; the driver's share of it
        real = max(wall, n * args.per_task_s / cpus)
        print(f"| {name} | {n} | {wall:.1f} | {cpu:.2f} | {in_ray:.2f} | {1e6 * cpu / n:.0f} | "
              f"{100 * cpu / wall:.1f} % | {100 * (cpu - in_ray) / wall:.1f} % | {100 * cpu / real:.2f} % |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
