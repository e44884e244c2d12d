"""DeepSpeed ZeRO through Accelerate: what the trainer needs beyond DDP.

Under DeepSpeed the engine owns the optimizer step: ``accelerator.backward`` on the last micro-batch
of a step also clips, steps (or skips a step whose gradients are not finite) and zeroes the
gradients, from fp32 master weights that live partitioned inside its optimizer. So:

* the trainer's batch, accumulation and clipping settings are written into the DeepSpeed config
  where it says ``auto`` (`fill_config`), and a config that says otherwise is one error: the run
  trains as its recipe's settings say, or not at all;
* the trainer's non-finite guard reads the engine's verdict (``was_step_applied``) instead of
  skipping the step itself; under bf16 the engine is asked to check for overflow as it does for
  fp32, so a non-finite step is skipped there too;
* an objective that edits gradients before the step or weights after it (the image family's
  dropped steps and EMA teachers, DINO's frozen last layer, CLIP's temperature clamp) is refused:
  the gradients are not in ``.grad`` by then, and the engine's master copy would undo a weight edit
  (`refuse_step_edits`);
* the export, online probes and model card read the fp32 master weights, gathered from every
  process (`full_state_dict`) into a `FullReplica`, under ZeRO-2 as under ZeRO-3;
* DeepSpeed 0.19's engine needs three things the trainer does for it: floating inputs cast to its
  half precision (`input_dtype`), its own ``training`` flag following ``eval()`` (`follow_train_mode`),
  and, under ZeRO-3 with ``zero3_init_flag: false``, models built whole (`honour_init_flag`);
* on CPU processes (gloo) Accelerate 1.16 leaves every DeepSpeed process alone in a world of one;
  `process_group` builds the Accelerator so that they see each other, which is also how the suite
  tests DeepSpeed without a GPU.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from multissl.errors import ConfigError
from multissl.training.distributed import launcher_flag, on_cpu_processes

_CPU_FLAG = "ACCELERATE_USE_CPU"


def deepspeed_requested() -> bool:
    """Whether the launcher's config (``accelerate launch``'s environment) asks for DeepSpeed."""
    return launcher_flag("ACCELERATE_USE_DEEPSPEED")


@contextlib.contextmanager
def process_group(cpu: bool) -> Iterator[dict[str, Any]]:
    """The Accelerator's extra arguments for a DeepSpeed run on CPU processes, with the launcher's
    CPU flag hidden while it is built (it would turn DeepSpeed off): processes that find each other
    over gloo. Empty when DeepSpeed is not asked for, or on GPUs (Accelerate sets those up itself)."""
    if deepspeed_requested() and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("the accelerate config asks for DeepSpeed, which is not installed: "
                          "pip install 'multissl[deepspeed]'")
    if not (deepspeed_requested() and on_cpu_processes(cpu)):
        yield {}
        return
    if torch.cuda.is_available():
        raise ConfigError("trainer.cpu=true with a DeepSpeed config on a machine with a GPU: DeepSpeed would "
                          "train on the GPU; drop trainer.cpu, or launch with a DDP config")
    from accelerate.utils import InitProcessGroupKwargs

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's own device detection, before it is imported
    flag = os.environ.pop(_CPU_FLAG, None)
    try:
        yield {"cpu": False, "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    finally:
        if flag is not None:
            os.environ[_CPU_FLAG] = flag


def is_deepspeed(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def honour_init_flag(accelerator: Any) -> None:
    """Under ZeRO-3 with ``zero3_init_flag: false``, let transformers build models whole, as the
    flag says: Accelerate 1.16 tells transformers that ZeRO-3 is on either way, and transformers
    then builds every model partitioned (``deepspeed.zero.Init``), initialised differently from
    the same seed under DDP or one process."""
    plugin = accelerator.state.deepspeed_plugin
    if zero_stage(accelerator) == 3 and not plugin.zero3_init_flag:
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()


def input_dtype(accelerator: Any) -> torch.dtype | None:
    """What floating inputs are cast to: DeepSpeed's bf16 and fp16 modes keep the working weights in
    that precision and run no autocast, so an fp32 input (audio, pixels) would meet a bf16 weight."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if str(config.get(key, {}).get("enabled", False)).lower() == "true":
            return dtype
    return None


def zero_stage(accelerator: Any) -> int:
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def fill_config(accelerator: Any, batch_size: int, grad_accum_steps: int, max_grad_norm: float,
                mixed_precision: str) -> None:
    """Write the trainer's settings into the DeepSpeed config where it says ``auto`` (or nothing);
    a value it sets that differs from the trainer's is a ConfigError naming both."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    ours = {"train_micro_batch_size_per_gpu": (batch_size, "trainer.batch_size"),
            "gradient_accumulation_steps": (grad_accum_steps, "trainer.grad_accum_steps"),
            "gradient_clipping": (max_grad_norm, "trainer.max_grad_norm")}
    for key, (value, name) in ours.items():
        theirs = config.get(key, "auto")
        if theirs == "auto":
            config[key] = value
        elif float(theirs) != float(value):
            raise ConfigError(f"the DeepSpeed config sets {key}: {theirs}, but {name}={value}; set it to \"auto\" "
                              f"(or leave it out) so that the trainer fills it, or set {name}={theirs}")
    config["train_batch_size"] = batch_size * grad_accum_steps * accelerator.num_processes
    if mixed_precision == "bf16":  # skip a step whose gradients are not finite, as under fp32
        config.setdefault("bf16", {}).setdefault("check_grad_overflow", True)


def refuse_step_edits(objective: Any) -> None:
    """Stop an objective that edits gradients before the optimizer step or weights after it: under
    DeepSpeed neither edit would reach the update (see the module docstring)."""
    from multissl.training.objective import Objective

    edits = [hook for hook in ("before_optimizer_step", "after_optimizer_step")
             if getattr(type(objective), hook) is not getattr(Objective, hook)]
    if edits:
        raise ConfigError(
            f"{objective.name} cannot train under DeepSpeed: it edits the step ({' and '.join(edits)}: the gradients "
            "or weights DeepSpeed's engine owns); train it with FSDP2 (recipes/accelerate/fsdp2_full_shard.yaml) or "
            "DDP (recipes/accelerate/ddp_multi_gpu.yaml)")


def full_state_dict(model: nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """The model's whole state dict with the fp32 master weights (not the engine's bf16 working
    copy), on CPU where ``keep`` (the main process), empty elsewhere. A collective: every process
    calls it, with its parameters in the same order."""
    from deepspeed.utils import safe_get_full_fp32_param

    full: dict[int, torch.Tensor] = {}
    for param in model.parameters():  # each once, tied ones too
        value = safe_get_full_fp32_param(param) if param.requires_grad else None
        if value is None:  # frozen: not in the optimizer; under ZeRO-3 gathered from its partitions
            value = _gathered(param)
        if keep:
            full[id(param)] = value.detach().float().cpu().clone()
    if not keep:
        return {}
    return {name: full[id(t)] if isinstance(t, nn.Parameter) else t.detach().cpu().clone()
            for name, t in model.state_dict(keep_vars=True).items()}


def _gathered(param: nn.Parameter) -> torch.Tensor:
    if not hasattr(param, "ds_id"):
        return param.data
    import deepspeed

    with deepspeed.zero.GatheredParameters([param]):
        return param.data.clone()


def follow_train_mode(engine: nn.Module) -> None:
    """Make ``engine.training`` say what ``engine.train()``/``engine.eval()`` set: DeepSpeed 0.19's
    engine passes the mode to the model it wraps but keeps its own flag at True, so an objective
    asking ``model.training`` would score every evaluation as training (no CER, no F1)."""
    wrapped = type(engine).train

    def train(mode: bool = True) -> nn.Module:
        wrapped(engine, mode)
        engine.training = mode
        return engine

    engine.train = train  # type: ignore[method-assign]
    engine.eval = lambda: train(False)  # type: ignore[method-assign]


def refuse_other_world_size(checkpoint: Path, saved: int, now: int) -> None:
    """DeepSpeed 0.19 cannot spread a ZeRO checkpoint's partitions over another number of processes;
    say so, and the ways on, before it fails deep inside ``load_checkpoint``."""
    if saved and saved != now:
        raise ConfigError(
            f"{checkpoint} holds DeepSpeed ZeRO partitions of {saved} processes, and this run has {now}; DeepSpeed "
            f"cannot spread them over another number: resume with --num_processes {saved} (its zero_to_fp32.py "
            "rebuilds the checkpoint's whole fp32 weights, for use outside a run)")


def layout(accelerator: Any) -> str:
    """The start-up line: which ZeRO stage, over how many processes."""
    stage = zero_stage(accelerator)
    what = {1: "optimizer states", 2: "optimizer states and gradients",
            3: "optimizer states, gradients and weights"}.get(stage, "nothing")
    n = accelerator.num_processes
    return f"DeepSpeed ZeRO-{stage}: {what} partitioned over {n} process{'es' if n != 1 else ''}"
