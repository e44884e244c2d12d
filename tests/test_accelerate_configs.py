"""The shipped Accelerate launcher configs: valid for this Accelerate, documented, and the CPU one
drives the launcher as its header says; sharding launchers are refused before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from multissl.errors import ConfigError
from multissl.training.trainer import refuse_sharded_training
from tests.conftest import ROOT

CONFIGS = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))


def test_the_configs_are_shipped() -> None:
    assert {p.name for p in CONFIGS} == {"ddp_multi_gpu.yaml", "multi_node.yaml"}


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


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED", "MEGATRON_LM", "DistributedType.FSDP"])
def test_sharding_launchers_are_refused_with_the_way_out(kind: str) -> None:
    with pytest.raises(ConfigError, match=r"does not support yet.*ddp_multi_gpu\.yaml"):
        refuse_sharded_training(kind)


@pytest.mark.parametrize("kind", ["NO", "MULTI_CPU", "MULTI_GPU", "DistributedType.MULTI_GPU"])
def test_data_parallel_launchers_pass(kind: str) -> None:
    refuse_sharded_training(kind)


@pytest.mark.parametrize("name, machines, processes", [("ddp_multi_gpu.yaml", 1, 8), ("multi_node.yaml", 2, 16)])
def test_accelerate_launch_reads_the_config_as_documented(name: str, machines: int, processes: int) -> None:
    """``accelerate launch --config_file`` turns the file into a multi-GPU (DDP) launch of that many
    processes with bf16: the launcher's own argument validation, short of starting processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", f"recipes/accelerate/{name}", "recipes/mlm.py"])
    args = _validate_launch_command(args)[0]
    assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed
    assert (args.num_machines, args.num_processes, args.mixed_precision) == (machines, processes, "bf16")
