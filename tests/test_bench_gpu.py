"""scripts/bench_gpu.py: its smoke run (all four workloads, both sides, on the CPU) gives sane numbers
for the shapes it was asked for, and its FLOP and MFU arithmetic is right on hand-checked cases."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, run

sys.path.insert(0, str(ROOT / "scripts"))
import bench_gpu  # noqa: E402

# GPT-2 124M (d 768, 12 layers, 4d MLP, vocabulary 50,257): a block has 4d^2 + 2 d 4d weights and
# 3d + d + 4d + d biases plus two layer norms (4d); the stack ends with one more layer norm.
D, LAYERS, VOCAB = 768, 12, 50257
BLOCK = 12 * D * D + 13 * D  # 7,087,872
GPT2_BODY = LAYERS * BLOCK + 2 * D  # 85,056,000
GPT2_HEAD = VOCAB * D  # the LM head, tied to the token embedding: 38,597,376


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench_gpu") / "bench.json"
    proc = run([sys.executable, "scripts/bench_gpu.py", "--smoke", "--device", "cpu", "--jobs", "2", "--out", str(out)],
               timeout=240, OMP_NUM_THREADS="1")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "ours/peer" in proc.stdout  # the table was printed
    return json.loads(out.read_text(encoding="utf-8"))


def _finite_positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_smoke_every_workload_and_side(smoke: dict[str, Any]) -> None:
    assert smoke["smoke"] is True and smoke["device"] == "CPU" and smoke["compile"] is False
    assert set(smoke["workloads"]) == set(bench_gpu.WORKLOADS)
    for workload, result in smoke["workloads"].items():
        shape = bench_gpu.Shape(**smoke["shapes"][workload])
        per_step = {"tokens": shape.batch * shape.seq, "audio_seconds": shape.batch * shape.seconds,
                    "samples": shape.batch}[result["unit"]]
        assert set(result["sides"]) == {"multissl", bench_gpu.PEERS[workload]}
        for name, side in result["sides"].items():
            assert "error" not in side, f"{workload}/{name}: {side.get('error')}"
            assert _finite_positive(side["units_per_s"]) and _finite_positive(side["step_seconds"]), (workload, name)
            assert 0.0 <= side["data_fraction"] <= 1.0, (workload, name)
            assert side["mfu"] is None  # CPU, no --peak-tflops
            # the step clock's numbers: every step trained exactly the batch it was asked for
            clock = side if name != "multissl" else side["clock"]
            assert clock["units_per_s"] * clock["step_seconds"] == pytest.approx(per_step, rel=1e-6), (workload, name)
        ours = result["sides"]["multissl"]
        assert ours["source"] == "trainer log records"  # the trainer's perf/ metrics were there
        assert ours["windows"] == smoke["steps"] - smoke["warmup"]  # one record a step after the warm-up
        assert _finite_positive(result["ratio"]) and _finite_positive(result["flops_per_unit"])
        # the trainer's step time and the clock's (same steps, measured apart) agree
        assert ours["step_seconds"] == pytest.approx(ours["clock"]["step_seconds"], rel=0.5)


def test_smoke_text_flops_match_the_counter(smoke: dict[str, Any]) -> None:
    """The formula and FlopCounterMode agree on the tiny text models, up to the attention term (the
    counter has no formula for the CPU's fused SDPA kernel, used where there is no mask to apply)
    and MLM's drawn vs. expected mask rate."""
    for workload in ("mlm", "clm"):
        ours = smoke["workloads"][workload]["sides"]["multissl"]
        shape = bench_gpu.Shape(**smoke["shapes"][workload])
        attention = 12 * 2 * 128 * shape.seq  # the tiny text size: 128 wide, 2 layers
        formula, counted = ours["flops_per_unit"], ours["counted_flops_per_unit"]
        assert 0.95 * (formula - attention) < counted < 1.02 * formula, workload


def test_flop_formula_gpt2_124m() -> None:
    """nanoGPT's estimate for GPT-2 124M at T = 1024, by hand: 6 x 123.65M + 12 x 12 x 768 x 1024."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=1024))
        bert = BertForMaskedLM(BertConfig(vocab_size=30522))
    assert (GPT2_BODY, GPT2_HEAD) == (85_056_000, 38_597_376)
    assert bench_gpu.text_param_counts(gpt2) == (GPT2_BODY, GPT2_HEAD)
    flops = bench_gpu.transformer_flops_per_token(GPT2_BODY, GPT2_HEAD, LAYERS, D, 1024)
    assert flops == 6 * 123_653_376 + 113_246_208 == 855_166_464
    # BERT-base: the same stack plus the embeddings' layer norm; the MLM head is a d x d transform,
    # its layer norm, and the tied d x V decoder with its bias, needed only at the masked 15%
    head = D * D + D + 2 * D + 30522 * D + 30522
    assert bench_gpu.text_param_counts(bert) == (GPT2_BODY, head)
    assert bench_gpu.transformer_flops_per_token(GPT2_BODY, head, LAYERS, D, 128, 0.15) == pytest.approx(
        6 * (85_056_000 + 0.15 * 24_063_546) + 12 * 12 * 768 * 128)


def test_mfu_arithmetic() -> None:
    peaks = {"NVIDIA H100 80GB HBM3": 989.4e12, "NVIDIA H200": 989.4e12, "NVIDIA H100 PCIe": 756e12,
             "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA L4": 121e12, "NVIDIA L40S": 362e12}
    for name, peak in peaks.items():
        assert bench_gpu.peak_flops(name) == peak, name
    assert bench_gpu.peak_flops("NVIDIA A10G") is None and bench_gpu.peak_flops("CPU") is None
    # 500k tokens/s of GPT-2 124M at T = 1024 on an H100: 855.17 MFLOP x 5e5 / 989.4e12
    assert bench_gpu.mfu(855_166_464, 5e5, 989.4e12) == pytest.approx(0.43216, abs=1e-5)
    assert bench_gpu.mfu(855_166_464, 5e5, None) is None and bench_gpu.mfu(None, 5e5, 989.4e12) is None


def test_step_clock_times_steps_and_data_waits() -> None:
    """A loop that waits ~20 ms for each batch and steps in ~20 ms: half its time is data."""
    import torch
    from benchlib import StepClock

    def slow_collate(items: list[int]) -> dict[str, torch.Tensor]:
        time.sleep(0.02)
        return {"attention_mask": torch.ones(len(items), 8)}

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    loader = torch.utils.data.DataLoader(list(range(12)), batch_size=2, collate_fn=slow_collate)
    with StepClock(lambda b: float(b["attention_mask"].sum())) as clock:
        for _ in loader:
            time.sleep(0.02)
            opt.step()
    opt.step()  # after the clock: not counted
    window = clock.window(skip=1)
    assert window["steps"] == 5 and len(clock.stamps) == 6
    assert window["units_per_s"] * window["step_seconds"] == pytest.approx(16)  # 2 x 8 units a batch
    assert 0.3 < window["data_fraction"] < 0.7
    assert 0.03 < window["step_seconds"] < 0.2
    with pytest.raises(ValueError):
        clock.window(skip=6)


def test_batch_overrides_are_checked() -> None:
    assert bench_gpu.parse_batches(["clm=8", "clip=128"]) == {"clm": 8, "clip": 128}
    for bad in (["gpt=8"], ["clm=0"], ["clm"]):
        with pytest.raises(SystemExit):
            bench_gpu.parse_batches(bad)


def test_smoke_a_launched_side(tmp_path: Path) -> None:
    """``--launchers zero2``: the MLM recipe under ``accelerate launch`` with the DeepSpeed config, on 2
    CPU processes with the plain side's batch split between them, reported beside the plain side
    (``--sides`` leaves HF's out)."""
    out = tmp_path / "bench.json"
    proc = run([sys.executable, "scripts/bench_gpu.py", "--smoke", "--device", "cpu", "--workloads", "mlm",
                "--launchers", "zero2", "--sides", "multissl", "multissl-zero2", "--out", str(out)], timeout=300,
               OMP_NUM_THREADS="1")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    sides = json.loads(out.read_text(encoding="utf-8"))["workloads"]["mlm"]["sides"]
    assert set(sides) == {"multissl", "multissl-zero2"}
    launched = sides["multissl-zero2"]
    assert (launched["processes"], launched["launcher"]) == (2, "zero2")
    assert _finite_positive(launched["units_per_s"]) and launched["mfu"] is None
    assert "multissl-zero2" in proc.stdout
