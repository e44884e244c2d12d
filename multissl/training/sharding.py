"""Sharded training (FSDP2 through Accelerate): what the trainer needs beyond DDP.

Under FSDP every process holds a shard of each weight, so three things the trainer does from whole
weights on the main process need help here:

* the export, online probes and model card read a `FullReplica`: a weightless copy of the model
  taken before sharding, filled on the main process from the full state dict that every process
  helps gather (``torch.distributed.checkpoint``'s ``get_model_state_dict``);
* evaluation forwards in lockstep (`lockstep`): an FSDP forward all-gathers each layer's weights,
  so a process that has run out of eval batches forwards a stand-in batch, scored as nothing,
  until the last process is done;
* EMA teachers (BYOL, MoCo, DINO) stay whole on every process, outside the sharded model: each
  step's update gathers the online weights one tensor at a time (`multissl.models.ema`), so the
  teacher is not sharded (the online weights, gradients and AdamW moments are). DeepSpeed,
  Megatron-LM and FSDP1 are refused (`refuse_unsupported`);
* ``fully_shard`` splits every parameter along its first dimension, which a scalar (CLIP's
  temperature and SigLIP's bias) does not have: `scalars_as_vectors` makes each a one-element
  vector for the run (broadcasting keeps the model's arithmetic), and the `FullReplica`, taken
  before, gives them back their own shape in the export.

Accelerate 1.16 turns FSDP on only for accelerator devices; on CPU processes (gloo) it would start
processes that train plain DDP while the config says FSDP. `fsdp_on_cpu` keeps the config's promise
there, which is also how the suite tests the sharded path without a GPU. A launcher config with a
``parallelism_config`` (hybrid sharding: replicas of sharded groups) is held back while the
`Accelerator` is built on CPU (Accelerate refuses a device mesh for CPU processes before it knows
they shard) and given to it, with its device mesh, once they do (`parallelism_held_back`).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from multissl.errors import ConfigError
from multissl.training.distributed import launcher_flag, on_cpu_processes

REFUSED = ("MEGATRON_LM",)


def fsdp_requested() -> bool:
    """Whether the launcher's config (``accelerate launch``'s environment) asks for FSDP."""
    return launcher_flag("ACCELERATE_USE_FSDP")


def cpu_fsdp_plugin(cpu: bool) -> Any:
    """The FSDP plugin to hand Accelerate when FSDP is asked for on CPU processes (``cpu``,
    ``ACCELERATE_USE_CPU`` or no GPU); None otherwise: on accelerator devices Accelerate reads the
    launcher's environment itself."""
    if not (fsdp_requested() and on_cpu_processes(cpu)):
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin()  # every field from the launcher's FSDP_* environment


USE_PARALLELISM_CONFIG = "ACCELERATE_USE_PARALLELISM_CONFIG"


@contextlib.contextmanager
def parallelism_held_back(plugin: Any) -> Iterator[bool]:
    """While the `Accelerator` is built for CPU FSDP (``plugin``), hide the launcher's request for a
    parallelism config (HSDP's device mesh) from it; yields whether there was one, for `fsdp_on_cpu`."""
    asked = os.environ.get(USE_PARALLELISM_CONFIG, "false").lower() == "true"
    if plugin is None or not asked:
        yield False
        return
    os.environ[USE_PARALLELISM_CONFIG] = "false"
    try:
        yield True
    finally:
        os.environ[USE_PARALLELISM_CONFIG] = "true"


def fsdp_on_cpu(accelerator: Any, plugin: Any, parallelism: bool = False) -> None:
    """Make a multi-process CPU run shard as its config asks (see the module docstring); with
    ``parallelism``, over the device mesh of the launcher's ``PARALLELISM_CONFIG_*`` sizes (HSDP:
    each weight sharded within a group of ``dp_shard_size`` processes, replicated across groups)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if plugin is None or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    if accelerator.mixed_precision != "no":  # as Accelerate does for its own FSDP devices
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as Accelerate keeps the two
    if parallelism:
        from accelerate.parallelism_config import ParallelismConfig

        config = ParallelismConfig()  # its sizes from the launcher's environment
        if config.total_size != accelerator.num_processes:
            raise ConfigError(f"the accelerate config's parallelism sizes multiply to {config.total_size} processes "
                              f"(dp_replicate x dp_shard x tp x cp), but {accelerator.num_processes} were started")
        accelerator.state.parallelism_config = config
        accelerator.state.device_mesh = config.get_device_mesh("cpu")
        config._validate_accelerator(accelerator)


def layout(model: nn.Module) -> str:
    """How the prepared model's weights are spread, read off its first parameter (a DTensor under
    FSDP2), for the run's start-up line: full sharding, or HSDP's replicas of sharded groups."""
    from torch.distributed.tensor import DTensor, Replicate

    param = next((p for p in model.parameters() if isinstance(p, DTensor)), None)
    if param is None:
        return "FSDP2: no sharded parameter"
    mesh, placements = param.device_mesh, param.placements
    replicas = 1
    shards = 1
    for size, placement in zip(mesh.shape, placements, strict=True):
        if isinstance(placement, Replicate):
            replicas *= size
        else:
            shards *= size
    if replicas > 1:
        return f"FSDP2 hybrid sharding: each weight sharded over {shards} processes, replicated {replicas}x"
    if shards == 1:
        return "FSDP2: one process, nothing to shard over (each weight whole)"
    return f"FSDP2: each weight sharded over {shards} processes"


def is_sharded(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def refuse_unsupported(distributed_type: str, fsdp_version: int | None = None) -> None:
    """Stop before any work under a launcher config the trainer cannot keep its promises under:
    Megatron-LM (not wired in) and FSDP1 (FSDP2 is what is supported and tested)."""
    kind = str(distributed_type).rsplit(".", 1)[-1]
    if kind in REFUSED:
        raise ConfigError(
            f"the accelerate config asks for {kind}, which multissl's trainer does not support yet; use FSDP2 "
            "(recipes/accelerate/fsdp2_full_shard.yaml), DeepSpeed (recipes/accelerate/deepspeed_zero2.yaml) or DDP "
            "(recipes/accelerate/ddp_multi_gpu.yaml)")
    if kind == "FSDP" and fsdp_version != 2:
        raise ConfigError(f"the accelerate config asks for FSDP version {fsdp_version}; multissl shards with "
                          "FSDP2: set fsdp_version: 2 (as recipes/accelerate/fsdp2_full_shard.yaml does)")


def refuse_unshardable(objective: str, reason: str = "") -> None:
    """Under FSDP, stop an objective that says why it cannot be sharded (``reason``)."""
    if reason:
        raise ConfigError(f"{objective} cannot train under FSDP: {reason}; train it with DDP "
                          "(recipes/accelerate/ddp_multi_gpu.yaml)")


def scalars_as_vectors(model: nn.Module) -> list[str]:
    """Replace each 0-dim parameter of ``model`` by a one-element vector with the same value (and
    ``requires_grad``), in place, so that ``fully_shard`` can split it; returns their names. Call it
    before the optimizer is built: the optimizer must hold the new parameters."""
    lifted = []
    for name, param in list(model.named_parameters()):
        if param.ndim == 0:
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            setattr(owner, attr, nn.Parameter(param.detach().reshape(1).clone(), requires_grad=param.requires_grad))
            lifted.append(name)
    return lifted


def without_input_embeddings_question(model: nn.Module) -> None:
    """Accelerate's FSDP2 preparation asks every model for its input embeddings (to shard them on
    their own); transformers' speech models answer with an error instead of None. They have none:
    let them say so, on this instance only."""
    ask = getattr(model, "get_input_embeddings", None)
    if ask is None:
        return
    try:
        ask()
    except NotImplementedError:
        model.get_input_embeddings = lambda: None  # type: ignore[method-assign]


def every_parameter_has_a_state(optimizer: torch.optim.Optimizer) -> None:
    """Give each parameter of an Adam or AdamW ``optimizer`` that has no state yet the state AdamW
    treats as untouched (step 0, zero moments: its next step is then exactly a first step).

    Resuming a sharded run, ``torch.distributed.checkpoint`` first gives every parameter a state (a
    step on zero gradients) and then asks the checkpoint for each one; a parameter that no step had
    touched when the checkpoint was written (DINO's last layer, frozen for its first epoch) has none
    there, and the resume fails. Started so under FSDP, every checkpoint holds them all. Other
    optimizers are left as they are."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds torch's
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return
    for group in optimizer.param_groups:
        on_device = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            state = optimizer.state[p]
            if state:
                continue
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


class FullReplica:
    """A weightless copy of a model, taken before it is sharded, that becomes a whole, plain model
    on demand: ``materialise(full_state_dict)``. Parameters live on the meta device until then (no
    memory, and none is copied to make it), buffers stay real (non-persistent ones, such as
    position ids, are not in a state dict), and tied parameters stay tied."""

    def __init__(self, model: nn.Module) -> None:
        self.skeleton = _copy_with_empty_parameters(model, "meta")

    def materialise(self, state_dict: dict[str, torch.Tensor]) -> nn.Module:
        """The whole model from ``state_dict``; a parameter trained in another shape of the same
        size (a scalar made a vector by `scalars_as_vectors`) gets the replica's own shape back."""
        model = _copy_with_empty_parameters(self.skeleton, "cpu")
        own = dict(model.named_parameters())
        state_dict = {k: (v.reshape(own[k].shape) if k in own and v.shape != own[k].shape
                          and v.numel() == own[k].numel() else v) for k, v in state_dict.items()}
        model.load_state_dict(state_dict, strict=True)
        return model


def _copy_with_empty_parameters(model: nn.Module, device: str) -> nn.Module:
    """A deep copy of ``model`` whose parameters are new, uninitialised ones on ``device``: the copy
    meets each parameter in its memo first, so no parameter data is copied, and a tied parameter
    (one object in two places) becomes one new parameter."""
    memo: dict[int, Any] = {id(p): nn.Parameter(torch.empty(_whole_shape(p), dtype=p.dtype, device=device),
                                                requires_grad=p.requires_grad)
                            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def _whole_shape(param: nn.Parameter) -> torch.Size:
    """The parameter's whole shape: DeepSpeed's ZeRO-3 leaves an empty tensor in a parameter built
    partitioned (transformers does under ZeRO-3) and keeps the shape in ``ds_shape``."""
    return getattr(param, "ds_shape", param.shape)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The sharded model's whole state dict on the main process (on CPU), empty elsewhere. A
    collective: every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def lockstep(batches: Iterable[Any], limit: int, accelerator: Any) -> Iterator[tuple[Any, bool]]:
    """``(batch, real)`` until no process has a batch left (at most ``limit`` each, 0 = no limit):
    a process that has run out gets ``real=False`` and its first batch again, or, if it had none, one
    of the first process that has a batch at that point; its outputs are to be thrown away. Every
    process makes the same number of forwards, which a sharded model's all-gathers need. Whether
    each process still has a batch is agreed on before each forward (one small gather), so eval
    data of unknown length (a stream) works too."""
    it = iter(batches)
    stand_in: Any = None
    taken = 0
    while True:
        batch = next(it, None) if not limit or taken < limit else None
        taken += batch is not None
        flags = accelerator.gather(torch.tensor([[batch is not None, stand_in is not None or batch is not None]],
                                                device=accelerator.device))
        has_batch, has_any = flags[:, 0].bool().tolist(), flags[:, 1].bool().tolist()
        if not any(has_batch):
            return
        if not all(has_any):  # someone has never had a batch: they get one from the first that has one now
            src = has_batch.index(True)
            shared = broadcast_from(batch if accelerator.process_index == src else None, src)
            stand_in = stand_in if stand_in is not None else shared
        if batch is not None:
            stand_in = stand_in if stand_in is not None else batch
            yield batch, True
        else:
            yield stand_in, False


def broadcast_from(obj: Any, src: int) -> Any:
    """Process ``src``'s ``obj`` on every process (pickled)."""
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj], from_process=src)[0]
