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
from multissl.metrics import read_jsonl
from multissl.training import sharding
from tests.conftest import BIN, run
from tests.test_accelerate_configs import launcher_env
from tests.test_mae import SMALL as MAE_TINY

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
IMAGE_SSL = ["trainer.max_steps=4", "trainer.batch_size=16", "trainer.log_every=1",
          "trainer.progress_bar=false", "trainer.trackers=[]", "trainer.eval_max_batches=2", "trainer.eval_batch_size=16",
          "trainer.eval_every=2", "augment.size=16", "model.backbone.kwargs={layers: [1, 1, 1, 1], channels: [8, 16, 16, 32]}"]


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


def test_accelerate_launch_with_the_fsdp2_config_shards_on_cpu_processes(tmp_path: Path) -> None:
    """``accelerate launch --config_file fsdp2_full_shard.yaml`` as a user types it, on a machine
    without a GPU: the processes find each other (gloo) and shard, as under torchrun with
    ``ACCELERATE_USE_CPU``, instead of each training alone in a world of one."""
    out = tmp_path / "run"
    proc = run([str(BIN / "accelerate"), "launch", "--config_file", "recipes/accelerate/fsdp2_full_shard.yaml",
                "--num_processes", "2", "--mixed_precision", "no", "recipes/mlm.py", "trainer.max_steps=2",
                "trainer.save_every=2", "trainer.eval_every=0", "trainer.progress_bar=false", "trainer.trackers=[]",
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
              "--num_processes", "2", "--mixed_precision", "no"])
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


@pytest.mark.parametrize("method", ["simclr", "barlow_twins", "vicreg"])
def test_losses_over_both_processes_batches_under_fsdp_are_ddps(method: str, tmp_path: Path) -> None:
    """NT-Xent's negatives, Barlow Twins' cross-correlation and VICReg's variance and covariance
    come from both processes' rows (gathers that carry gradients); the loss and gradient norm are
    DDP's at every step, and the online kNN probe runs on the whole model rebuilt from shards."""
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    args = [f"recipes/{method}.py", *IMAGE_SSL]
    for out, env in ((ddp, {}), (fsdp, FSDP_ENV)):
        proc = _torchrun(args, out, **env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    for a, b in zip(_train_records(ddp), _train_records(fsdp), strict=True):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5)
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-4)
    probes = [r for r in map(json.loads, (fsdp / "metrics.jsonl").read_text().splitlines()) if "probe/knn_acc" in r]
    assert [r["step"] for r in probes] == [0, 2, 4] and all(r["probe/knn_acc"] > 0.15 for r in probes)  # chance 0.1
    import timm

    timm.create_model(f"local-dir:{fsdp / 'model'}", pretrained=True)


def _teacher_state(out: Path, step: int) -> dict[str, torch.Tensor]:
    """The objective's checkpointed tensors (the EMA teacher, MoCo's queue, DINO's centre) at ``step``."""
    state = torch.load(out / "checkpoints" / f"step_{step:08d}" / "custom_checkpoint_0.pkl", weights_only=True)
    return {f"{module}.{k}": v for module, tensors in state["modules"].items() for k, v in tensors.items()}


@pytest.mark.parametrize("method", ["moco", "byol", "dino"])
def test_ema_teachers_under_fsdp_follow_ddps(method: str, tmp_path: Path) -> None:
    """The teacher stays whole on every process and follows the sharded online network (its update
    gathers the online weights): DDP's loss and gradient norm at every step, DDP's teacher, queue and
    centre in the checkpoint, DDP's export (DINO's is the teacher's backbone); DINO resumes from the
    sharded checkpoint to the same weights and teacher."""
    args = [f"recipes/{method}.py", *IMAGE_SSL, "trainer.save_every=2"]
    ddp, fsdp = _sharded_run_matches_ddp(args, FSDP_ENV, tmp_path, steps=4, checkpoint=2)
    want, got = _teacher_state(ddp, 4), _teacher_state(fsdp, 4)
    assert want and got.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    exported = _weights(fsdp)
    for name, tensor in _weights(ddp).items():
        torch.testing.assert_close(exported[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    if method == "dino":
        shutil.rmtree(fsdp / "checkpoints" / "step_00000004")
        shutil.rmtree(fsdp / "model")
        again = _torchrun(args, fsdp, **FSDP_ENV)
        assert again.returncode == 0 and "step 2/4" in again.stdout, again.stderr[-3000:]
        assert all(torch.equal(_weights(fsdp)[k], v) for k, v in exported.items())
        assert all(torch.equal(_teacher_state(fsdp, 4)[k], v) for k, v in got.items())


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


def _sharded_run_matches_ddp(args: list[str], fsdp_env: dict[str, str], tmp_path: Path, steps: int,
                             checkpoint: int) -> tuple[Path, Path]:
    """Run ``args`` under DDP and under FSDP on 2 processes; the FSDP run must have written a sharded
    checkpoint at step ``checkpoint`` (not fallen back to DDP) and logged DDP's loss and gradient norm
    at each of its ``steps``. Returns the two output folders."""
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    for out, env in ((ddp, {}), (fsdp, fsdp_env)):
        proc = _torchrun(args, out, **env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert (fsdp / "checkpoints" / f"step_{checkpoint:08d}" / "pytorch_model_fsdp_0").is_dir(), "sharded, not replicated"
    same_steps(ddp, fsdp, steps, loss_rel=1e-5, norm_rel=1e-4)
    return ddp, fsdp


FINETUNE_TEXT = ["recipes/finetune_text_classification.py", "trainer.max_steps=4", "trainer.log_every=1",
                 "trainer.batch_size=8", "trainer.progress_bar=false", "trainer.trackers=[]", "trainer.eval_every=2",
                 "trainer.save_every=2", "data.max_seq_len=32", "data.vocab_size=500", "model.hidden_size=32",
                 "model.num_layers=2", "data.label_fraction=0.1"]


def test_text_fine_tuning_under_fsdp_trains_as_ddp_does_and_exports_a_pipeline_model(tmp_path: Path) -> None:
    """Fine-tuning shards as pretraining does: the classifier's loss and gradient norm are DDP's at
    every step, evaluation runs on both processes' shards, and the export is one whole model that
    `pipeline("text-classification")` runs with DDP's predictions."""
    ddp, fsdp = _sharded_run_matches_ddp(FINETUNE_TEXT, BERT_LAYERS, tmp_path, steps=4, checkpoint=2)
    evals = {out: [r for r in read_jsonl(out / "metrics.jsonl") if "eval/accuracy" in r] for out in (ddp, fsdp)}
    assert [r["step"] for r in evals[fsdp]] == [0, 2, 4]
    for a, b in zip(evals[ddp], evals[fsdp], strict=True):
        assert b["eval/loss"] == pytest.approx(a["eval/loss"], rel=1e-5) and b["eval/accuracy"] == a["eval/accuracy"]
    exported = _weights(fsdp)
    for name, tensor in _weights(ddp).items():
        torch.testing.assert_close(exported[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(fsdp / "model"), device="cpu")
    for row in read_jsonl(ddp / "predictions.jsonl")[:4]:
        out = classify(row["text"], truncation=True, max_length=32)[0]
        assert out["label"] == row["prediction"] and out["score"] == pytest.approx(row["score"], abs=1e-4)


SHORT = ["trainer.max_steps=3", "trainer.log_every=1", "trainer.progress_bar=false", "trainer.trackers=[]",
         "trainer.eval_every=0", "trainer.save_every=3"]


@pytest.mark.parametrize("recipe, layer, extra", [
    ("clm", "GPT2Block", ["trainer.batch_size=4", "data.vocab_size=500", "data.max_seq_len=32", "model.hidden_size=32",
                          "model.intermediate_size=64"]),
    ("mae", "ViTMAELayer", ["trainer.batch_size=8", "probe.task=\"\"", *(f"{k}={v}" for k, v in MAE_TINY.items())]),
])
def test_clm_and_mae_under_fsdp_train_as_ddp_does(recipe: str, layer: str, extra: list[str], tmp_path: Path) -> None:
    """Each wrapped in its own transformer layer (`--fsdp_transformer_layer_cls_to_wrap`, as the
    README says per recipe): DDP's loss and gradient norm at every step, sharded checkpoints, DDP's export."""
    ddp, fsdp = _sharded_run_matches_ddp([f"recipes/{recipe}.py", *SHORT, *extra],
                                         {**BERT_LAYERS, "FSDP_TRANSFORMER_CLS_TO_WRAP": layer}, tmp_path,
                                         steps=3, checkpoint=3)
    exported = _weights(fsdp)
    for name, tensor in _weights(ddp).items():
        torch.testing.assert_close(exported[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


CLIP = ["recipes/clip.py", "trainer.max_steps=4", "trainer.log_every=1", "trainer.progress_bar=false",
        "trainer.trackers=[]", "trainer.eval_every=2", "trainer.save_every=2", "trainer.batch_size=8",
        "trainer.eval_max_batches=2", "eval.max_images=32"]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_clip_under_fsdp_trains_as_ddp_does_and_exports_open_clips_model(kind: str, tmp_path: Path) -> None:
    """The contrastive losses' gathers carry gradients through the sharded towers (one FSDP unit per
    ``ResidualAttentionBlock``): DDP's loss and gradient norm at every step; the temperature (and
    SigLIP's bias), scalars that train as one-element vectors, come back as scalars in an export
    open_clip loads, equal to DDP's; SigLIP resumes from the sharded checkpoint to the same weights."""
    args = [*CLIP, f"loss.kind={kind}"]
    env = {**BERT_LAYERS, "FSDP_TRANSFORMER_CLS_TO_WRAP": "ResidualAttentionBlock"}
    ddp, fsdp = _sharded_run_matches_ddp(args, env, tmp_path, steps=4, checkpoint=2)
    from safetensors.torch import load_file

    def weights(out: Path) -> dict[str, torch.Tensor]:
        return load_file(out / "model" / "open_clip_model.safetensors")

    exported, reference = weights(fsdp), weights(ddp)
    assert exported.keys() == reference.keys() and exported["logit_scale"].shape == ()
    for name, tensor in reference.items():
        torch.testing.assert_close(exported[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    import open_clip

    model = open_clip.create_model(f"local-dir:{fsdp / 'model'}")
    assert float(model.logit_scale) == float(exported["logit_scale"])
    if kind == "siglip":
        assert exported["logit_bias"].shape == ()
        shutil.rmtree(fsdp / "checkpoints" / "step_00000004")
        shutil.rmtree(fsdp / "model")
        again = _torchrun(args, fsdp, **env)
        assert again.returncode == 0 and "step 2/4" in again.stdout, again.stderr[-3000:]
        assert all(torch.equal(weights(fsdp)[k], v) for k, v in exported.items())


SPEECH = ["trainer.log_every=1", "trainer.progress_bar=false", "trainer.trackers=[]", "trainer.warmup_steps=1"]
STABLE_LAYERS = {**BERT_LAYERS, "FSDP_TRANSFORMER_CLS_TO_WRAP": "Wav2Vec2EncoderLayerStableLayerNorm"}


def test_the_wav2vec2_family_under_fsdp_trains_as_ddp_does(tmp_path: Path) -> None:
    """Pretraining (its contrastive loss, quantiser and masking), then speech recognition and keyword
    spotting from its export: DDP's loss and gradient norm at every step, DDP's eval metrics and
    export. (transformers' encoder zeroes padded frames in place on its input, which under FSDP is a
    view autograd protects: the recipes hand it a copy, `multissl.models.encoder_input`.)"""
    from multissl.data.keyword_demo import build_keyword_corpus
    from multissl.data.speech_demo import build_speech_corpus

    speech = build_speech_corpus(tmp_path / "speech_corpus", 48, seed=0)
    keywords = build_keyword_corpus(tmp_path / "keyword_corpus", speakers=("en+m1", "en+f1", "en-us+m3", "en-us+f4",
                                                                     "en-gb-x-rp+m2", "en-gb-x-rp+f1"))
    runs = {
        "pretrain": (["recipes/wav2vec2.py", f"data.manifest={speech}", "trainer.max_steps=3", "trainer.eval_every=3",
                      "trainer.save_every=3", "data.max_seconds=3.0", "data.max_batch_samples=100000",
                      "loss.num_negatives=20", "data.validation_fraction=0.2"], 3, 3),
        "ctc": (["recipes/finetune_speech_recognition.py", f"data.manifest={speech}", "trainer.max_steps=4",
                 "trainer.eval_every=2", "trainer.save_every=2", "data.max_seconds=3.0", "data.max_batch_samples=100000",
                 "data.validation_fraction=0.2"], 4, 2),
        "keywords": (["recipes/finetune_audio_classification.py", f"data.manifest={keywords}", "trainer.max_steps=4",
                      "trainer.eval_every=2", "trainer.save_every=2", "data.validation_fraction=0.25",
                      "data.max_seconds=2", "data.max_batch_samples=160000"], 4, 2),
    }
    pretrained = None
    for name, (args, steps, checkpoint) in runs.items():
        (tmp_path / name).mkdir()
        init = [f"model.init_from={pretrained}"] if pretrained else []
        ddp, fsdp = _sharded_run_matches_ddp([*args, *SPEECH, *init], STABLE_LAYERS, tmp_path / name, steps, checkpoint)
        evals = {out: [r for r in read_jsonl(out / "metrics.jsonl") if "eval/loss" in r] for out in (ddp, fsdp)}
        assert len(evals[fsdp]) >= 2 and evals[fsdp][-1]["step"] == steps, name
        for a, b in zip(evals[ddp], evals[fsdp], strict=True):
            for key, value in a.items():
                if key.startswith("eval/") and isinstance(value, float):
                    assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (name, key)
        exported = _weights(fsdp)
        for key, tensor in _weights(ddp).items():
            torch.testing.assert_close(exported[key], tensor, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
        pretrained = pretrained or ddp / "model"


FINETUNE_IMAGE = ["recipes/finetune_image_classification.py", "trainer.max_steps=4", "trainer.log_every=1",
                  "trainer.batch_size=16", "trainer.progress_bar=false", "trainer.trackers=[]", "trainer.eval_every=0",
                  "trainer.save_every=2", "data.label_fraction=0.1"]


def test_image_fine_tuning_under_fsdp_trains_as_ddp_does(tmp_path: Path) -> None:
    """The new tiny ResNet on the embedded digits, one FSDP unit (``NO_WRAP``): DDP's training loss
    and gradient norm at every step, sharded checkpoints, and DDP's weights in an export timm loads.
    (Batch-norm running statistics are each process's own under FSDP, so only parameters are compared.)"""
    ddp, fsdp = _sharded_run_matches_ddp(FINETUNE_IMAGE, FSDP_ENV, tmp_path, steps=4, checkpoint=2)
    import timm

    net = timm.create_model(f"local-dir:{fsdp / 'model'}", pretrained=True)
    exported, reference = _weights(fsdp), _weights(ddp)
    params = {name for name, _ in net.named_parameters()}
    assert params and params <= set(exported)
    for name in params:
        torch.testing.assert_close(exported[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)
