"""The objective contract image SSL needs, each part on a toy objective: setup, parameter groups and
optimizers, per-step schedules, the two optimizer-step hooks, auxiliary modules (EMA teacher, queue),
views, declared counts, picklable collators, and one model object in training and eval."""

from __future__ import annotations

import copy
import inspect
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from multissl.errors import ConfigError
from multissl.metrics import read_jsonl
from multissl.training.objective import Objective, ParamGroup
from multissl.training.optim import apply_schedules, build_optimizer, torch_groups
from multissl.training.schedules import cosine_schedule
from multissl.training.trainer import Trainer, TrainerConfig, _to_device, list_checkpoints
from tests.conftest import BIN, run
from tests.toy import Toy, ToyCollator, toy_data
from tests.toy_teacher import TeacherToy


def cfg(out: Path, **kw: object) -> TrainerConfig:
    base = dict(output_dir=str(out), max_steps=12, batch_size=16, lr=1e-2, log_every=4, progress_bar=False,
                trackers=[], seed=3, warmup_steps=2)
    base.update(kw)
    return TrainerConfig(**base)


def fit(out: Path, objective: Objective, **kw: object):
    data = toy_data()
    return Trainer(cfg(out, **kw)).fit(objective, data[:224], data[224:])


def test_setup_gets_the_run_shape_once(tmp_path: Path) -> None:
    toy = TeacherToy()
    fit(tmp_path, toy, max_steps=0, epochs=2.0, warmup_steps=3, grad_accum_steps=2)
    ctx = toy.context
    assert toy.setup_calls == 1 and ctx is not None
    # 224 samples / 16 = 14 batches an epoch, 2 micro-batches a step: 7 steps an epoch, 14 in all
    assert (ctx.total_steps, ctx.steps_per_epoch, ctx.warmup_steps) == (14, 7, 3)
    assert (ctx.world_size, ctx.rank, ctx.device.type) == (1, 0, "cpu")
    x = torch.randn(3, 2, requires_grad=True)
    assert ctx.gather(x) is x, "one process: the gather is the identity"


def test_param_groups_carry_lr_multipliers(tmp_path: Path) -> None:
    """A group with lr multiplier 0 does not move under SGD; the others do."""
    toy = TeacherToy(head_lr_multiplier=0.0)
    head_before = toy.model[3].weight.detach().clone()
    body_before = toy.model[0].weight.detach().clone()
    fit(tmp_path, toy, optimizer="sgd", momentum=0.9, weight_decay=0.0)
    assert torch.equal(toy.model[3].weight, head_before)
    assert not torch.equal(toy.model[0].weight, body_before)
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/lr" in r]
    assert rows and all(r["train/lr/head"] == 0.0 and r["train/lr"] > 0 for r in rows), "each group's lr is logged"


def test_groups_split_decay_and_check_membership() -> None:
    toy = TeacherToy()
    groups = torch_groups(toy.param_groups(toy.model), toy.model)
    names = {g["name"]: g for g in groups}
    assert set(names) == {"body/decay", "body/no_decay", "head/decay", "head/no_decay"}
    assert all(p.ndim < 2 for p in names["body/no_decay"]["params"]) and names["body/no_decay"]["wd_multiplier"] == 0
    with pytest.raises(ConfigError, match="in no optimizer group"):
        torch_groups([ParamGroup(list(toy.model[0].parameters()))], toy.model)
    with pytest.raises(ConfigError, match="in two optimizer groups"):
        torch_groups([ParamGroup(list(toy.model.parameters()), "a"), ParamGroup(list(toy.model[0].parameters()), "b")],
                     toy.model)


def test_schedules_set_lr_and_weight_decay_per_group() -> None:
    toy = TeacherToy(head_lr_multiplier=0.5)
    c = TrainerConfig(lr=0.1, weight_decay=0.04, weight_decay_end=0.4, lr_schedule="constant", max_steps=11)
    opt = build_optimizer(c, torch_groups(toy.param_groups(toy.model), toy.model), torch.device("cpu"))
    first = apply_schedules(opt, c, 0, 11, 0)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert first == {"lr": pytest.approx(0.1), "weight_decay": pytest.approx(0.04), "lr/head": pytest.approx(0.05)}
    assert by_name["head/decay"]["lr"] == pytest.approx(0.05) and by_name["body/decay"]["lr"] == pytest.approx(0.1)
    assert by_name["body/no_decay"]["weight_decay"] == 0.0
    last = apply_schedules(opt, c, 10, 11, 0)
    assert last["weight_decay"] == pytest.approx(0.4) and by_name["body/decay"]["weight_decay"] == pytest.approx(0.4)
    assert cosine_schedule(5, 11, 0.04, 0.4) == pytest.approx(0.22)


def _per_tensor_reference(opt: torch.optim.Optimizer, model: nn.Module,
                          reference: nn.Module) -> torch.optim.Optimizer:
    """``opt``'s class and settings over ``reference`` (a copy of ``model``), with torch's per-tensor
    loop: the groups' own ``fused``/``foreach`` (copied from ``opt``'s) are dropped so they cannot
    override it. LARS has no fused kernel and steps as it is."""
    by_name = dict(reference.named_parameters())
    groups = [{**{k: v for k, v in g.items() if k not in ("fused", "foreach")},
               "params": [by_name[n] for n, p in model.named_parameters() if any(p is q for q in g["params"])]}
              for g in opt.param_groups]
    accepted = inspect.signature(type(opt)).parameters
    unfused = {"fused": False, "foreach": False} if "fused" in accepted else {}
    return type(opt)(groups, **{k: v for k, v in opt.defaults.items() if k in accepted} | unfused)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_cpu_optimizer_is_fused_and_steps_as_the_per_tensor_loop(optimizer: str) -> None:
    """The fused CPU kernels (much faster on small tensors) give the per-tensor loop's updates, with each
    group's own lr and weight decay set between steps as the trainer sets them."""
    toy = TeacherToy(head_lr_multiplier=0.5, dropout=0.0)
    start = copy.deepcopy(toy.model)
    c = TrainerConfig(optimizer=optimizer, lr=0.05, weight_decay=0.04, weight_decay_end=0.4, momentum=0.9, max_steps=6)
    groups = torch_groups(toy.param_groups(toy.model), toy.model)
    opt = build_optimizer(c, groups, torch.device("cpu"))
    assert opt.defaults["fused"] is True
    reference = copy.deepcopy(toy.model)
    ref_opt = _per_tensor_reference(opt, toy.model, reference)
    torch.manual_seed(0)
    for step in range(6):
        x = torch.randn(8, 8)
        for model, o in ((toy.model, opt), (reference, ref_opt)):
            apply_schedules(o, c, step, 6, 0)
            o.zero_grad()
            model(x).pow(2).mean().backward()
            o.step()
    for (name, p), q in zip(toy.model.named_parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
    assert all(not torch.equal(p, q) for p, q in zip(toy.model.parameters(), start.parameters()))


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "lars"])
def test_a_parameter_whose_gradients_start_late_steps_as_the_per_tensor_loop(optimizer: str) -> None:
    """DINO's last layer has no gradient in the first epoch and then joins its group. torch's fused SGD
    with momentum failed on that step (a group mixing parameters with and without a momentum buffer);
    AdamW and SGD now step it as their per-tensor loop does (LARS, with no fused kernel, must take the
    step at all)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    reference = copy.deepcopy(model)
    c = TrainerConfig(optimizer=optimizer, lr=0.05, weight_decay=0.04, momentum=0.9, max_steps=6)
    opt = build_optimizer(c, torch_groups([ParamGroup(list(model.parameters()))], model), torch.device("cpu"))
    ref_opt = _per_tensor_reference(opt, model, reference)
    for step in range(6):
        x = torch.randn(8, 8)
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            if step < 3:
                m[2].weight.grad = None
            o.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_weight_decay_schedule_is_logged_beside_the_lr(tmp_path: Path) -> None:
    fit(tmp_path, Toy(), max_steps=9, log_every=1, weight_decay=0.04, weight_decay_end=0.4, warmup_steps=0)
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/weight_decay" in r]
    assert [r["step"] for r in rows] == list(range(1, 10))
    want = [cosine_schedule(s, 9, 0.04, 0.4) for s in range(9)]
    assert [r["train/weight_decay"] for r in rows] == pytest.approx(want)
    assert all("train/lr" in r for r in rows)


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_sgd_and_lars_learn(tmp_path: Path, optimizer: str) -> None:
    result = fit(tmp_path, Toy(), optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 2.0, max_steps=40,
                 weight_decay=1e-4, log_every=5)
    losses = [r["train/loss"] for r in result.history if "train/loss" in r]
    assert losses[-1] < 0.5 * losses[0], losses


def test_last_layer_frozen_by_the_gradient_hook(tmp_path: Path) -> None:
    """DINO's first epoch: gradients of the last layer dropped before the step, so AdamW (weight decay
    included) leaves it exactly as it was; afterwards it learns."""
    toy = TeacherToy(freeze_last_steps=4)
    fit(tmp_path, toy, max_steps=8, weight_decay=0.1)
    seen = toy.last_layer_seen  # the weight just before each update
    assert all(torch.equal(seen[i], seen[0]) for i in range(5)), "no change during the first 4 updates"
    assert not torch.equal(seen[7], seen[0])


def test_after_step_hook_runs_only_after_real_updates(tmp_path: Path) -> None:
    toy = TeacherToy(nan_at_steps={3})
    result = fit(tmp_path, toy, max_steps=6, log_every=1)
    assert result.state.nonfinite_total == 1
    assert toy.updates == 5 and len(toy.grads) == 5, "the skipped step ran neither hook"
    assert len(toy.momenta) == 5
    logged = [r.get("train/teacher_momentum") for r in result.history if "train/loss" in r]
    assert logged[2] is None and all(v is not None for i, v in enumerate(logged) if i != 2)


def test_auxiliary_modules_are_untrained_checkpointed_and_restored(tmp_path: Path) -> None:
    straight = TeacherToy()
    fit(tmp_path / "a", straight, max_steps=10, save_every=5)
    assert all(not p.requires_grad for p in straight.teacher.parameters())
    assert int(straight.queue.ptr) == (10 * 16) % 32 and straight.queue.items.abs().sum() > 0
    # resume from step 5: the teacher and the queue continue exactly where they were
    import shutil

    shutil.rmtree(tmp_path / "a" / "checkpoints" / "step_00000010")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step_00000005"]
    resumed = TeacherToy()
    fit(tmp_path / "b", resumed, max_steps=10, save_every=5)
    for name, module in straight.auxiliary_modules().items():
        for (k, a), b in zip(module.state_dict().items(), resumed.auxiliary_modules()[name].state_dict().values()):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=f"{name}.{k}")


def test_auxiliary_module_inside_the_model_is_refused(tmp_path: Path) -> None:
    toy = TeacherToy()
    toy.teacher = toy.model  # an EMA of itself: it would be trained and wrapped in DDP
    with pytest.raises(ConfigError, match="auxiliary module 'teacher' shares parameters with the trained model"):
        fit(tmp_path, toy)


def test_views_lists_are_moved_like_dict_values() -> None:
    batch = {"views": [torch.zeros(2), (torch.ones(1), torch.ones(3))], "names": ["a", "b"], "n": 3}
    moved = _to_device(batch, torch.device("cpu"))
    assert isinstance(moved["views"], list) and isinstance(moved["views"][1], tuple)
    assert moved["names"] == ["a", "b"] and moved["n"] == 3


def test_two_view_batches_train_and_count_declared_units(tmp_path: Path) -> None:
    result = fit(tmp_path, TeacherToy(), max_steps=4, log_every=4)
    assert result.state.seen["views"] == 2 * result.state.seen["samples"] == 2 * 4 * 16
    logged = [r for r in result.history if "train/loss" in r]
    assert logged and all(r["throughput/views_per_s"] > 0 for r in logged), "a declared unit gets its throughput"


def test_count_must_be_declared() -> None:
    class NoCount(Objective):
        pass

    with pytest.raises(NotImplementedError, match="NoCount must declare count"):
        NoCount().count({"x": torch.zeros(2)})


def test_collator_pickles_small_and_runs_in_spawned_workers(tmp_path: Path) -> None:
    toy = Toy()
    blob = pickle.dumps(toy.collator())
    assert len(blob) < 1000 and b"Linear" not in blob, "the collator carries no model"
    result = fit(tmp_path, toy, max_steps=3, num_workers=1, worker_start_method="spawn")
    assert result.state.step == 3


def test_compute_sees_one_model_object_in_training_and_eval(tmp_path: Path) -> None:
    toy = TeacherToy()
    fit(tmp_path, toy, max_steps=4, eval_every=2)
    assert len(toy.compute_models["train"]) == 1 and toy.compute_models["train"] == toy.compute_models["eval"]


def test_two_processes_keep_auxiliary_modules_identical(tmp_path: Path) -> None:
    """Under torchrun with 2 processes: teachers built from different seeds start as rank 0's and
    stay equal; compute reads a model attribute through DDP in training and in eval (uneven eval
    shards); the gradient-carrying gather returns every process's rows with gradients to its own;
    collectives still work after fit."""
    proc = run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "tests/dist_contract.py", str(tmp_path)],
               timeout=600, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for key in ranks[0]["teacher"]:
        torch.testing.assert_close(ranks[1]["teacher"][key], ranks[0]["teacher"][key], rtol=0, atol=0, msg=key)
    assert ranks[0]["teacher_start_equal"] and ranks[1]["teacher_start_equal"]
    assert ranks[0]["eval_batches"] != ranks[1]["eval_batches"], "the eval shards were uneven"
    assert all(r["attribute_seen"] == {"train", "eval"} for r in ranks)
    assert all(r["ranks_after_fit"] == [0, 1] for r in ranks), "fit leaves the process group to its opener"
    for r in ranks:  # each rank contributes one row [rank, rank]; loss = sum of row_i x i on both ranks
        assert r["gathered"].tolist() == [[0.0, 0.0], [1.0, 1.0]]
        # its own row's gradient, summed over the two processes' losses (DDP then averages)
        assert r["grad"].tolist() == [[2.0 * r["rank"]] * 2], "gradients reach each process's own rows"


def test_eval_collator_default_is_the_training_one() -> None:
    class Plain(Objective):
        def collator(self) -> ToyCollator:
            return ToyCollator(noise=0.5)

    assert Plain().eval_collator() == ToyCollator(noise=0.5)
