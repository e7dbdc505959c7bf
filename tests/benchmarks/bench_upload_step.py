"""Step time while a checkpoint uploads to object storage (run by hand; never part of the test suite).

    GLOO_SOCKET_IFNAME=lo RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 python tests/benchmarks/bench_upload_step.py \
        [--steps 40] [--every 10] [--features 16,32,64,128,256] [--ranks 2] [--nice 0,10] [--server process]

The same training run through the real launcher (`deepspeed --num_gpus R launch/train.py`, unet3d on a synthetic
BraTS store, fp32, ZeRO 2, a checkpoint every `--every` steps): once with `run.output_root` on POSIX (the
baseline), then with `run.output_root=s3://...` on a real S3 server on loopback (moto) once per upload niceness in
`--nice` (`checkpoint.upload_nice`: each node's first rank hands the tag to a child process at that niceness
while training goes on, `distseg.train.mirror`). Step times come back from the runs' TensorBoard events
(`perf/step_time_s`, one per step).

The S3 server: on a cluster it runs elsewhere and costs the training node nothing. `--server process` (default)
runs moto in its own process at nice 19, the nearest a single machine comes to that (it still takes idle CPU);
`--server thread` runs it in this process at normal priority (an S3 server competing with the ranks: the worst
case). Printed: the checkpoint's size, mean step time over every step (the first 3 excluded: warm-up) and over the
steps that follow a save (`--window` of them: the upload's time), per output, and the ratios s3 / POSIX (target
<= 1.1x, issue #14).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUCKET = "bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(GLOO_SOCKET_IFNAME="lo", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONPATH=str(REPO),
               OMP_NUM_THREADS="1", **extra)
    return env


def _run(cmd: list[str], env: dict[str, str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if rc != 0:
        sys.exit(f"{' '.join(cmd)} failed ({rc}); see {log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - t0


def _step_times(tb_dir: Path) -> dict[int, float]:
    from distseg.train.monitor import read_events

    return dict(read_events(tb_dir)["perf/step_time_s"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=10, help="checkpoint every N steps")
    p.add_argument("--window", type=int, default=4, help="steps after each save counted as 'while uploading'")
    p.add_argument("--features", default="16,32,64,128,256", help="unet3d widths (checkpoint size)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--nice", default="0,10", help="checkpoint.upload_nice values to run, comma-separated")
    p.add_argument("--server", choices=("process", "thread"), default="process",
                   help="moto in its own process at nice 19 (default) or in this process")
    args = p.parse_args()

    import boto3

    work = Path(tempfile.mkdtemp(prefix="bench_upload_"))
    host, port = "127.0.0.1", _free_port()
    if args.server == "thread":
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address=host, port=port)
        server.start()
        stop = server.stop
    else:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=lambda: os.nice(19))
        stop = proc.terminate
        for _ in range(300):
            try:
                socket.create_connection((host, port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
    s3_env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench", "AWS_REGION": "us-east-1",
              "AWS_SECRET_ACCESS_KEY": "bench"}
    boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"], region_name="us-east-1", aws_access_key_id="bench",
                 aws_secret_access_key="bench").create_bucket(Bucket=BUCKET)
    env = _env(s3_env)
    py = sys.executable
    _run([py, "-m", "preprocess", "synth", "--kind", "brats", "--n", "6", "--dst", str(work / "raw"), "--shape",
          "48x48x32"], env, work / "synth.log")
    _run([py, "-m", "preprocess", "brats", "--src", str(work / "raw"), "--dst", str(work), "--name", "brats",
          "--serial", "--folds", "3"], env, work / "prep.log")
    deepspeed = str(Path(py).with_name("deepspeed"))
    common = ["--config", "configs/debug.yaml", f"data.store={work / 'brats.zarr'}", "deepspeed.precision=fp32",
              "deepspeed.zero_stage=2", f"train.steps={args.steps}", "train.val_every=0",
              f"checkpoint.every={args.every}", "checkpoint.keep_last=2", "monitor.log_every=1",
              "monitor.image_every=0", "model.preset=default", f"model.overrides.features=[{args.features}]"]
    results: dict[str, tuple[dict[int, float], float, int]] = {}
    outputs = [("posix", str(work / "posix"), 0)] + [
        (f"s3 nice {n}", f"s3://{BUCKET}/out{n}", int(n)) for n in args.nice.split(",")]
    for name, out, nice in outputs:
        cmd = [deepspeed, "--num_gpus", str(args.ranks), "--master_addr", "127.0.0.1", "--master_port",
               str(_free_port()), "launch/train.py", *common, f"run.output_root={out}", "run.name=bench",
               f"run.staging_dir={work / f'staging{nice}'}", f"checkpoint.upload_nice={nice}"]
        wall = _run(cmd, env, work / f"train_{name.replace(' ', '_')}.log")
        run_dir = (work / "posix" if name == "posix" else work / f"staging{nice}") / "runs" / "bench"
        tags = sorted((run_dir / "checkpoints").glob("step_*"))
        size = sum(f.stat().st_size for f in tags[-1].rglob("*") if f.is_file()) if tags else 0
        results[name] = (_step_times(run_dir / "tb"), wall, size)
    stop()

    saves = range(args.every, args.steps, args.every)  # the last save ends the run: nothing trains after it
    after = {s + k for s in saves for k in range(1, args.window + 1)}

    def means(times: dict[int, float]) -> tuple[float, float]:
        steady = [t for s, t in times.items() if s > 3]
        during = [t for s, t in times.items() if s in after]
        return statistics.mean(steady), statistics.mean(during) if during else float("nan")

    print(f"\nunet3d features [{args.features}], {args.ranks} ranks, fp32, ZeRO 2, {args.steps} steps, checkpoint "
          f"every {args.every}; checkpoint size {results['posix'][2] / 2**20:.0f} MiB")
    print(f"S3 server: {'moto in its own process at nice 19' if args.server == 'process' else 'moto in this process'}")
    print(f"{'output':12} {'step s (all)':>13} {'step s (after save)':>20} {'wall s':>8} {'x posix (all)':>14} "
          f"{'x posix (after save)':>21}")
    base = means(results["posix"][0])
    for name, (times, wall, _) in results.items():
        row = means(times)
        print(f"{name:12} {row[0]:13.3f} {row[1]:20.3f} {wall:8.1f} {row[0] / base[0]:13.2f}x "
              f"{row[1] / base[1]:20.2f}x")
    print(f"target: s3 step time while uploading <= 1.1x POSIX (the {args.window} steps after each save)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
