"""Kubernetes manifests for a multi-node training run: `ftx train RECIPE --k8s-job OUT.yaml`.

One Indexed Job (completions = parallelism = train.distributed.nnodes, one pod per node, `backoffLimit` 0: torchrun
stops every worker when one fails, and the next run resumes from the checkpoints on the volume) and one headless
Service: pod i answers at `<name>-i.<name>`, so node 0 is the rendezvous (`<name>-0.<name>:<port>`). Each pod runs
the same launcher command as `ftx train --print-launch`, with its node rank from the Job's completion index.

Everything the workers read and write is on one PersistentVolumeClaim mounted at `kubernetes.mount_path`: the
recipe's output_dir (data splits, the job spec, checkpoints, the result) is copied to the volume's root and the base
model to `kubernetes.base_path`; the spec written for the pods (spec-k8s.json) names those paths. The manifests are
validated strictly against the Kubernetes schemas (ftx.core.k8s.validate) before they are written.
"""

from __future__ import annotations

import json
from pathlib import Path

from .core.errors import FtxError
from .core.launch import DistributedConfig, TrainJobConfig, commands


def pod_spec(job: dict, output_dir: Path, k: TrainJobConfig) -> dict:
    """The job spec with its paths as the pods see them: output_dir -> mount_path, base model -> base_path."""
    root = output_dir.resolve()

    def to_pod(p: str) -> str:
        path = Path(p).resolve()
        if not path.is_relative_to(root):
            raise FtxError(f"{p} is outside the recipe's output_dir {root}: the pods cannot read it from the volume")
        return str(Path(k.mount_path) / path.relative_to(root))

    out = dict(job)
    for field in ("train_file", "val_file", "out", "checkpoint_dir", "log_root"):
        out[field] = to_pod(job[field])
    out["base_dir"] = str(Path(k.mount_path) / k.base_path)
    return out


def manifests(dist: DistributedConfig, launch_dir: Path, job: dict, output_dir: Path, k: TrainJobConfig) -> list[dict]:
    """Headless Service + Indexed Job; writes spec-k8s.json (and accelerate's per-node configs) into launch_dir."""
    pod_dir = Path(k.mount_path) / launch_dir.resolve().relative_to(output_dir.resolve())
    (launch_dir / "spec-k8s.json").write_text(json.dumps(pod_spec(job, output_dir, k), indent=2))
    here = dist.model_copy(update={"rdzv_endpoint": f"{k.name}-0.{k.name}:{k.port}"})
    k8s_dir = launch_dir / "k8s"
    cmd = commands(here, "ftx.stages.train", pod_dir / "spec-k8s.json", "cuda", k8s_dir)[0]
    cmd = ["python", *cmd[1:]]  # the image's python
    if here.launcher == "torchrun":
        cmd = [a if not a.startswith("--node-rank=") else "--node-rank=$(NODE_RANK)" for a in cmd]
    else:  # accelerate: the node's own config file, its paths as the pods see them
        for f in k8s_dir.glob("accelerate-node*.json"):
            cfg = json.loads(f.read_text())
            if "deepspeed_config" in cfg:
                cfg["deepspeed_config"]["deepspeed_config_file"] = str(pod_dir / "k8s" / "deepspeed.json")
            f.write_text(json.dumps(cfg, indent=2))
        i = cmd.index("--config_file") + 1
        cmd[i] = str(pod_dir / "k8s" / "accelerate-node$(NODE_RANK).json")
    labels = {
        "app.kubernetes.io/name": "ftx",
        "app.kubernetes.io/instance": k.name,
        "app.kubernetes.io/component": "train",
    }
    meta = {"name": k.name, "labels": labels, **({"namespace": k.namespace} if k.namespace else {})}
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "clusterIP": "None",  # headless: a DNS name per pod, for the rendezvous
            "selector": {"job-name": k.name},
            "publishNotReadyAddresses": True,  # the workers meet before any pod is ready
            "ports": [{"name": "rendezvous", "port": k.port, "targetPort": k.port, "protocol": "TCP"}],
        },
    }
    rank = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    container = {
        "name": "train",
        "image": k.image,
        "command": cmd[:1],
        "args": cmd[1:],
        "env": [
            {"name": "NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": rank}}},
            {"name": "HF_HUB_OFFLINE", "value": "1"},
        ],
        "ports": [{"name": "rendezvous", "containerPort": k.port, "protocol": "TCP"}],
        "resources": {
            "limits": {k.gpu_resource: str(dist.nproc_per_node), "memory": k.memory},
            "requests": {k.gpu_resource: str(dist.nproc_per_node), "cpu": k.cpu, "memory": k.memory},
        },
        "volumeMounts": [{"name": "runs", "mountPath": k.mount_path}, {"name": "shm", "mountPath": "/dev/shm"}],
    }
    job_manifest = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "completionMode": "Indexed",
            "completions": dist.nnodes,
            "parallelism": dist.nnodes,
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "subdomain": k.name,  # pod DNS: <name>-<index>.<name>
                    "restartPolicy": "Never",
                    "containers": [container],
                    "volumes": [
                        {"name": "runs", "persistentVolumeClaim": {"claimName": k.pvc}},
                        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": k.shm}},
                    ],
                },
            },
        },
    }
    return [service, job_manifest]


def instructions(out: Path, output_dir: Path, base_dir: Path, k: TrainJobConfig, nnodes: int) -> str:
    return (
        f"wrote {out}: Indexed Job `{k.name}` ({nnodes} pods) + headless Service, validated. Before `kubectl apply "
        f"-f {out}`: copy {output_dir} to the root of PVC `{k.pvc}` and {base_dir} to `{k.base_path}/` in it."
    )
