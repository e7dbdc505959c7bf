"""The Kubernetes recipe agrees with the code it runs (exit status, supervisor, grace period)."""

from __future__ import annotations

from pathlib import Path

import yaml

from distseg.train.preemption import EXIT_REQUEUE

REPO = Path(__file__).resolve().parents[2]


def test_k8s_job_requeues_on_the_stop_status_and_gives_the_save_a_grace_period():
    service, job = yaml.safe_load_all((REPO / "cluster" / "k8s_train.yaml").read_text())
    assert service["kind"] == "Service" and job["kind"] == "Job"
    spec = job["spec"]
    rule = spec["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "Ignore" and rule["onExitCodes"]["values"] == [EXIT_REQUEUE]
    pod = spec["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= 60
    script = pod["containers"][0]["args"][0]
    assert "exec python launch/supervise.py deepspeed" in script and "checkpoint.resume=auto" in script
    assert "--node_rank \"$JOB_COMPLETION_INDEX\"" in script
    assert spec["completions"] == spec["parallelism"]
