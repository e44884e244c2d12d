"""The shipped Accelerate launcher configs: valid for this Accelerate, documented, and each drives
the launcher as its header says (the FSDP2 ones are run on 2 CPU processes in test_sharding)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import FREE_PORT, ROOT

CONFIGS = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))


def test_the_configs_are_shipped() -> None:
    assert {p.name for p in CONFIGS} == {"ddp_multi_gpu.yaml", "multi_node.yaml", "fsdp2_full_shard.yaml",
                                         "fsdp2_hybrid_shard.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_in_accelerate_and_documents_itself(path: Path) -> None:
    """``ClusterConfig.from_yaml_file`` is what ``accelerate launch --config_file`` reads: it refuses
    unknown keys. The header says how to launch with this very file and what the effective batch is."""
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(path)
    assert config.num_processes >= 2 and config.num_machines >= 1
    header = path.read_text(encoding="utf-8")
    assert f"--config_file recipes/accelerate/{path.name}" in header
    assert "batch_size x trainer.grad_accum_steps x" in header or "batch_size x grad_accum_steps x" in header


@pytest.mark.parametrize("name, machines, processes", [("ddp_multi_gpu.yaml", 1, 8), ("multi_node.yaml", 2, 16)])
def test_accelerate_launch_reads_the_config_as_documented(name: str, machines: int, processes: int) -> None:
    """``accelerate launch --config_file`` turns the file into a multi-GPU (DDP) launch of that many
    processes with bf16: the launcher's own argument validation, short of starting processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", f"recipes/accelerate/{name}", "recipes/mlm.py"])
    args = _validate_launch_command(args)[0]
    assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed
    assert (args.num_machines, args.num_processes, args.mixed_precision) == (machines, processes, "bf16")


def launcher_env(name: str, **overrides: str) -> dict[str, str]:
    """The FSDP part of the environment ``accelerate launch --config_file recipes/accelerate/<name>``
    gives each process (the launcher's own code, short of starting them), with ``overrides``."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    # a free port, so the launcher's check of its default port cannot meet another test's run
    args = launch_command_parser().parse_args(["--config_file", str(ROOT / "recipes" / "accelerate" / name),
                                               *FREE_PORT, "x.py"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    fsdp = {k: v for k, v in env.items() if k.startswith(("FSDP_", "PARALLELISM_CONFIG_"))
            or k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_PARALLELISM_CONFIG")}
    return {**fsdp, **overrides}


@pytest.mark.parametrize("name, machines, processes, replicas", [("fsdp2_full_shard.yaml", 1, 8, 1),
                                                                 ("fsdp2_hybrid_shard.yaml", 2, 16, 2)])
def test_the_fsdp2_configs_launch_sharded_bf16_with_sharded_checkpoints(name: str, machines: int, processes: int,
                                                                        replicas: int) -> None:
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", f"recipes/accelerate/{name}", "recipes/mlm.py"])
    args = _validate_launch_command(args)[0]
    assert args.use_fsdp and not args.multi_gpu and not args.use_deepspeed
    assert (args.num_machines, args.num_processes, args.mixed_precision) == (machines, processes, "bf16")
    env = launcher_env(name)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT" and env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "BertLayer"
    if replicas > 1:  # hybrid: sharded within a machine, replicated across machines
        assert int(env["PARALLELISM_CONFIG_DP_REPLICATE_SIZE"]) * int(env["PARALLELISM_CONFIG_DP_SHARD_SIZE"]) == processes
        assert int(env["PARALLELISM_CONFIG_DP_REPLICATE_SIZE"]) == replicas
        assert env["ACCELERATE_USE_PARALLELISM_CONFIG"] == "true"
    else:
        assert "ACCELERATE_USE_PARALLELISM_CONFIG" not in env
