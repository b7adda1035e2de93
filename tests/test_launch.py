"""Distributed launch configs (ftx.core.launch), checked by the loaders of the tools that run them: torchrun's and
accelerate's argument parsers, accelerate's config loader and FSDP plugin, transformers' DeepSpeed integration and
DeepSpeed's own config class. What cannot work is refused before anything starts."""

import json
from pathlib import Path

import pytest

from ftx.core import launch
from ftx.core.errors import FtxError
from ftx.core.launch import DistributedConfig


def test_torchrun_commands_per_node_parse_with_torchrun_itself(tmp_path):
    from torch.distributed.run import get_args_parser

    dist = DistributedConfig(nnodes=3, nproc_per_node=4, rdzv_endpoint="10.0.0.1:29400")
    cmds = launch.commands(dist, "ftx.stages.train", tmp_path / "spec.json", "cuda", tmp_path)
    assert len(cmds) == 3
    for node, cmd in enumerate(cmds):
        assert cmd[1:3] == ["-m", "torch.distributed.run"]
        args = get_args_parser().parse_args(cmd[3:])
        assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("3", "4", node)
        assert (args.rdzv_backend, args.rdzv_endpoint) == ("c10d", "10.0.0.1:29400")
        assert args.module and args.training_script == "ftx.stages.train"
        assert args.training_script_args == [str(tmp_path / "spec.json")]
    one = launch.commands(DistributedConfig(), "m", tmp_path / "s.json", "cpu", tmp_path)
    args = get_args_parser().parse_args(one[0][3:])
    assert (args.master_addr, args.master_port, args.nproc_per_node) == ("127.0.0.1", 29500, "2")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_accelerate_configs_load_and_launch_as_accelerate_reads_them(strategy, tmp_path, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    dist = DistributedConfig(launcher="accelerate", strategy=strategy, nnodes=2, nproc_per_node=4)
    cmds = launch.commands(dist, "ftx.stages.train", tmp_path / "spec.json", "cuda", tmp_path)
    for node, cmd in enumerate(cmds):
        cfg_file = cmd[cmd.index("--config_file") + 1]
        cfg = load_config_from_file(cfg_file)  # accelerate's own loader: unknown keys raise
        assert (cfg.machine_rank, cfg.num_machines, cfg.num_processes) == (node, 2, 8)
        args, _, _ = _validate_launch_command(launch_command_parser().parse_args(cmd[3:]))
        env = prepare_multi_gpu_env(args)
        assert (args.num_processes, args.num_machines, args.machine_rank) == (8, 2, node)
        if strategy == "fsdp":
            assert args.use_fsdp and env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
            for k, v in env.items():
                monkeypatch.setenv(k, v)
            from accelerate.utils import FullyShardedDataParallelPlugin

            plugin = FullyShardedDataParallelPlugin()  # reads the env the launcher sets for the workers
            assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
            assert plugin.state_dict_type.name == "FULL_STATE_DICT"
        else:
            assert not args.use_fsdp and args.multi_gpu


@pytest.mark.parametrize("strategy,stage", [("deepspeed_zero2", 2), ("deepspeed_zero3", 3)])
def test_deepspeed_json_is_accepted_by_transformers_and_deepspeed(strategy, stage, tmp_path):
    import torch
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    dist = DistributedConfig(launcher="accelerate", strategy=strategy)
    cmds = launch.commands(dist, "ftx.stages.train", tmp_path / "spec.json", "cuda", tmp_path)
    accel = json.loads(Path(cmds[0][cmds[0].index("--config_file") + 1]).read_text())
    assert accel["distributed_type"] == "DEEPSPEED"
    ds_file = Path(accel["deepspeed_config"]["deepspeed_config_file"])
    hf = HfTrainerDeepSpeedConfig(json.loads(ds_file.read_text()))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2)
    hf.trainer_config_process(args)  # the "auto" values, as the Trainer fills them
    tiny = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, vocab_size=128)).to(torch.float32)  # fmt: skip
    hf.trainer_config_finalize(args, tiny, num_training_steps=10)
    assert "auto" not in json.dumps(hf.config), hf.config
    ds = DeepSpeedConfig(hf.config)  # DeepSpeed's own validation (pydantic models)
    assert ds.zero_optimization_stage == stage and ds.gradient_accumulation_steps == 2
    assert accel["deepspeed_config"]["zero3_init_flag"] is (stage == 3)


def test_what_cannot_work_is_refused_up_front(monkeypatch):
    def refused(dist, method="lora", device="cuda"):
        with pytest.raises(FtxError) as e:
            launch.check(dist, method, device, 8)
        return str(e.value)

    assert "QLoRA" in refused(DistributedConfig(strategy="fsdp"), method="qlora") and "use ddp" in refused(
        DistributedConfig(strategy="fsdp"), method="qlora"
    )
    assert "silently run DDP on CPU" in refused(DistributedConfig(strategy="fsdp"), device="cpu")
    assert "accelerate" in refused(DistributedConfig(strategy="deepspeed_zero3"))
    assert "needs GPUs" in refused(DistributedConfig(strategy="deepspeed_zero2", launcher="accelerate"), device="cpu")
    assert "nccl needs CUDA" in refused(DistributedConfig(backend="nccl"), device="cpu")
    launch.check(DistributedConfig(strategy="ddp"), "qlora", "cpu", 8)  # DDP over the LoRA parameters: fine
    launch.check(DistributedConfig(strategy="fsdp"), "lora", "cuda", 8)
    with pytest.raises(FtxError, match="train.batch_size: 6 does not split over 4 workers"):
        launch.per_device_batch(6, 4)
    assert launch.per_device_batch(8, 2) == 4
    with pytest.raises(ValueError, match="host:port"):
        DistributedConfig(rdzv_endpoint="10.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert launch.workers(DistributedConfig(), 8, "train.batch_size") == (1, None, True, 8)  # not launched
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "3")
    w = launch.workers(DistributedConfig(), 8, "train.batch_size")
    assert launch.rank() == 3 and (w.world, w.zero, w.per_device) == (2, False, 4) and w.dist is not None
