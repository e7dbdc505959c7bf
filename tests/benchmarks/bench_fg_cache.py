"""Host memory of one loader process's foreground-coordinate cache over a store of many cases (run by hand).

    .venv/bin/python tests/benchmarks/bench_fg_cache.py [--cases 1000] [--store /tmp/fg1000.zarr]

Writes (once) a synthetic BraTS-like store of `--cases` cases whose foreground arrays are as large as the real
converter writes them (FOREGROUND_CAP = 10,000 sampled voxels for each of the 3 tumour classes; the images are tiny,
they are not read). Then, in a fresh child process per variant (like a loader worker), a `TrainSampler` plans one
foreground sample from every case (one epoch) and the child reports its RSS growth and the cache's own bytes:

* `bounded`: the sampler as configured (int16, LRU bound `--cache-mb`, default = data.foreground_cache_mb);
* `unbounded int16`: the same with no bound (what keeping int16 alone saves);
* `int64 (before)`: `--before FILE` = the sampling.py of an earlier commit (int64, unbounded), e.g.
  `git show <rev>:distseg/data/sampling.py > /tmp/old_sampling.py`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np


def write_store(path: Path, n_cases: int, per_class: int) -> None:
    from distseg.data.labels import BRATS_LABEL_VALUES, BRATS_REGIONS
    from preprocess.writer import Layout, init_store, root_attrs_base, write_case

    if (path / "zarr.json").is_file() and len(list((path / "cases").glob("*/zarr.json"))) >= n_cases:
        return
    rng = np.random.default_rng(0)
    init_store(path, root_attrs_base("brats3d", ["t1", "t1ce", "t2", "flair"], BRATS_LABEL_VALUES, BRATS_REGIONS))
    shape = (140, 170, 140)  # a cropped BraTS case; only its metadata matters here
    image = np.zeros((4, 4, 4, 4), np.int16)  # never read: plans read shapes and foreground only
    for i in range(n_cases):
        cid = f"case{i:05d}"
        if (path / "cases" / cid / "zarr.json").is_file():
            continue
        fg = {c: rng.integers(0, shape, size=(per_class, 3)) for c in (1, 2, 3)}
        attrs = {"case_id": cid, "spacing": [1.0, 1.0, 1.0], "fold": i % 5,
                 "normalization": {"applied": False, "mask": "nonzero_any", "mean": [0.0] * 4, "std": [1.0] * 4}}
        write_case(path, cid, image, None, fg, attrs, Layout(chunks_zyx=(4, 4, 4)))
        # The sampler plans with the stored shape; pretend the case has its real size (labelled).
        meta_path = path / "cases" / cid / "zarr.json"
        meta = json.loads(meta_path.read_text())
        meta["attributes"].update(shape=[4, *shape], has_label=True)
        meta_path.write_text(json.dumps(meta))


def rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def child(store_path: str, variant: str, cache_mb: int, before: str) -> dict:
    from distseg.data.store import Store

    store = Store.open(store_path)
    cases = store.case_ids()
    if variant == "int64 (before)":
        spec = importlib.util.spec_from_file_location("old_sampling", before)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
        sampler = module.TrainSampler(cases, (128, 128, 128), 1.0, (), seed=0, rank=0, world_size=1)
    else:
        from distseg.data.sampling import TrainSampler

        bound = cache_mb << 20 if variant == "bounded" else 1 << 62
        sampler = TrainSampler(cases, (128, 128, 128), 1.0, (), seed=0, rank=0, world_size=1, batch_size=2,
                               fg_cache_bytes=bound)
    for i in range(len(cases)):  # metadata of every case first, so the RSS growth below is the cache's
        store.case(sampler.case_for(i))
    start = rss_mib()
    for i in range(len(cases)):  # one epoch: every case visited once
        plan = sampler.plan(store, i)
        assert plan.foreground
    cache = sampler._fg_cache
    items = cache._items.values() if hasattr(cache, "_items") else cache.values()
    return {"variant": variant, "rss_growth_mib": rss_mib() - start,
            "cache_mib": sum(a.nbytes for v in items for a in v) / 2**20, "cached_cases": len(cache)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=1000)
    p.add_argument("--per-class", type=int, default=10_000, help="foreground voxels stored per class")
    p.add_argument("--store", default="/tmp/distseg_fg_bench.zarr")
    p.add_argument("--cache-mb", type=int, default=64)
    p.add_argument("--before", default="", help="an earlier sampling.py to measure as 'int64 (before)'")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        sys.stdout.write(json.dumps(child(args.store, args.child[0], args.cache_mb, args.child[1])) + "\n")
        return 0
    write_store(Path(args.store), args.cases, args.per_class)
    variants = ["bounded", "unbounded int16"] + (["int64 (before)"] if args.before else [])
    rows = []
    for variant in variants:
        out = subprocess.run([sys.executable, __file__, "--store", args.store, "--cache-mb", str(args.cache_mb),
                              "--child", variant, args.before or "-"], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    sys.stdout.write(f"{args.cases} cases x 3 classes x {args.per_class} foreground voxels, one epoch of plans, "
                     f"one process (= one loader worker)\n")
    sys.stdout.write(f"{'variant':<18} {'RSS growth MiB':>15} {'cache MiB':>10} {'cases cached':>13}\n")
    for r in rows:
        sys.stdout.write(f"{r['variant']:<18} {r['rss_growth_mib']:>15.1f} {r['cache_mib']:>10.1f} "
                         f"{r['cached_cases']:>13}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
