"""Step time while a checkpoint uploads to object storage (run by hand; never part of the test suite).

    GLOO_SOCKET_IFNAME=lo RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 python tests/benchmarks/bench_upload_step.py \
        [--steps 40] [--every 10] [--features 16,32,64,128,256] [--ranks 2]

The same training run twice through the real launcher (`deepspeed --num_gpus R launch/train.py`, unet3d on a
synthetic BraTS store, fp32, ZeRO 2, a checkpoint every `--every` steps): once with `run.output_root` on POSIX (the
baseline), once with `run.output_root=s3://...` on a real S3 server on loopback (moto, in this process), where each
node's first rank uploads the tag in a background thread while training goes on (`distseg.train.mirror`). Step
times come back from the runs' TensorBoard events (`perf/step_time_s`, one per step).

Printed: the checkpoint's size, mean step time over every step (the first 3 excluded: warm-up), and over the steps
that follow a save (`--window` of them: the upload's time), per output, and the ratios s3 / POSIX (target <= 1.1x,
issue #14). On a 2-core machine the upload thread, the S3 server and both ranks share the cores: an upper bound of
what a GPU node with spare cores sees.
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
    args = p.parse_args()

    import boto3
    from moto.server import ThreadedMotoServer

    work = Path(tempfile.mkdtemp(prefix="bench_upload_"))
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
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
    for name, out in (("posix", str(work / "posix")), ("s3", f"s3://{BUCKET}/out")):
        cmd = [deepspeed, "--num_gpus", str(args.ranks), "--master_addr", "127.0.0.1", "--master_port",
               str(_free_port()), "launch/train.py", *common, f"run.output_root={out}", "run.name=bench",
               f"run.staging_dir={work / 'staging'}"]
        wall = _run(cmd, env, work / f"train_{name}.log")
        run_dir = (work / "posix" if name == "posix" else work / "staging") / "runs" / "bench"
        tags = sorted((run_dir / "checkpoints").glob("step_*"))
        size = sum(f.stat().st_size for f in tags[-1].rglob("*") if f.is_file()) if tags else 0
        results[name] = (_step_times(run_dir / "tb"), wall, size)
    server.stop()

    saves = range(args.every, args.steps, args.every)  # the last save ends the run: nothing trains after it
    after = {s + k for s in saves for k in range(1, args.window + 1)}

    def means(times: dict[int, float]) -> tuple[float, float]:
        steady = [t for s, t in times.items() if s > 3]
        during = [t for s, t in times.items() if s in after]
        return statistics.mean(steady), statistics.mean(during) if during else float("nan")

    print(f"\nunet3d features [{args.features}], {args.ranks} ranks, fp32, ZeRO 2, {args.steps} steps, checkpoint "
          f"every {args.every}; checkpoint size {results['posix'][2] / 2**20:.0f} MiB")
    print(f"{'output':8} {'step s (all)':>13} {'step s (after save)':>20} {'wall s':>8}")
    rows = {}
    for name, (times, wall, _) in results.items():
        rows[name] = means(times)
        print(f"{name:8} {rows[name][0]:13.3f} {rows[name][1]:20.3f} {wall:8.1f}")
    print(f"ratio s3/posix: all steps {rows['s3'][0] / rows['posix'][0]:.2f}x, the {args.window} steps after each "
          f"save {rows['s3'][1] / rows['posix'][1]:.2f}x (target <= 1.1x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
