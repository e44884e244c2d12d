"""Sharded training (FSDP2 through Accelerate): on 2 CPU processes it trains as DDP does, step for
step; checkpoints are sharded and resume exactly; the export is the whole model; what cannot be
sharded is refused before any work, naming why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from multissl.errors import ConfigError
from multissl.training import sharding
from tests.conftest import BIN, FREE_PORT, run
from tests.test_accelerate_configs import launcher_env

BERT_LAYERS = launcher_env("fsdp2_full_shard.yaml")
"""What ``accelerate launch --config_file recipes/accelerate/fsdp2_full_shard.yaml`` gives each
process (its FSDP part; BertLayer units), handed to torchrun here, so that a test can change one
setting (the layer to wrap, the shard size) without a config file of its own."""
FSDP_ENV = {**BERT_LAYERS, "FSDP_AUTO_WRAP_POLICY": "NO_WRAP"}
"""The same for a model without BertLayers (a ResNet): one FSDP unit, the whole model."""
MLM = ["recipes/mlm.py", "trainer.max_steps=6", "trainer.log_every=1", "trainer.save_every=3",
       "trainer.progress_bar=false", "trainer.trackers=[]", "data.vocab_size=500", "model.hidden_size=32",
       "trainer.batch_size=4", "trainer.grad_accum_steps=2",
       # one eval batch in all: process 1 has none and must still join every all-gather of the forward
       "trainer.eval_batch_size=100000", "trainer.eval_every=3"]


def _torchrun(args: list[str], out: Path, processes: int = 2, **env: str):  # noqa: ANN202 - a CompletedProcess
    return run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(processes), *args,
                f"trainer.output_dir={out}"], timeout=600, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", **env)


def _train_records(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r]


def same_steps(want: Path, got: Path, steps: int, loss_rel: float = 1e-6, norm_rel: float = 1e-5,
               what: str = "") -> None:
    """The run in ``got`` logged steps 1..``steps`` with ``want``'s training loss and gradient norm."""
    reference, records = _train_records(want), _train_records(got)
    assert [r["step"] for r in records] == list(range(1, steps + 1)), what
    for a, b in zip(reference, records, strict=True):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=loss_rel), (what, b["step"])
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=norm_rel), (what, b["step"])


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "model" / "model.safetensors")


def test_compiled_mlm_on_two_processes_trains_as_ddp_does(ddp_mlm: Path, tmp_path: Path) -> None:
    """``trainer.compile=true`` under DDP, with an evaluation (and its export) every 3 steps: the same
    loss and gradient norm at every step as uncompiled DDP. (Accelerate 1.16's ``unwrap_model`` used
    to point the compiled wrapper at the bare model in place: the run hung at its next checkpoint.)"""
    out = tmp_path / "compiled"
    proc = _torchrun([*MLM, "trainer.compile=true"], out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    same_steps(ddp_mlm, out, 6)
    for name, tensor in _weights(ddp_mlm).items():
        torch.testing.assert_close(_weights(out)[name], tensor, rtol=1e-5, atol=1e-6, msg=name)



def test_a_resume_on_fewer_processes_goes_on_and_says_what_it_changes(ddp_mlm: Path, tmp_path: Path) -> None:
    """The 2-process run's step-3 checkpoint resumed by one process: it trains to the end and exports,
    and says before the first step that the run is no longer the interrupted one (batch per process,
    data positions), naming both process counts."""
    out = tmp_path / "run"
    shutil.copytree(ddp_mlm, out)
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    shutil.rmtree(out / "model")
    proc = run([str(BIN / "python"), *MLM, f"trainer.output_dir={out}"], timeout=600, OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stdout and "step 3/6" in proc.stdout
    assert "was saved by 2 processes and this run has 1" in proc.stdout and "resume on 2 processes" in proc.stdout
    assert (out / "model" / "model.safetensors").is_file()

def _mlm_sharded_matches_ddp(tmp_path: Path, env: dict[str, str], processes: int = 2) -> tuple[Path, Path, str]:
    """MLM under DDP and sharded (``env``) on ``processes``: sharded checkpoints, DDP's loss and
    gradient norm at each of 6 steps, and DDP's export to float rounding. Returns the two output
    folders and the sharded run's stdout."""
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    for out, run_env in ((ddp, {}), (fsdp, env)):
        proc = _torchrun(MLM, out, processes, **run_env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert (fsdp / "checkpoints" / "step_00000003" / "pytorch_model_fsdp_0").is_dir(), "sharded, not replicated"
    same_steps(ddp, fsdp, 6)
    exported = _weights(fsdp)
    for name, tensor in _weights(ddp).items():
        torch.testing.assert_close(exported[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    return ddp, fsdp, proc.stdout


def _mlm_resumes_from_the_step_3_shards(fsdp: Path, env: dict[str, str], processes: int = 2) -> None:
    """Killed after step 3's checkpoint: the rerun resumes from the shards and ends on the weights
    the straight run exported."""
    exported = _weights(fsdp)
    shutil.rmtree(fsdp / "checkpoints" / "step_00000006")
    shutil.rmtree(fsdp / "model")
    again = _torchrun(MLM, fsdp, processes, **env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout and "step 3/6" in again.stdout
    for name, tensor in exported.items():
        assert torch.equal(_weights(fsdp)[name], tensor), name


def test_mlm_under_fsdp_trains_as_ddp_does_and_resumes_exactly(tmp_path: Path) -> None:
    _, fsdp, _ = _mlm_sharded_matches_ddp(tmp_path, BERT_LAYERS)
    ckpt = fsdp / "checkpoints" / "step_00000003"
    assert (ckpt / "optimizer_0").is_dir() and not (ckpt / "model.safetensors").exists(), "sharded checkpoints"
    evals = [r for r in map(json.loads, (fsdp / "metrics.jsonl").read_text().splitlines()) if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    from transformers import AutoModelForMaskedLM  # the export is the whole model: transformers loads it

    assert AutoModelForMaskedLM.from_pretrained(fsdp / "model") is not None
    _mlm_resumes_from_the_step_3_shards(fsdp, BERT_LAYERS)
    # on one process: torch's distributed checkpoint re-shards the two processes' shards on load
    shutil.rmtree(fsdp / "checkpoints" / "step_00000006")
    shutil.rmtree(fsdp / "model")
    alone = _torchrun(MLM, fsdp, 1, **BERT_LAYERS)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert "step 3/6" in alone.stdout and "was saved by 2 processes and this run has 1" in alone.stdout
    assert AutoModelForMaskedLM.from_pretrained(fsdp / "model") is not None


def test_accelerate_launch_with_the_fsdp2_config_shards_on_cpu_processes(tmp_path: Path) -> None:
    """``accelerate launch --config_file fsdp2_full_shard.yaml`` as a user types it, on a machine
    without a GPU: the processes find each other (gloo) and shard, as under torchrun with
    ``ACCELERATE_USE_CPU``, instead of each training alone in a world of one."""
    out = tmp_path / "run"
    proc = run([str(BIN / "accelerate"), "launch", "--config_file", "recipes/accelerate/fsdp2_full_shard.yaml",
                *FREE_PORT, "--num_processes", "2", "--mixed_precision", "no", "recipes/mlm.py",
                "trainer.max_steps=2", "trainer.save_every=2", "trainer.eval_every=0", "trainer.progress_bar=false", "trainer.trackers=[]",
                "data.vocab_size=500", "model.hidden_size=32", "trainer.batch_size=4", f"trainer.output_dir={out}"],
               timeout=600, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU=None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FSDP2: each weight sharded over 2 processes" in proc.stdout
    assert (out / "checkpoints" / "step_00000002" / "pytorch_model_fsdp_0").is_dir()


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate launch"])
def test_two_cpu_processes_meet_without_accelerate_use_cpu(launcher: str, tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2`` and ``accelerate launch`` with the DDP config, on a machine
    without a GPU and nothing setting ``ACCELERATE_USE_CPU``: one run of 2 processes (each process's
    data position and RNG state in the checkpoint, 2 x 4 samples a step), not two runs of one that
    trip over each other's lock on the output folder."""
    out = tmp_path / "run"
    start = ([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"] if launcher == "torchrun" else
             [str(BIN / "accelerate"), "launch", "--config_file", "recipes/accelerate/ddp_multi_gpu.yaml",
              *FREE_PORT, "--num_processes", "2", "--mixed_precision", "no"])
    proc = run([*start, "recipes/mlm.py", "trainer.max_steps=2", "trainer.save_every=2", "trainer.eval_every=0",
                "trainer.progress_bar=false", "trainer.trackers=[]", "data.vocab_size=500", "model.hidden_size=32",
                "trainer.batch_size=4", f"trainer.output_dir={out}"], timeout=600, OMP_NUM_THREADS="1",
               ACCELERATE_USE_CPU=None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = out / "checkpoints" / "step_00000002"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["seen"]["samples"] == 16 and len(state["rank_positions"]) == 2
    assert (ckpt / "random_states_1.pkl").is_file()


def test_hybrid_sharding_trains_as_ddp_does_and_resumes_exactly(tmp_path: Path) -> None:
    """recipes/accelerate/fsdp2_hybrid_shard.yaml's environment with its sizes cut to 4 processes:
    2 replicas of 2-process shard groups (HSDP), against DDP on the same 4 processes."""
    hybrid = launcher_env("fsdp2_hybrid_shard.yaml", PARALLELISM_CONFIG_DP_SHARD_SIZE="2")
    assert hybrid["PARALLELISM_CONFIG_DP_REPLICATE_SIZE"] == "2"
    _, hsdp, stdout = _mlm_sharded_matches_ddp(tmp_path, hybrid, processes=4)
    assert "FSDP2 hybrid sharding: each weight sharded over 2 processes, replicated 2x" in stdout
    _mlm_resumes_from_the_step_3_shards(hsdp, hybrid, processes=4)


def test_parallelism_sizes_that_do_not_match_the_processes_are_one_error(tmp_path: Path) -> None:
    hybrid = launcher_env("fsdp2_hybrid_shard.yaml")  # 2 x 8 = 16 processes asked, 2 started
    proc = _torchrun([*MLM, "trainer.max_steps=1"], tmp_path / "bad", **hybrid)
    assert proc.returncode != 0
    assert "parallelism sizes multiply to 16 processes" in proc.stderr and "but 2 were started" in proc.stderr


@pytest.mark.parametrize("kind", ["MEGATRON_LM", "DistributedType.MEGATRON_LM"])
def test_megatron_is_refused_with_the_ways_out(kind: str) -> None:
    with pytest.raises(ConfigError, match=r"does not support yet.*fsdp2_full_shard\.yaml.*deepspeed_zero2\.yaml.*"
                                          r"ddp_multi_gpu\.yaml"):
        sharding.refuse_unsupported(kind)


def test_fsdp1_is_refused_and_fsdp2_passes() -> None:
    with pytest.raises(ConfigError, match="set fsdp_version: 2"):
        sharding.refuse_unsupported("DistributedType.FSDP", 1)
    sharding.refuse_unsupported("DistributedType.FSDP", 2)
    for kind in ("NO", "MULTI_CPU", "MULTI_GPU", "DistributedType.MULTI_GPU", "DistributedType.DEEPSPEED"):
        sharding.refuse_unsupported(kind)


def test_scalars_become_vectors_for_training_and_scalars_again_in_the_export() -> None:
    """``fully_shard`` splits along the first dimension, which CLIP's temperature lacks: it trains as
    a one-element vector, and the replica (taken before) rebuilds the model with its own shape."""
    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    net[0].logit_scale = torch.nn.Parameter(torch.tensor(2.0))
    net.frozen = torch.nn.Parameter(torch.tensor(-1.0), requires_grad=False)
    replica = sharding.FullReplica(net)
    assert sorted(sharding.scalars_as_vectors(net)) == ["0.logit_scale", "frozen"]
    assert net[0].logit_scale.shape == (1,) and float(net[0].logit_scale.detach()) == 2.0 and not net.frozen.requires_grad
    assert {n for n, p in net.named_parameters() if p.ndim == 0} == set()
    whole = replica.materialise({k: v.clone() for k, v in net.state_dict().items()})
    assert whole[0].logit_scale.shape == () and float(whole[0].logit_scale) == 2.0 and float(whole.frozen) == -1.0
    torch.testing.assert_close(whole[0].weight, net[0].weight)
    with pytest.raises(RuntimeError, match="size mismatch"):  # only a reshape of the same size is undone
        replica.materialise({**net.state_dict(), "0.weight": torch.zeros(3, 2)})


@pytest.mark.parametrize("fused", [False, True])
def test_an_untouched_adamw_state_steps_as_no_state_does(fused: bool) -> None:
    """The state given to parameters no step has touched yet (so a sharded checkpoint holds them all)
    changes nothing: the next steps are those of an optimizer that never saw them."""
    def make() -> tuple[torch.nn.Linear, torch.optim.AdamW]:
        torch.manual_seed(0)
        net = torch.nn.Linear(3, 2)
        return net, torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=0.1, fused=fused)

    (plain, plain_opt), (filled, filled_opt) = make(), make()
    sharding.every_parameter_has_a_state(filled_opt)
    assert all(filled_opt.state[p]["step"] == 0 and not filled_opt.state[p]["exp_avg"].any() for p in filled.parameters())
    for step in range(3):
        for net, opt in ((plain, plain_opt), (filled, filled_opt)):
            opt.zero_grad()
            net(torch.full((4, 3), float(step + 1))).square().sum().backward()
            net.bias.grad = None if step == 0 else net.bias.grad  # the bias untouched by the first step
            opt.step()
        for a, b in zip(plain.parameters(), filled.parameters()):
            assert torch.equal(a, b)
    sgd = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    sharding.every_parameter_has_a_state(sgd)
    assert not sgd.state  # other optimizers are left as they are


def test_what_cannot_be_sharded_is_named() -> None:
    with pytest.raises(ConfigError, match="newmethod cannot train under FSDP: its loss reads whole weights"):
        sharding.refuse_unshardable("newmethod", "its loss reads whole weights")
    sharding.refuse_unshardable("mlm")


def test_a_full_replica_is_weightless_until_filled_and_keeps_ties_and_buffers() -> None:
    """The copy the export is rebuilt into: parameters on the meta device (no memory) until
    ``materialise``; then the same function as the model, tied weights still one tensor, and
    non-persistent buffers (not in any state dict) kept."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, max_position_embeddings=32)).eval()
    replica = sharding.FullReplica(model)
    assert all(p.is_meta for p in replica.skeleton.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # trained after the replica was taken
    whole = replica.materialise(model.state_dict()).eval()
    assert whole.cls.predictions.decoder.weight is whole.bert.embeddings.word_embeddings.weight
    assert not any(p.is_meta for p in whole.parameters())
    torch.testing.assert_close(whole.bert.embeddings.position_ids, model.bert.embeddings.position_ids)
    ids = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(whole(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


class _TwoProcesses:
    """Enough of an Accelerator for `lockstep` as process 0, pretending a process 1 holds ``other``
    batches (it reports, before each forward, whether it has a batch and whether it ever had one)."""

    device = torch.device("cpu")
    process_index = 0

    def __init__(self, other: int) -> None:
        self.other, self.calls = other, 0

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        theirs = torch.tensor([[self.calls < self.other, self.other > 0]])
        self.calls += 1
        return torch.cat([t.long(), theirs.long()])


@pytest.mark.parametrize("own, other, limit, want", [
    (3, 1, 0, [(0, True), (1, True), (2, True)]),
    (1, 3, 0, [(0, True), (0, False), (0, False)]),
    (5, 2, 2, [(0, True), (1, True)]),  # (each process stops at the limit: the other reports 2 of its 5)
    (2, 3, 3, [(0, True), (1, True), (0, False)]),
])
def test_lockstep_forwards_stand_ins_until_every_process_is_done(own: int, other: int, limit: int,
                                                               want: list[tuple[int, bool]]) -> None:
    got = list(sharding.lockstep(list(range(own)), limit, _TwoProcesses(other)))
    assert got == want


def test_a_process_without_eval_batches_forwards_one_of_anothers(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[int] = []
    monkeypatch.setattr(sharding, "broadcast_from", lambda obj, src: sent.append(src) or "theirs")
    got = list(sharding.lockstep([], 0, _TwoProcesses(2)))
    assert got == [("theirs", False), ("theirs", False)] and sent == [1], "asked once, from the process that had one"


def test_lockstep_takes_a_stream_of_unknown_length() -> None:
    """Streamed eval data: a DataLoader over an IterableDataset has no len(); nothing is read past the limit."""
    read: list[int] = []

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):  # noqa: ANN204 - an iterator
            for i in range(10):
                read.append(i)
                yield torch.tensor([i])

    loader = torch.utils.data.DataLoader(Stream(), batch_size=2)
    with pytest.raises(TypeError):
        len(loader)
    got = list(sharding.lockstep(loader, 3, _TwoProcesses(1)))
    assert [b.tolist() for b, _ in got] == [[[0], [1]], [[2], [3]], [[4], [5]]] and all(real for _, real in got)
    assert max(read) <= 7, "read as needed, not all at once"


def test_fsdp_asked_for_on_cpu_gets_a_plugin_from_the_launchers_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert sharding.cpu_fsdp_plugin(cpu=True) is None
    for key, value in BERT_LAYERS.items():
        monkeypatch.setenv(key, value)
    plugin = sharding.cpu_fsdp_plugin(cpu=True)
    assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap == ["BertLayer"]
