"""DeepSpeed ZeRO through Accelerate: on 2 CPU processes (gloo) ZeRO-2 and ZeRO-3 train MLM as DDP
does, step for step; DeepSpeed's checkpoints resume exactly; the export is the whole model from the
fp32 master weights; the engine's skip of a non-finite step is the trainer's skip; what DeepSpeed
cannot train as asked is refused before any work, naming why and the way out."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from multissl.errors import ConfigError
from multissl.training import zero
from multissl.training.objective import Objective
from tests.conftest import BIN, FREE_PORT, ROOT, run
from tests.test_sharding import MLM, _torchrun, _weights, same_steps
from tests.toy import Toy

CONFIGS = ROOT / "recipes" / "accelerate"


def _launch(config: str, args: list[str], *rest: str, timeout: int = 600, processes: int = 2,  # noqa: ANN202
            flags: tuple[str, ...] | list[str] = ()):
    """``accelerate launch`` as a user types it on a machine without a GPU (nothing sets
    ``ACCELERATE_USE_CPU``), with 2 processes and the launcher's precision off (the trainer's own
    ``trainer.mixed_precision`` decides), plus the launcher ``flags``; it starts them with torchrun."""
    return run([str(BIN / "accelerate"), "launch", "--config_file", str(CONFIGS / config), "--num_processes", str(processes),
                "--mixed_precision", "no", *FREE_PORT, *flags, *args, *rest], timeout=timeout, OMP_NUM_THREADS="1",
               ACCELERATE_USE_CPU=None)


@pytest.mark.parametrize("stage", [2, 3])
def test_the_deepspeed_configs_launch_zero_with_bf16(stage: int) -> None:
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    name = f"deepspeed_zero{stage}.yaml"
    args = launch_command_parser().parse_args(["--config_file", f"recipes/accelerate/{name}", "recipes/mlm.py"])
    args = _validate_launch_command(args)[0]
    assert args.use_deepspeed and not args.use_fsdp and not args.multi_gpu
    assert (args.zero_stage, args.num_processes, args.mixed_precision) == (stage, 8, "bf16")
    assert not args.zero3_init_flag, "models are built whole and initialised as under DDP"


@pytest.mark.parametrize("stage", [2, 3])
def test_mlm_under_zero_trains_as_ddp_does_and_resumes_exactly(stage: int, ddp_mlm: Path, tmp_path: Path) -> None:
    """Loss and gradient norm at each of 6 steps and the evaluations equal DDP's (ZeRO-3 would start
    from other weights if transformers built the model partitioned); the export is DDP's to float
    rounding and transformers loads it; killed after step 3's checkpoint, the rerun resumes from
    DeepSpeed's partitions and ends on the weights the straight run exported."""
    out = tmp_path / "ds"
    config = f"deepspeed_zero{stage}.yaml"
    proc = _launch(config, MLM, f"trainer.output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    partitioned = {2: "optimizer states and gradients", 3: "optimizer states, gradients and weights"}[stage]
    assert f"DeepSpeed ZeRO-{stage}: {partitioned} partitioned over 2 processes" in proc.stdout
    parts = out / "checkpoints" / "step_00000003" / "pytorch_model"
    assert (parts / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file(), "each process wrote its partition"
    same_steps(ddp_mlm, out, 6)
    from multissl.metrics import read_jsonl

    evals = lambda o: [(r["step"], r["eval/loss"]) for r in read_jsonl(o / "metrics.jsonl") if "eval/loss" in r]  # noqa: E731
    assert [s for s, _ in evals(out)] == [0, 3, 6]
    for (_, a), (_, b) in zip(evals(ddp_mlm), evals(out), strict=True):
        assert b == pytest.approx(a, rel=1e-6)
    exported = _weights(out)
    assert {t.dtype for t in exported.values()} == {torch.float32}
    for name, tensor in _weights(ddp_mlm).items():
        torch.testing.assert_close(exported[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    from transformers import AutoModelForMaskedLM

    assert AutoModelForMaskedLM.from_pretrained(out / "model") is not None

    shutil.rmtree(out / "checkpoints" / "step_00000006")
    shutil.rmtree(out / "model")
    again = _launch(config, MLM, f"trainer.output_dir={out}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout and "step 3/6" in again.stdout
    for name, tensor in exported.items():
        assert torch.equal(_weights(out)[name], tensor), name
    if stage == 2:  # one process cannot take two processes' partitions: one line says so, and what to do
        alone = _launch(config, MLM, f"trainer.output_dir={out}", processes=1)
        assert alone.returncode != 0
        assert "ZeRO partitions of 2 processes, and this run has 1" in alone.stderr
        assert "--num_processes 2" in alone.stderr and "Traceback" not in alone.stderr.split("multissl: error")[0]


def test_zero3_with_partitioned_init_trains_exports_whole_and_resumes_exactly(tmp_path: Path) -> None:
    """``--zero3_init_flag true``, for a model too big to build whole on one process: transformers
    builds it already partitioned (so its initial weights are not DDP's); it trains, the export is
    the whole model in fp32 that transformers loads, and a resume from step 3's partitions ends on
    the weights of the straight run."""
    out = tmp_path / "ds"
    launch = lambda: _launch("deepspeed_zero3.yaml", MLM, f"trainer.output_dir={out}",  # noqa: E731
                             flags=["--zero3_init_flag", "true"])
    proc = launch()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DeepSpeed ZeRO-3: optimizer states, gradients and weights partitioned over 2 processes" in proc.stdout
    from multissl.metrics import read_jsonl

    losses = [r["train/loss"] for r in read_jsonl(out / "metrics.jsonl") if "train/loss" in r]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    exported = _weights(out)
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(out / "model")
    whole = dict(model.state_dict())
    for name, tensor in exported.items():  # every tensor at its full shape, none an empty partition
        assert tensor.dtype == torch.float32 and tensor.shape == whole[name].shape and tensor.numel() > 0, name
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    shutil.rmtree(out / "model")
    again = launch()
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout and "step 3/6" in again.stdout
    for name, tensor in exported.items():
        assert torch.equal(_weights(out)[name], tensor), name


def test_mlm_compiled_under_zero2_trains_as_ddp_does(ddp_mlm: Path, tmp_path: Path) -> None:
    """``trainer.compile=true``: the engine compiles the model it wraps, and stays what the trainer
    steps through after each evaluation's export; DDP's loss and gradient norm at every step."""
    out = tmp_path / "ds"
    proc = _launch("deepspeed_zero2.yaml", MLM, "trainer.compile=true", f"trainer.output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    same_steps(ddp_mlm, out, 6)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_a_nonfinite_step_is_skipped_by_the_engine(precision: str, tmp_path: Path) -> None:
    """Step 3's loss is NaN: DeepSpeed's engine leaves the weights as step 2 left them (under bf16
    too: the trainer asks it to check), the trainer counts the step and training goes on. Under bf16
    the toy's fp32 inputs meet bf16 weights: the trainer casts them."""
    proc = _launch("deepspeed_zero2.yaml", [str(ROOT / "tests" / "dist_deepspeed.py"), str(tmp_path), precision],
                   timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "non-finite loss/gradients at step 3; step skipped" in proc.stdout + proc.stderr
    seen = torch.load(tmp_path / "seen.pt")
    assert seen["nonfinite_total"] == 1 and seen["step"] == 6
    w = seen["weights"]
    same = lambda a, b: all(torch.equal(w[a][k], w[b][k]) for k in w[a])  # noqa: E731
    assert same(2, 3), "the skipped step moved the weights"
    assert not same(1, 2) and not same(3, 4), "the steps around it trained"
    assert all(torch.isfinite(t).all() for t in w[6].values())


def test_an_objective_that_edits_the_step_is_refused_before_any_work(tmp_path: Path) -> None:
    proc = _launch("deepspeed_zero2.yaml", ["recipes/simclr.py", f"trainer.output_dir={tmp_path / 'run'}",
                                            "trainer.max_steps=2"], timeout=300)
    assert proc.returncode != 0
    assert "simclr cannot train under DeepSpeed" in proc.stderr and "fsdp2_full_shard.yaml" in proc.stderr
    assert proc.stderr.count("simclr cannot train under DeepSpeed") == 1, "said once, by rank 0"
    assert "Traceback" not in proc.stderr.split("simclr cannot train")[0][-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


class _EditsWeights(Objective):
    name = "clamped"

    def after_optimizer_step(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        return {}


class _EditsNothing(Toy):
    before_optimizer_step = Objective.before_optimizer_step


def test_refuse_step_edits_names_the_hooks() -> None:
    with pytest.raises(ConfigError, match=r"toy cannot train under DeepSpeed: it edits the step \(before_optimizer_step"):
        zero.refuse_step_edits(Toy())
    with pytest.raises(ConfigError, match=r"clamped .*\(after_optimizer_step"):
        zero.refuse_step_edits(_EditsWeights.__new__(_EditsWeights))
    zero.refuse_step_edits(_EditsNothing())


def _accelerator(config: dict, processes: int = 2) -> SimpleNamespace:
    return SimpleNamespace(num_processes=processes,
                           state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config)))


def test_fill_config_writes_the_trainer_settings_where_the_config_says_auto() -> None:
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": 1.0, "bf16": {"enabled": True}}
    zero.fill_config(_accelerator(config), batch_size=4, grad_accum_steps=2, max_grad_norm=1.0, mixed_precision="bf16")
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 2
    assert config["gradient_clipping"] == 1.0 and config["train_batch_size"] == 16
    assert config["bf16"] == {"enabled": True, "check_grad_overflow": True}
    assert zero.input_dtype(_accelerator(config)) is torch.bfloat16
    assert zero.input_dtype(_accelerator({"bf16": {"enabled": False}})) is None


def test_fill_config_refuses_a_config_that_trains_otherwise() -> None:
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps: 8, but trainer.grad_accum_steps=2"):
        zero.fill_config(_accelerator({"gradient_accumulation_steps": 8}), batch_size=4, grad_accum_steps=2,
                         max_grad_norm=1.0, mixed_precision="no")


def test_a_partitioned_parameter_is_rebuilt_in_its_whole_shape() -> None:
    """transformers builds a model partitioned when ZeRO-3's init flag is on: each parameter holds an
    empty tensor and DeepSpeed keeps the shape in ``ds_shape``; the export's replica takes that."""
    from multissl.training.sharding import FullReplica

    net = torch.nn.Linear(3, 2)
    full = {k: v.clone() for k, v in net.state_dict().items()}
    for p in net.parameters():
        p.ds_shape = p.shape
        p.data = torch.empty(0)
    rebuilt = FullReplica(net).materialise(full)
    assert torch.equal(rebuilt.weight, full["weight"]) and torch.equal(rebuilt.bias, full["bias"])


def test_wav2vec2_and_speech_recognition_under_zero2_train_as_ddp_does(tmp_path: Path) -> None:
    """Pretraining, a model fed floats (waveforms) with a quantiser and masking, then speech
    recognition from its export: DDP's loss and gradient norm at every step, DDP's evaluations (the
    CER and WER too: the engine reports evaluation mode to the objective) and DDP's export."""
    from multissl.data.speech_demo import build_speech_corpus
    from multissl.metrics import read_jsonl
    from tests.test_sharding_recipes import SPEECH

    speech = build_speech_corpus(tmp_path / "speech_corpus", 48, seed=0)
    common = [f"data.manifest={speech}", "data.max_seconds=3.0", "data.max_batch_samples=100000",
              "data.validation_fraction=0.2", *SPEECH]
    runs = {"pretrain": (["recipes/wav2vec2.py", "trainer.max_steps=3", "trainer.eval_every=3", "trainer.save_every=3",
                          "loss.num_negatives=20", *common], 3, ["loss"]),
            "ctc": (["recipes/finetune_speech_recognition.py", "trainer.max_steps=4", "trainer.eval_every=2",
                     "trainer.save_every=2", *common], 4, ["loss", "cer", "wer"])}
    pretrained = None
    for name, (args, steps, metrics) in runs.items():
        init = [f"model.init_from={pretrained}"] if pretrained else []
        ddp, ds = tmp_path / name / "ddp", tmp_path / name / "ds"
        proc = _torchrun([*args, *init], ddp)
        assert proc.returncode == 0, proc.stderr[-3000:]
        proc = _launch("deepspeed_zero2.yaml", [*args, *init], f"trainer.output_dir={ds}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "DeepSpeed ZeRO-2" in proc.stdout
        same_steps(ddp, ds, steps, loss_rel=1e-5, norm_rel=1e-4, what=name)
        evals = {out: [r for r in read_jsonl(out / "metrics.jsonl") if "eval/loss" in r] for out in (ddp, ds)}
        assert len(evals[ds]) >= 2 and evals[ds][-1]["step"] == steps, name
        for a, b in zip(evals[ddp], evals[ds], strict=True):
            for metric in metrics:
                assert b[f"eval/{metric}"] == pytest.approx(a[f"eval/{metric}"], rel=1e-5), (name, metric)
        exported = _weights(ds)
        for key, tensor in _weights(ddp).items():
            torch.testing.assert_close(exported[key], tensor, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
        pretrained = pretrained or ddp / "model"
