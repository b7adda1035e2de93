"""Distributed training through the launchers the field uses: torchrun (torch.distributed.run) or `accelerate
launch`, with DDP, FSDP or DeepSpeed ZeRO. ftx only builds the command lines and config files; the workers are
the ordinary training code (transformers' Trainer), which reads the launcher's environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR) and wraps the model itself.

A stage that trains writes a job spec (JSON: its config and paths), starts the launcher on this node with
`python -m <worker module> SPEC` (`launch`), and reads the result that rank 0 wrote. Other nodes run the same
command with their node rank (`commands`, `ftx train --print-launch`); the spec, the data and the base model must be
at the same paths on every node (shared storage). If a worker dies, torchrun stops the others, the launcher exits
non-zero and the stage fails; its checkpoints stay, and the next run resumes from the newest one.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .config import NOT_KEYED
from .errors import FtxError
from .k8s import DNS_LABEL

STRATEGIES = ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")


class TrainJobConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("ftx-train", pattern=DNS_LABEL, description="Job and headless Service name")
    namespace: str | None = Field(None, pattern=DNS_LABEL)
    image: str = Field("ftx-train:0.1.0", description="an image with ftx and its training stack (Dockerfile)")
    gpu_resource: str = "nvidia.com/gpu"
    cpu: str = "8"
    memory: str = "64Gi"
    shm: str = Field("16Gi", description="/dev/shm for the workers (NCCL, data loaders)")
    pvc: str = Field("ftx-runs", pattern=DNS_LABEL, description="PersistentVolumeClaim holding the run (ReadWriteMany)")
    mount_path: str = Field("/runs", description="where the volume is mounted in the pods")
    base_path: str = Field("base", description="the base model's directory inside the volume")
    port: int = Field(29500, ge=1, le=65535, description="rendezvous port on node 0")


class DistributedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    launcher: Literal["torchrun", "accelerate"] = Field("torchrun", description="torchrun or `accelerate launch`")
    nproc_per_node: int = Field(2, ge=1, description="worker processes per node (one per GPU; on CPU, processes)")
    nnodes: int = Field(1, ge=1, description="nodes; each runs the command `ftx train --print-launch` prints")
    rdzv_endpoint: str = Field(
        "127.0.0.1:29500",
        description="host:port of node 0, where the workers meet (rendezvous)",
        json_schema_extra=NOT_KEYED,
    )
    strategy: Literal[STRATEGIES] = Field(
        "ddp",
        description="ddp: every worker holds the model, gradients are averaged; fsdp: FSDP2 shards parameters, "
        "gradients and optimizer state; deepspeed_zero2/3: DeepSpeed ZeRO (2: optimizer state and gradients "
        "sharded, 3: parameters too)",
    )
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl on CUDA, gloo on CPU")
    kubernetes: TrainJobConfig = Field(
        default_factory=TrainJobConfig,
        description="`ftx train --k8s-job OUT.yaml`: an Indexed Job + headless Service running this on a cluster",
        json_schema_extra=NOT_KEYED,
    )

    @model_validator(mode="after")
    def _endpoint(self):
        host, sep, port = self.rdzv_endpoint.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"rdzv_endpoint {self.rdzv_endpoint!r}: expected host:port")
        return self

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


class Workers(NamedTuple):
    world: int  # processes training together (1: not launched)
    dist: DistributedConfig | None  # the config, when launched with several workers
    zero: bool  # rank 0: the one that writes
    per_device: int  # this worker's share of the global batch


def workers(dist: DistributedConfig | None, global_batch: int, field: str) -> Workers:
    """What a training stage's code needs to know about the launcher that started it (WORLD_SIZE, RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Workers(world, dist if world > 1 else None, rank() == 0, per_device_batch(global_batch, world, field))


def per_device_batch(global_batch: int, world_size: int, field: str = "train.batch_size") -> int:
    """The global batch (per optimizer step, before gradient accumulation) split over the workers: the same
    examples per step as one process, so the loss curve is the single-process one."""
    if global_batch % world_size:
        raise FtxError(
            f"{field}: {global_batch} does not split over {world_size} workers; use a multiple of {world_size}"
        )
    return global_batch // world_size


def check(dist: DistributedConfig, method: str, device: str, batch_size: int, field: str = "train.distributed") -> None:
    """Refuse what cannot work before anything starts (`batch_size`: train.batch_size, which must split)."""
    per_device_batch(batch_size, dist.world_size)
    if dist.strategy == "fsdp" and method == "qlora":
        raise FtxError(
            f"{field}.strategy: fsdp cannot shard QLoRA's 4-bit bitsandbytes weights (FSDP2's fully_shard needs "
            "ordinary tensors); use ddp (DDP over the LoRA parameters is the multi-GPU QLoRA path) or method lora"
        )
    if dist.strategy == "fsdp" and device != "cuda":
        raise FtxError(
            f"{field}.strategy: fsdp needs GPUs: accelerate (under transformers' Trainer) enables FSDP only on GPU "
            "devices and would silently run DDP on CPU; use ddp here"
        )
    if dist.strategy.startswith("deepspeed") and dist.launcher != "accelerate":
        raise FtxError(f"{field}.launcher: {dist.strategy} runs through `accelerate launch`; set launcher accelerate")
    if dist.strategy.startswith("deepspeed") and device != "cuda":
        raise FtxError(
            f"{field}.strategy: {dist.strategy} needs GPUs: accelerate turns DeepSpeed on only off the CPU and would "
            "silently run DDP here; use ddp"
        )
    if dist.backend == "nccl" and device != "cuda":
        raise FtxError(f"{field}.backend: nccl needs CUDA GPUs; use gloo (or auto) on CPU")


def ddp_backend(dist: DistributedConfig, device: str) -> str:
    return ("nccl" if device == "cuda" else "gloo") if dist.backend == "auto" else dist.backend


def accelerate_config(dist: DistributedConfig, device: str, node_rank: int = 0) -> dict:
    """An `accelerate launch --config_file` config (accelerate's ClusterConfig fields)."""
    host, _, port = dist.rdzv_endpoint.rpartition(":")
    cfg = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "MULTI_GPU" if device == "cuda" else "MULTI_CPU",
        "num_machines": dist.nnodes,
        "num_processes": dist.world_size,
        "machine_rank": node_rank,
        "main_process_ip": host,
        "main_process_port": int(port),
        "rdzv_backend": "c10d" if dist.nnodes > 1 else "static",
        "same_network": True,
        "use_cpu": device != "cuda",
        "mixed_precision": "bf16" if device == "cuda" else "no",
        "main_training_function": "main",
        "debug": False,
    }
    if dist.strategy == "fsdp":
        cfg["distributed_type"] = "FSDP"
        cfg["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_offload_params": False,
            "fsdp_reshard_after_forward": True,
            "fsdp_state_dict_type": "FULL_STATE_DICT",  # the adapter is small: saved whole, in peft's format
            "fsdp_activation_checkpointing": False,
        }
    elif dist.strategy.startswith("deepspeed"):
        cfg["distributed_type"] = "DEEPSPEED"
        cfg["deepspeed_config"] = {
            "deepspeed_config_file": "deepspeed.json",
            "zero3_init_flag": dist.strategy[-1] == "3",
        }
    return cfg


def deepspeed_config(dist: DistributedConfig) -> dict:
    """DeepSpeed's JSON for ZeRO-2/3; "auto" values are filled in by transformers' Trainer from its arguments."""
    stage = int(dist.strategy[-1])
    zero = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": "auto"}
    if stage == 3:
        zero |= {
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            "stage3_gather_16bit_weights_on_model_save": True,
        }
    return {
        "bf16": {"enabled": "auto"},
        "zero_optimization": zero,
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
    }


def commands(dist: DistributedConfig, module: str, spec: Path, device: str, config_dir: Path) -> list[list[str]]:
    """The launch command of every node (index = node rank). accelerate's config files are written to
    `config_dir` (one per node: they differ in machine_rank)."""
    out = []
    for node in range(dist.nnodes):
        if dist.launcher == "torchrun":
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={dist.nnodes}"]
            cmd += [f"--nproc-per-node={dist.nproc_per_node}", f"--node-rank={node}"]
            if dist.nnodes > 1:
                cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={dist.rdzv_endpoint}", "--rdzv-id=ftx"]
            else:
                host, _, port = dist.rdzv_endpoint.rpartition(":")
                cmd += [f"--master-addr={host}", f"--master-port={port}"]
            cmd += ["-m", module, str(spec)]
        else:
            config_dir.mkdir(parents=True, exist_ok=True)
            if dist.strategy.startswith("deepspeed"):
                (config_dir / "deepspeed.json").write_text(json.dumps(deepspeed_config(dist), indent=2))
            cfg = accelerate_config(dist, device, node)
            if "deepspeed_config" in cfg:
                cfg["deepspeed_config"]["deepspeed_config_file"] = str(config_dir / "deepspeed.json")
            path = config_dir / f"accelerate-node{node}.json"
            path.write_text(json.dumps(cfg, indent=2))
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path)]
            cmd += ["-m", module, str(spec)]
        out.append(cmd)
    return out


def render(cmd: list[str]) -> str:
    return shlex.join(cmd)


def launch(cmd: list[str], log: Path, env: dict | None = None) -> None:
    """Run this node's launcher to the end; its workers' output goes to the terminal and to `log`. A failure raises
    FtxError with the log's last lines. Ctrl-C or ftx's death stops the whole process group."""
    from .procs import die_with_parent, stop

    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            preexec_fn=die_with_parent,
            start_new_session=True,
            text=True,
        )
        try:
            for line in proc.stdout:
                f.write(line)
                f.flush()
                sys.stdout.write(line)
            rc = proc.wait()
        except BaseException:
            stop(proc)
            raise
    if rc != 0:
        last = log.read_text(errors="replace").strip().splitlines()[-12:]
        raise FtxError(f"distributed training failed (launcher exit {rc}); {log} ends with:\n" + "\n".join(last))


def plan(dist: DistributedConfig, module: str, job: dict, here: Path, device: str) -> list[list[str]]:
    """Write the job spec (`job`, whose "out" is here/result) into `here` and return every node's command. On one
    node a taken rendezvous port is replaced by a free one."""
    here.mkdir(parents=True, exist_ok=True)
    spec = here / "spec.json"
    spec.write_text(json.dumps(job, indent=2))
    host, _, port = dist.rdzv_endpoint.rpartition(":")
    if dist.nnodes == 1 and host in ("127.0.0.1", "localhost"):
        from .procs import free_port, port_in_use

        if port_in_use(host, int(port)):
            dist = dist.model_copy(update={"rdzv_endpoint": f"{host}:{free_port(host)}"})
    return commands(dist, module, spec, device, here)


def run_here(dist: DistributedConfig, cmds: list[list[str]], here: Path, out: Path, console=None) -> str:
    """Run node 0's launcher (unless a hand-launched run already finished: --print-launch), move rank 0's outputs
    into `out` and return its result JSON."""
    import shutil

    if dist.nnodes > 1 and console:
        console.print("run on the other nodes (same paths, shared storage):")
        for i, cmd in enumerate(cmds[1:], 1):
            console.print(f"  node {i}: {render(cmd)}", soft_wrap=True, highlight=False)
    result = here / "result"
    if (result / "result.json").exists():
        if console:
            console.print(f"taking the finished distributed run in {result}")
    else:
        shutil.rmtree(result, ignore_errors=True)
        launch(cmds[0], here / "workers.log")
    text = (result / "result.json").read_text()
    for f in result.iterdir():
        if f.name != "result.json":
            shutil.move(str(f), out / f.name)
    shutil.copy(here / "spec.json", out / "launch-spec.json")
    return text


def worker(work) -> None:
    """A worker's entry (`python -m ftx.stages.<stage> SPEC.json`): `work(job)` in every process; rank 0 writes
    its result (a pydantic model) as result.json beside its outputs."""
    job = json.loads(Path(sys.argv[1]).read_text())
    result = work(job)
    if result is not None and rank() == 0:
        Path(job["out"], "result.json").write_text(result.model_dump_json(indent=2))


def trainer_args(dist: DistributedConfig, device: str) -> dict:
    """TrainingArguments for a worker of a distributed run (the launcher set up the process group's env)."""
    args = {"ddp_backend": ddp_backend(dist, device), "ddp_find_unused_parameters": False}
    if dist.strategy == "fsdp" and dist.launcher == "torchrun":  # accelerate launch passes its config itself
        args["fsdp"] = "full_shard auto_wrap"
        args["fsdp_config"] = {"fsdp_version": 2, "reshard_after_forward": True, "state_dict_type": "FULL_STATE_DICT"}
    return args
