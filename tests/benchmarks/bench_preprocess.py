"""Preprocessing benchmark on the real BraTS sample cases (run by hand; prints tables, asserts nothing).

    .venv/bin/python tests/benchmarks/bench_preprocess.py            # main table (single core)
    .venv/bin/python tests/benchmarks/bench_preprocess.py --sweep    # + dtype/codec/chunk sweep behind the defaults

Main table, all in one run and on one pinned core:
- seconds per case: nibabel loading the case's five .nii.gz with its defaults (`get_fdata()`, and the cheaper
  `dataobj` int16 read) vs ISA-L decode alone (the floor) vs our full conversion (decode, validate, crop, stats,
  compress, write);
- bytes on disk: stored case vs the five .nii.gz inputs;
- random 4x128^3 patches (and single axial slices) per second from the store vs loading the case from NIfTI each time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "brats2018"
MODS = ("t1", "t1ce", "t2", "flair", "seg")


def _pin_single_core() -> None:
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import numcodecs.blosc
    import zarr

    numcodecs.blosc.set_nthreads(1)
    zarr.config.set({"threading.max_workers": 1})


def _time(fn, repeats: int) -> float:
    """Median wall seconds of `repeats` calls."""
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


LAYOUTS = {"blosc-lz4 (default)": {}, "blosc-zstd1 (--codec zstd)": {"cname": "zstd", "clevel": 1}}


def main_table(repeats: int, seconds: float) -> None:
    import nibabel as nib
    from isal import igzip

    from distseg.data.store import Store
    from preprocess.brats import brats_root_attrs, convert_brats_case
    from preprocess.discover import discover_brats
    from preprocess.writer import Layout, init_store

    cases = [c for c in discover_brats(DATA) if "seg" in c.files]
    tmp = Path(tempfile.mkdtemp(prefix="bench_pp"))
    base = {}
    for case in cases:
        files = [case.files[m] for m in MODS]
        base[case.case_id] = (
            _time(lambda files=files: [nib.load(f).get_fdata() for f in files], repeats),
            _time(lambda files=files: [np.asanyarray(nib.load(f).dataobj) for f in files], repeats),
            _time(lambda files=files: [igzip.decompress(f.read_bytes()) for f in files], repeats),
            sum(f.stat().st_size for f in files),
        )
    stores = {}
    for lname, kw in LAYOUTS.items():
        layout = Layout(**kw)
        rows = []
        for case in cases:
            times = []
            for r in range(repeats):  # a fresh store each time: a first conversion, not a replace
                store_path = tmp / f"{len(stores)}-{r}.zarr"
                init_store(store_path, brats_root_attrs())
                t0 = time.perf_counter()
                row = convert_brats_case(case, store_path, 0, layout)
                times.append(time.perf_counter() - t0)
                assert row["status"] == "ok", row["error"]
                out_bytes = _du(store_path / "cases" / case.case_id)
                if r:
                    shutil.rmtree(store_path)
            f, d, i, in_bytes = base[case.case_id]
            rows.append((case.case_id, f, d, i, statistics.median(times), in_bytes, out_bytes))
        stores[lname] = tmp / f"{len(stores)}-0.zarr"

        print(f"\nConversion with {lname}, single core, median of {repeats} (s/case)")
        hdr = f"{'case':24s} {'nib fdata':>10s} {'nib dataobj':>12s} {'isal only':>10s} {'convert':>9s} " \
              f"{'conv/fdata':>11s} {'conv/dataobj':>13s} {'in MB':>7s} {'store MB':>9s} {'store/in':>9s}"
        print(hdr)
        print("-" * len(hdr))
        for cid, f, d, i, c, ib, ob in rows:
            print(f"{cid:24s} {f:10.3f} {d:12.3f} {i:10.3f} {c:9.3f} {c / f:10.2f}x {c / d:12.2f}x "
                  f"{ib / 1e6:7.2f} {ob / 1e6:9.2f} {ob / ib:8.2f}x")
        tot = [sum(r[k] for r in rows) for k in range(1, 7)]
        print(f"{'TOTAL':24s} {tot[0]:10.3f} {tot[1]:12.3f} {tot[2]:10.3f} {tot[3]:9.3f} {tot[3] / tot[0]:10.2f}x "
              f"{tot[3] / tot[1]:12.2f}x {tot[4] / 1e6:7.2f} {tot[5] / 1e6:9.2f} {tot[5] / tot[4]:8.2f}x")

    rng = np.random.default_rng(0)

    def store_patch(store: Store, size: tuple[int, int, int]) -> None:
        ids = store.case_ids()
        cid = ids[rng.integers(len(ids))]
        shape = store.case(cid).shape[1:]
        start = [int(rng.integers(0, max(s - n, 0) + 1)) for s, n in zip(shape, size, strict=True)]
        store.read_patch(cid, tuple(start), size)

    def nifti_patch(load, size: tuple[int, int, int]) -> None:
        """The naive loader: read the case's NIfTI files, z-score over the brain, cut the same patch + label."""
        case = cases[rng.integers(len(cases))]
        vols = [load(case.files[m]) for m in MODS]
        img = np.stack(vols[:4])  # (C, X, Y, Z)
        brain = np.any(img != 0, axis=0)
        shape = img.shape[:0:-1]
        start = [int(rng.integers(0, max(s - n, 0) + 1)) for s, n in zip(shape, size, strict=True)]
        sl = tuple(slice(s, s + n) for s, n in zip(start[::-1], size[::-1], strict=True))
        patch = img[(slice(None), *sl)].astype(np.float32)
        for c in range(4):
            v = img[c][brain]
            patch[c] = (patch[c] - v.mean()) / v.std() * brain[sl]
        np.asarray(vols[4][sl], dtype=np.uint8)

    def rate(fn) -> float:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn()
            n += 1
        return n / (time.perf_counter() - t0)

    print(f"\nRandom reads, single core ({seconds:.0f} s each). Both sides produce the same sample: z-scored "
          "float32 image patch + uint8 label; NIfTI side loads the case each time")
    names = list(stores)
    hdr = f"{'read':22s} {'NIfTI fdata /s':>15s} {'NIfTI dataobj /s':>17s} " + " ".join(
        f"{n.split(' ')[0] + ' /s':>16s} {'vs fdata':>9s} {'vs dataobj':>10s}" for n in names)
    print(hdr)
    print("-" * len(hdr))
    for name, size in (("4x128^3 patch", (128, 128, 128)), ("axial slice 4x1xYxX", (1, 240, 240))):
        nf = rate(lambda size=size: nifti_patch(lambda f: nib.load(f).get_fdata(), size))
        nd = rate(lambda size=size: nifti_patch(lambda f: np.asanyarray(nib.load(f).dataobj), size))
        cols = []
        for n in names:
            s = Store.open(stores[n])
            sr = rate(lambda s=s, size=size: store_patch(s, size))
            cols.append(f"{sr:16.1f} {sr / nf:8.1f}x {sr / nd:9.1f}x")
        print(f"{name:22s} {nf:15.2f} {nd:17.2f} " + " ".join(cols))
    shutil.rmtree(tmp, ignore_errors=True)


def sweep(seconds: float) -> None:
    """dtype x codec x chunk shape: write time, size, patch and slice read rates (raw zarr reads)."""
    import zarr
    from zarr.codecs import BloscCodec, ZstdCodec

    from preprocess.brats import _as_int16_or_float, _load_checked
    from preprocess.discover import discover_brats

    vols = []
    in_bytes = 0
    for case in discover_brats(DATA):
        v, _, _ = _load_checked(case)
        chans = [_as_int16_or_float(x).T for x in v]
        brain = np.any([c != 0 for c in chans], axis=0)
        box = [np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
        sl = tuple(slice(b[0], b[-1] + 1) for b in box)
        img = np.stack([c[sl] for c in chans]).astype(np.int16)
        m = brain[sl]
        f = img.astype(np.float32)
        for c in range(4):
            f[c] = (f[c] - f[c][m].mean()) / f[c][m].std() * m
        vols.append({"int16": img, "float16": f.astype(np.float16)})
        in_bytes += sum(case.files[k].stat().st_size for k in ("t1", "t1ce", "t2", "flair"))
    rng = np.random.default_rng(0)

    def run(name: str, dtype: str, chunks: tuple[int, int, int], comp) -> None:
        d = Path(tempfile.mkdtemp(prefix="sweep"))
        t = time.perf_counter()
        for i, v in enumerate(vols):
            x = v[dtype]
            ch = (4, *[min(c, s) for c, s in zip(chunks, x.shape[1:], strict=True)])
            zarr.create_array(str(d / f"c{i}"), data=x, chunks=ch, compressors=[comp], fill_value=0)
        tw = (time.perf_counter() - t) / len(vols)
        size = _du(d)
        arrs = [zarr.open_array(str(d / f"c{i}"), mode="r") for i in range(len(vols))]
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            a = arrs[rng.integers(len(arrs))]
            st = [int(rng.integers(0, max(s - 128, 0) + 1)) for s in a.shape[1:]]
            a[:, st[0] : st[0] + 128, st[1] : st[1] + 128, st[2] : st[2] + 128]
            n += 1
        pps = n / (time.perf_counter() - t)
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            a = arrs[rng.integers(len(arrs))]
            a[:, int(rng.integers(a.shape[1]))]
            n += 1
        sps = n / (time.perf_counter() - t)
        files = sum(1 for p in d.rglob("*") if p.is_file()) // len(vols)
        shutil.rmtree(d)
        print(f"{name:26s} {dtype:8s} {str(chunks):16s} {tw:8.3f} {size / in_bytes:9.2f}x {pps:9.1f} {sps:9.1f} "
              f"{files:6d}", flush=True)

    print("\nLayout sweep (image array only, 4 contrasts; size vs the 4 image .nii.gz; single core)")
    hdr = f"{'codec':26s} {'dtype':8s} {'chunk zyx':16s} {'write s':>8s} {'size/in':>10s} {'patch/s':>9s} " \
          f"{'slice/s':>9s} {'files':>6s}"
    print(hdr)
    print("-" * len(hdr))
    codecs = [
        ("blosc-zstd3-shuffle", BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")),
        ("blosc-zstd3-bitshuffle", BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")),
        ("blosc-zstd1-shuffle", BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")),
        ("blosc-zstd5-shuffle", BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")),
        ("blosc-lz4-shuffle", BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")),
        ("zstd3 (no shuffle)", ZstdCodec(level=3)),
    ]
    for name, comp in codecs:
        for dtype in ("int16", "float16"):
            run(name, dtype, (4, 256, 256), comp)
    for chunks in ((1, 256, 256), (4, 256, 256), (8, 128, 128), (16, 64, 64), (32, 128, 128), (64, 64, 64),
                   (128, 128, 128)):
        run("blosc-zstd3-shuffle", "int16", chunks, codecs[0][1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seconds", type=float, default=4.0, help="duration of each read-rate measurement")
    p.add_argument("--sweep", action="store_true", help="also run the dtype/codec/chunk sweep")
    args = p.parse_args()
    if not DATA.is_dir():
        print(f"real sample data not found at {DATA}", file=sys.stderr)
        return 2
    _pin_single_core()
    main_table(args.repeats, args.seconds)
    if args.sweep:
        sweep(max(args.seconds / 2, 1.0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
