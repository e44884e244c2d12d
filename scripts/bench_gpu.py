"""Benchmark on one GPU: multissl's MLM, CLM, wav2vec 2.0 and CLIP recipes at realistic sizes against
the usual way to train the same model on the same batch; tokens/s (audio-s/s, samples/s), step
time, peak memory, data-loader share and MFU.

    python scripts/bench_gpu.py [--workloads mlm clm wav2vec2 clip] [--smoke] [--out outputs/bench_gpu.json]
                                [--steps 50] [--warmup 10] [--peak-tflops T] [--no-compile] [--batch clm=8 ...]
                                [--launchers zero2 zero3 fsdp2] [--sides multissl multissl-zero2 ...]

One command, no network; sized to take at most ~8 minutes on an H100/H200 for all four, most of it
start-up and ``torch.compile`` (an estimate: it has not run on a GPU yet). ``--smoke`` runs the same
code at tiny sizes, on the CPU in about a minute (no compile, no bf16 unless ``--compile``,
``--bf16``); on a GPU machine, ``--smoke`` exercises the GPU path (bf16, compile) at tiny sizes first.

Workloads (GPU sizes; ``--smoke``: tiny models, 64 tokens, 1 s of audio, batches of 2-4):

* ``mlm``: BERT-base (768 x 12 layers, vocabulary 30,522), 256 sequences x 128 tokens a step;
  peer: HF's ``Trainer`` on the same ``BertForMaskedLM`` (``DataCollatorForLanguageModeling``).
* ``clm``: GPT-2 124M (768 x 12, vocabulary 50,257), 16 x 1,024 tokens; peer: HF's ``Trainer``.
* ``wav2vec2``: wav2vec 2.0 BASE, 6 utterances x 15.6 s (fairseq's ~1.4M samples a GPU); peer: the
  loop of transformers' ``run_wav2vec2_pretraining_no_trainer.py`` (scripts/bench_audio.py's copy, with
  Accelerate's bf16 autocast; the example has no compile switch, no loader workers and torch's
  default, unfused AdamW).
* ``clip``: open_clip ViT-B-32, 256 image-caption pairs; peer: ``open_clip_train`` (scripts/bench_clip.py)
  with ``--precision amp_bf16 --torchcompile`` and the same number of workers.

Data: random tokens (a word-level tokenizer of exactly the model's vocabulary over random words, so
the recipes' own loading, tokenizing and packing run and every block is full), white-noise WAV
files (each longer than the crop, so every utterance is cropped to the same length), and the
embedded shapes corpus for CLIP (64-pixel PNGs, resized to 224 by open_clip's transforms; listed
under as many names as one epoch of the run needs). Both sides read the same files.

Launched sides (``--launchers``; on CUDA by default ``zero2 fsdp2`` for MLM): the multissl side again
under ``accelerate launch --config_file recipes/accelerate/<config>`` on every GPU (2 processes on the
CPU), the same effective batch split between them; its throughput is theirs together and its MFU
per GPU. They are there so that the first GPU run exercises DeepSpeed and FSDP2 on NCCL with bf16.

multissl side: the recipe's ``main`` with ``key=value`` overrides (bf16, SDPA, fused AdamW on CUDA,
``trainer.compile``), each side in its own process (peak memory is its own). Its numbers are the
trainer's own log records (``throughput/<unit>_per_s``, ``perf/step_seconds``,
``perf/data_fraction``, ``perf/max_memory_gb``): the median over the log windows after the first
``--warmup`` steps (compilation). Peers: step ends from a torch optimizer-step hook, data waits
and batch sizes from the DataLoader iterator (``benchlib.StepClock``), over the same steps; peak
memory is ``torch.cuda.max_memory_allocated`` (on CPU: "-", peak RSS is in the JSON).

MFU = model FLOPs/s over the device's dense bf16 peak (a table by device name, or ``--peak-tflops``;
"-" on CPU). Text: FLOPs per token = 6 x (N_body + p x N_head) + 12 x L x d x T (nanoGPT's
``estimate_mfu``, PaLM appendix B): N_body = the parameters every token passes through (all but
the embedding tables and the output head), N_head = the output head's, its vocabulary projection
counted when tied to the input embeddings (GPT-2 124M: N_body 85.06M, N_head 38.60M, 0.855 GFLOP
a token at T = 1024); p = the share of positions the head is needed at (MLM: the mask rate,
multissl computes it only there; CLM: 1); the attention term counts the full T x T scores, causal
or not, as nanoGPT does. Both sides are credited the same FLOPs per unit, so their MFU ratio is
their throughput ratio (HF's MLM computes the head at every position: work MFU does not credit). wav2vec2 and CLIP: the FLOPs of one training step
(forward and backward) counted by ``torch.utils.flop_counter.FlopCounterMode`` on the actual model
and batch, divided by the batch's audio seconds or pairs; text runs get that count too, as a check
of the formula. Targets (issue 16) on an H100/H200: MLM >= 45% MFU, CLM >= 50%, wav2vec2 and CLIP
>= 1.5x the peer's samples/s with data time < 5% of the step.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from benchlib import ROOT, StepClock, child_env, hf_training_args, peak_rss_mb

SEED, RATE = 0, 16000
WORKLOADS = ("mlm", "clm", "wav2vec2", "clip")
PEERS = {"mlm": "hf_trainer", "clm": "hf_trainer", "wav2vec2": "hf_example", "clip": "open_clip_train"}
UNITS = {"mlm": "tokens", "clm": "tokens", "wav2vec2": "audio_seconds", "clip": "samples"}
UNIT_LABELS = {"tokens": "tokens/s", "audio_seconds": "audio-s/s", "samples": "samples/s"}
UNIT_NAMES = {"tokens": "token", "audio_seconds": "second of audio", "samples": "image-caption pair"}
CONFIG_CLASSES = {"mlm": "MLMConfig", "clm": "CLMConfig", "wav2vec2": "Wav2Vec2Config", "clip": "ClipConfig"}
LAUNCHERS = {"zero2": "deepspeed_zero2.yaml", "zero3": "deepspeed_zero3.yaml", "fsdp2": "fsdp2_full_shard.yaml"}
"""Extra multissl sides (``--launchers``): the recipe under ``accelerate launch --config_file
recipes/accelerate/<file>`` on every GPU (2 processes on the CPU), the same effective batch."""
LAYER_TO_WRAP = {"mlm": "BertLayer", "clm": "GPT2Block"}
LAUNCHED_WORKLOADS = tuple(LAYER_TO_WRAP)

# Dense (no 2:4 sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, by torch.cuda.get_device_name();
# the first pattern that matches wins. Others (A10G: NVIDIA publishes no dense figure): --peak-tflops.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    (r"H100.*PCIe", 756e12),
    (r"H100.*NVL", 835e12),
    (r"H100|H200|H800", 989.4e12),  # SXM; the H200 and GH200 have the H100 SXM's compute
    (r"A100", 312e12),
    (r"L40S", 362e12),
    (r"L40\b", 181e12),
    (r"L4\b", 121e12),
)


@dataclass(frozen=True)
class Shape:
    """What both sides of a workload train: the model and one optimizer step's batch."""

    model: str
    """model.size (text, wav2vec2) or the open_clip model name (CLIP)."""
    batch: int
    """Sequences, utterances or image-caption pairs per step."""
    seq: int = 0
    """Text: tokens per sequence (every block full)."""
    vocab: int = 0
    """Text: vocabulary size of the synthetic tokenizer."""
    seconds: float = 0.0
    """Audio: seconds per utterance (every file is longer and cropped to this)."""
    workers: int = 0
    """DataLoader workers, both sides (the wav2vec2 example has none)."""
    preset: str = ""
    """The recipe preset (``--config``); empty = the recipe's default, its tiny preset."""


GPU_SHAPES = {
    "mlm": Shape("base", 256, seq=128, vocab=30522, workers=2, preset="base"),
    "clm": Shape("base", 16, seq=1024, vocab=50257, workers=2, preset="base"),
    "wav2vec2": Shape("base", 6, seconds=15.6, workers=6, preset="base"),
    "clip": Shape("ViT-B-32", 256, workers=8),
}
SMOKE_SHAPES = {
    "mlm": Shape("tiny", 4, seq=64, vocab=1000),
    "clm": Shape("tiny", 4, seq=64, vocab=1000),
    "wav2vec2": Shape("tiny", 2, seconds=1.0),
    "clip": Shape("multissl-tiny", 4),
}


# ----------------------------------------------------------------------------- FLOPs and MFU
def transformer_flops_per_token(body_params: int, head_params: int, layers: int, width: int, seq: int,
                                head_fraction: float = 1.0) -> float:
    """Training FLOPs per token: 6 per parameter a token goes through (2 forward, 4 backward), the
    head's only at the ``head_fraction`` of positions it is applied to, plus 12 x L x d x T for
    the attention scores and their weighted sum (forward and backward, full T x T, as nanoGPT)."""
    return 6.0 * (body_params + head_fraction * head_params) + 12.0 * layers * width * seq


def text_param_counts(model: Any) -> tuple[int, int]:
    """``(N_body, N_head)`` of a transformers LM: the layer stack's parameters (the embedding tables
    are lookups, not matmuls) and the output head's, its vocabulary projection counted even when it
    is the input embedding, tied (it is still a d x V matmul per position)."""
    from torch import nn

    base = model.base_model
    tables = {id(p) for m in base.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    in_base = {id(p) for p in base.parameters()}
    body = sum(p.numel() for p in base.parameters() if id(p) not in tables)
    head = sum(p.numel() for p in model.parameters() if id(p) not in in_base)
    output = model.get_output_embeddings()
    if output is not None and id(output.weight) in in_base:
        head += output.weight.numel()
    return body, head


def peak_flops(device_name: str) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None when it is not in the table."""
    return next((flops for pattern, flops in PEAK_BF16_FLOPS if re.search(pattern, device_name)), None)


def mfu(flops_per_unit: float | None, units_per_s: float | None, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak; None when anything is unknown."""
    if not (flops_per_unit and units_per_s and peak):
        return None
    return flops_per_unit * units_per_s / peak


# ----------------------------------------------------------------------------- data (driver)
def write_text_corpus(folder: Path, kind: str, vocab: int, seq: int, blocks: int) -> tuple[Path, Path]:
    """A word-level tokenizer of exactly ``vocab`` tokens (the specials, then ``w0``, ``w1``, ...) and a
    JSONL corpus of ``blocks`` documents of random words, each exactly one packed block long (MLM:
    ``seq - 3`` words + [SEP], wrapped in [CLS] ... [SEP]; CLM: ``seq - 1`` words + EOS), so every
    block is full and the recipes' own loading, tokenizing and packing run. Returns ``(tokenizer
    folder, corpus file)``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if kind == "mlm":
        specials = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                    "mask_token": "[MASK]"}
    else:
        specials = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    names = list(dict.fromkeys(specials.values()))
    words = [f"w{i}" for i in range(vocab - len(names))]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(names + words)}, unk_token=specials["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=seq, **specials)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder / "tokenizer")
    rng = random.Random(SEED)
    per_doc = seq - 3 if kind == "mlm" else seq - 1
    corpus = folder / "corpus.jsonl"
    with corpus.open("w", encoding="utf-8") as fh:
        for _ in range(blocks):
            fh.write(json.dumps({"text": " ".join(rng.choices(words, k=per_doc))}) + "\n")
    return folder / "tokenizer", corpus


def write_noise_audio(folder: Path, files: int, seconds: float) -> Path:
    """``files`` 16 kHz WAV files of white noise, ``seconds`` long (not silent, so none is skipped)."""
    import numpy as np
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    for i in range(files):
        sf.write(folder / f"noise_{i:04d}.wav", rng.uniform(-0.5, 0.5, round(seconds * RATE)).astype("float32"), RATE,
                 subtype="PCM_16")
    return folder


def prepare_data(workload: str, shape: Shape, steps: int, work: Path) -> dict[str, Any]:
    """The files both sides of ``workload`` read, under ``work/<workload>``: one epoch's worth for
    the whole run, so no loader restarts (and waits for its workers to start) inside the timing."""
    folder, samples = work / workload, steps * shape.batch
    if workload in ("mlm", "clm"):
        tokenizer, corpus = write_text_corpus(folder, workload, shape.vocab, shape.seq, samples)
        return {"tokenizer": str(tokenizer), "corpus": str(corpus)}
    if workload == "wav2vec2":
        return {"audio": str(write_noise_audio(folder, samples, shape.seconds + 0.5))}
    from bench_clip import write_train_csv

    from multissl.cli import quiet_libraries

    quiet_libraries()
    folder.mkdir(parents=True, exist_ok=True)
    csv, per_epoch, _, _, _ = write_train_csv(folder, steps, shape.batch, min_pairs=samples)
    return {"csv": str(csv), "batches_per_epoch": per_epoch}


# ----------------------------------------------------------------------------- one side (child)
def recipe_argv(plan: dict[str, Any]) -> list[str]:
    """The multissl recipe's command line for the plan: its preset, the shape, and timing settings
    (no evaluation, no mid-run checkpoints, no trackers, logs every ``log_every`` steps)."""
    shape, data, w = Shape(**plan["shape"]), plan["data"], plan["workload"]
    argv = ["--config", shape.preset] if shape.preset else []
    precision = "bf16" if plan["bf16"] else "'no'"  # quoted: YAML reads a bare no as false
    argv += [
        f"trainer.output_dir={plan['run_dir']}", f"trainer.seed={SEED}", f"trainer.max_steps={plan['steps']}",
        f"trainer.batch_size={shape.batch // plan.get('processes', 1)}", "trainer.grad_accum_steps=1",
        f"trainer.warmup_steps={plan['warmup']}",
        f"trainer.log_every={plan['log_every']}", "trainer.eval_every=0", "trainer.save_every=0",
        "trainer.progress_bar=false", "trainer.trackers=[]", f"trainer.num_workers={shape.workers}",
        f"trainer.mixed_precision={precision}", f"trainer.compile={str(plan['compile']).lower()}",
        f"trainer.cpu={str(plan['device'] == 'cpu').lower()}",
    ]
    if w in ("mlm", "clm"):
        argv += [f"model.size={shape.model}", "model.attn_implementation=sdpa", f"data.files=[{data['corpus']}]",
                 f"data.tokenizer={data['tokenizer']}", f"data.max_seq_len={shape.seq}", "data.validation_fraction=0",
                 "data.num_proc=0"]
    elif w == "wav2vec2":
        argv += [f"model.size={shape.model}", f"data.files=[{data['audio']}]", f"data.max_seconds={shape.seconds}",
                 f"data.min_seconds={min(1.0, shape.seconds)}", "data.validation_fraction=0",
                 f"data.max_batch_samples={shape.batch * int(shape.seconds * RATE)}"]
    else:
        argv += [f"model.name={shape.model}", f"data.csv={data['csv']}", "data.image_key=filepath",
                 "data.caption_key=title", "data.validation_fraction=0"]
    return argv


def recipe_config(plan: dict[str, Any]) -> Any:
    """The recipe's config for the plan, as its ``main`` would load it."""
    import importlib

    from multissl import config

    recipe = importlib.import_module(f"multissl_recipes.{plan['workload']}")
    return config.load(getattr(recipe, CONFIG_CLASSES[plan["workload"]]), recipe_argv(plan), recipe.DEFAULT_CONFIG)


def batch_units(workload: str, batch: Any) -> float:
    """A batch's size in the workload's unit, in either side's batch format."""
    if workload == "clip":  # ours: a dict with "images"; open_clip_train: (images, texts)
        return float((batch["images"] if isinstance(batch, dict) else batch[0]).shape[0])
    return float(batch["attention_mask"].sum()) / (RATE if workload == "wav2vec2" else 1)


def _memory(device: str) -> dict[str, float | None]:
    import torch

    gb = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"peak_memory_gb": gb, "peak_rss_mb": peak_rss_mb()}


def counted_step_flops(objective: Any, train: Any, trainer: Any) -> tuple[float, dict[str, float]]:
    """FLOPs of one training step, forward and backward (matmuls, convolutions and attention, as
    ``FlopCounterMode`` counts them), on a batch the trainer's loader makes, eagerly and under the
    run's autocast; and that batch's units (``objective.count``)."""
    from accelerate.utils import send_to_device
    from torch.utils.flop_counter import FlopCounterMode

    from multissl.metrics import scalar
    from multissl.training.loader import make_loader

    cfg = trainer.cfg
    loader, _ = make_loader(train, cfg.batch_size, objective.collator(), seed=cfg.seed, shuffle=True, drop_last=True,
                            rank=0, world_size=1, split_tag=0)
    batch = next(iter(loader))
    count = objective.count(batch)
    model = objective.model
    model.train()
    with FlopCounterMode(display=False) as counter:
        with trainer.accelerator.autocast():
            out = objective.compute(model, send_to_device(batch, trainer.device))
        scalar(out["loss"]).backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops()), count


def run_multissl(plan: dict[str, Any]) -> dict[str, Any]:
    """Our recipe's ``main``; numbers from the trainer's log records after the warm-up, the step
    clock's alongside as a check, and the workload's FLOPs per unit."""
    import importlib

    from multissl.training.trainer import Trainer

    w, warmup, log_every = plan["workload"], plan["warmup"], plan["log_every"]
    unit = UNITS[w]
    recipe = importlib.import_module(f"multissl_recipes.{w}")
    seen: dict[str, Any] = {}
    fit = Trainer.fit

    def fit_and_keep(trainer: Any, objective: Any, train_data: Any, eval_data: Any = None) -> Any:
        seen.update(trainer=trainer, objective=objective, train=train_data)  # for the FLOP count after
        return fit(trainer, objective, train_data, eval_data)

    Trainer.fit = fit_and_keep  # type: ignore[method-assign]
    try:
        with StepClock(partial(batch_units, w)) as clock:
            result = recipe.main(recipe_argv(plan))
    finally:
        Trainer.fit = fit  # type: ignore[method-assign]
    out: dict[str, Any] = {"clock": clock.window(warmup), **_memory(plan["device"])}
    windows = [r for r in result.history if "perf/step_seconds" in r and r["step"] - log_every >= warmup]
    if windows:
        gb = [r["perf/max_memory_gb"] for r in windows if "perf/max_memory_gb" in r]
        out.update(source="trainer log records", windows=len(windows),
                   units_per_s=statistics.median(r[f"throughput/{unit}_per_s"] for r in windows),
                   step_seconds=statistics.median(r["perf/step_seconds"] for r in windows),
                   data_fraction=statistics.median(r["perf/data_fraction"] for r in windows),
                   peak_memory_gb=max(gb) if gb else out["peak_memory_gb"])
    else:
        print("warning: the trainer logged no perf/ metrics after the warm-up; using the step clock", flush=True)
        out.update(source="step clock", step_seconds=out["clock"]["step_seconds"],
                   units_per_s=out["clock"]["units_per_s"], data_fraction=out["clock"]["data_fraction"])

    if plan.get("launcher"):  # sharded or partitioned weights: the plain side counts the FLOPs
        return {**out, "processes": plan["processes"], "launcher": plan["launcher"]}
    objective = seen["objective"]
    try:  # the timings are worth having even if counting fails
        flops, count = counted_step_flops(objective, seen["train"], seen["trainer"])
        out["counted_flops_per_unit"] = flops / count[unit]
    except Exception as err:
        print(f"warning: FlopCounterMode failed: {err!r}", flush=True)
        out["counted_flops_per_unit"], out["flops_error"] = None, repr(err)
    if w in ("mlm", "clm"):
        model = objective.export(objective.model)
        body, head = text_param_counts(model)
        fraction = recipe_config(plan).masking.mask_prob if w == "mlm" else 1.0
        shape = Shape(**plan["shape"])
        out.update(flops_per_unit=transformer_flops_per_token(body, head, model.config.num_hidden_layers,
                                                              model.config.hidden_size, shape.seq, fraction),
                   flops_source="6(N_body + p N_head) + 12 L d T", n_body=body, n_head=head, head_fraction=fraction)
    else:
        out.update(flops_per_unit=out["counted_flops_per_unit"], flops_source="FlopCounterMode, one step")
    return out


def run_hf_trainer(plan: dict[str, Any]) -> dict[str, Any]:
    """HF's Trainer on the recipe's transformers model, tokenizer and packed blocks, with HF's own
    collator (MLM: masking at the recipe's rate, logits at every position)."""
    from accelerate.utils import set_seed
    from transformers import DataCollatorForLanguageModeling, Trainer

    from multissl.data.text import prepare_text
    from multissl.objectives.clm import CausalLM
    from multissl.objectives.mlm import MaskedLM

    w, shape, cfg = plan["workload"], Shape(**plan["shape"]), recipe_config(plan)
    set_seed(SEED)
    data = prepare_text(cfg.data, w, plan["run_dir"], SEED)
    if w == "mlm":
        objective: Any = MaskedLM(cfg.model, cfg.masking, data.tokenizer, cfg.data.max_seq_len)
    else:
        objective = CausalLM(cfg.model, data.tokenizer, cfg.data.max_seq_len)
    model = objective.export(objective.model)
    collator = DataCollatorForLanguageModeling(data.tokenizer, mlm=w == "mlm",
                                               mlm_probability=cfg.masking.mask_prob if w == "mlm" else 0.15)
    args = hf_training_args(str(Path(plan["run_dir"]) / "hf"), shape.batch, plan["steps"], cfg.trainer.lr,
                            plan["warmup"], SEED, cuda=plan["device"] == "cuda", bf16=plan["bf16"],
                            compile=plan["compile"], workers=shape.workers)
    with StepClock(partial(batch_units, w)) as clock:
        Trainer(model=model, args=args, train_dataset=data.train, data_collator=collator).train()
    return {**clock.window(plan["warmup"]), **_memory(plan["device"]), "source": "step clock"}


def run_hf_example(plan: dict[str, Any]) -> dict[str, Any]:
    """transformers' wav2vec 2.0 pretraining example loop (scripts/bench_audio.py) on the recipe's model
    and files, a fixed number of utterances a batch, decoded and masked in the main process."""
    from accelerate.utils import set_seed
    from bench_audio import Tally, _train_hf_example

    from multissl.data.audio_splits import prepare_audio
    from multissl.objectives.wav2vec2 import build_wav2vec2

    shape, cfg = Shape(**plan["shape"]), recipe_config(plan)
    train, _ = prepare_audio(cfg.data, SEED)
    set_seed(SEED)
    model = build_wav2vec2(cfg.model, cfg.loss)
    with StepClock(partial(batch_units, "wav2vec2")) as clock:
        _train_hf_example(model, train, plan["steps"], shape.batch, cfg.data.max_samples, cfg.loss, Tally(),
                          device=plan["device"], bf16=plan["bf16"])
    return {**clock.window(plan["warmup"]), **_memory(plan["device"]), "source": "step clock"}


def run_open_clip(plan: dict[str, Any]) -> dict[str, Any]:
    """open_clip_train's ``main`` (scripts/bench_clip.py) on the same CSV, model and batch, with its own
    switches for speed where it has them."""
    from bench_clip import _train_open_clip

    shape, data = Shape(**plan["shape"]), plan["data"]
    args = argparse.Namespace(csv=data["csv"], init="", batch_size=shape.batch, steps=plan["steps"],
                              batches_per_epoch=data["batches_per_epoch"])
    extra = ["--model", shape.model, "--workers", str(shape.workers), "--device", plan["device"],
             "--precision", "amp_bf16" if plan["bf16"] else "fp32", *(["--torchcompile"] if plan["compile"] else [])]
    with StepClock(partial(batch_units, "clip")) as clock:
        _train_open_clip(args, Path(plan["run_dir"]), extra)
    return {**clock.window(plan["warmup"]), **_memory(plan["device"]), "source": "step clock"}


SIDE_RUNNERS = {"multissl": run_multissl, "hf_trainer": run_hf_trainer, "hf_example": run_hf_example,
                "open_clip_train": run_open_clip}


def run_child(plan_file: str) -> None:
    """One side of one workload, in this (fresh) process; its result as JSON in ``plan["out"]``."""
    import torch

    from multissl.cli import quiet_libraries

    plan = json.loads(Path(plan_file).read_text(encoding="utf-8"))
    quiet_libraries()
    if plan["threads"]:
        torch.set_num_threads(plan["threads"])
    start = time.perf_counter()
    result = SIDE_RUNNERS[plan["side"].split("-", 1)[0] if plan.get("launcher") else plan["side"]](plan)
    result["wall_s"] = time.perf_counter() - start
    if int(os.environ.get("RANK", "0")) == 0:  # launched sides: every process has the same reduced numbers
        Path(plan["out"]).write_text(json.dumps(result), encoding="utf-8")
    if plan.get("launcher"):
        from multissl.cli import leave_process_group

        leave_process_group(0)


# ----------------------------------------------------------------------------- driver
def launch_prefix(plan: dict[str, Any]) -> list[str]:
    """How a side starts: a plain child process, or ``accelerate launch`` with a launcher config
    (its precision off: the recipe's ``trainer.mixed_precision`` decides, as the configs say)."""
    if not plan.get("launcher"):
        return [sys.executable]
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
                str(ROOT / "recipes" / "accelerate" / LAUNCHERS[plan["launcher"]]),
                "--num_processes", str(plan["processes"]), "--mixed_precision", "no",
                "--main_process_port", "0"]  # a free port: another launch on this machine may hold the default
    if plan["launcher"] == "fsdp2":
        launcher += ["--fsdp_transformer_layer_cls_to_wrap", LAYER_TO_WRAP[plan["workload"]]]
    return launcher


def run_side(plan: dict[str, Any], work: Path, timeout: float) -> dict[str, Any]:
    """Start one child; its result, or ``{"error": ...}`` when it failed or ran out of time."""
    tag = f"{plan['workload']}-{plan['side']}"
    plan = {**plan, "run_dir": str(work / "runs" / tag), "out": str(work / f"{tag}.json")}
    plan_file = work / f"{tag}.plan.json"
    plan_file.write_text(json.dumps(plan), encoding="utf-8")
    env = child_env(plan["threads"], cpu_only=plan["device"] == "cpu")
    env["HF_DATASETS_CACHE"] = str(work / "datasets-cache")
    start = time.perf_counter()
    try:
        proc = subprocess.run([*launch_prefix(plan), __file__, "--child", str(plan_file)], capture_output=True,
                              text=True, env=env, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    finally:
        shutil.rmtree(plan["run_dir"], ignore_errors=True)  # checkpoints and exported models
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or not Path(plan["out"]).is_file():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-25:]
        return {"error": f"exit {proc.returncode}: " + "\n".join(tail)}
    result = json.loads(Path(plan["out"]).read_text(encoding="utf-8"))
    print(f"  {tag}: {result['units_per_s']:.1f} {UNIT_LABELS[UNITS[plan['workload']]]} in {seconds:.0f} s", flush=True)
    return result


def summarise(workload: str, sides: dict[str, dict[str, Any]], peak: float | None) -> dict[str, Any]:
    """MFU for every side from the multissl side's FLOPs per unit (same model and batch), and the
    throughput ratio multissl / peer."""
    ours, peer = sides.get("multissl", {}), sides.get(PEERS[workload], {})
    flops = ours.get("flops_per_unit")
    for side in sides.values():
        if "error" not in side:  # a launched side's throughput is its processes' together: MFU per device
            side["mfu"] = mfu(flops, side["units_per_s"] / side.get("processes", 1), peak)
    ratio = ours["units_per_s"] / peer["units_per_s"] if "units_per_s" in ours and "units_per_s" in peer else None
    return {"unit": UNITS[workload], "flops_per_unit": flops, "flops_source": ours.get("flops_source"),
            "ratio": ratio, "sides": sides}


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: dict[str, dict[str, Any]]) -> str:
    """The printed table: one row per workload and side; ``data`` is the share of the step spent
    waiting for the data loader, ``ours/peer`` the ratio of the throughputs."""
    head = (f"{'workload':9s} {'side':16s} {'throughput':>12s} {'unit':10s} {'step ms':>9s} {'peak GB':>8s} "
            f"{'data':>6s} {'MFU':>6s} {'ours/peer':>9s}")
    lines = [head, "-" * len(head)]
    for workload, r in results.items():
        for name, side in r["sides"].items():
            if "error" in side:
                lines.append(f"{workload:9s} {name:16s} failed: {side['error'].splitlines()[-1][:80]}")
                continue
            ratio = _fmt(r["ratio"], ".2f") if name == "multissl" else ""
            mfu_cell = "-" if side.get("mfu") is None else f"{100 * side['mfu']:.1f}%"
            lines.append(f"{workload:9s} {name:16s} {side['units_per_s']:12,.1f} {UNIT_LABELS[r['unit']]:10s} "
                         f"{1000 * side['step_seconds']:9.1f} {_fmt(side.get('peak_memory_gb'), '.1f'):>8s} "
                         f"{side['data_fraction']:6.3f} {mfu_cell:>6s} {ratio:>9s}")
    return "\n".join(lines)


def parse_batches(items: Sequence[str]) -> dict[str, int]:
    """``--batch clm=8 clip=128`` -> {"clm": 8, "clip": 128}."""
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in WORKLOADS or not value.isdigit() or int(value) < 1:
            raise SystemExit(f"--batch {item!r}: expected WORKLOAD=N with WORKLOAD one of {', '.join(WORKLOADS)}")
        out[name] = int(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--smoke", action="store_true", help="tiny models and batches, a few steps (CPU-friendly)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--steps", type=int, help="optimizer steps a side (default 50; --smoke: 6)")
    parser.add_argument("--warmup", type=int, help="steps left out of the timing (default 10; --smoke: 2)")
    parser.add_argument("--batch", nargs="+", default=[], metavar="WORKLOAD=N", help="override a batch size")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for MFU")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile on both sides (default: on CUDA only)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on the CPU too (always on CUDA)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads a side (0: torch's default)")
    parser.add_argument("--jobs", type=int, default=1, help="sides run at once (CPU smoke runs only: timings interfere)")
    parser.add_argument("--launchers", nargs="*", choices=LAUNCHERS, default=None,
                        help="extra multissl sides for mlm and clm under accelerate launch with these configs, on "
                             "every GPU (2 processes on the CPU); default on CUDA: zero2 fsdp2 for mlm; none on CPU")
    parser.add_argument("--sides", nargs="+", metavar="SIDE",
                        help="run only these sides (multissl, the peers, multissl-<launcher>); default: all")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a side may take")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench_gpu.json"))
    parser.add_argument("--keep", action="store_true", help="keep the work folder (data, plans, results)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child)
        return

    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    if device == "cuda" and args.jobs > 1:
        parser.error("--jobs > 1 shares the GPU between sides; run them one at a time")
    steps = args.steps or (6 if args.smoke else 50)
    warmup = args.warmup if args.warmup is not None else (2 if args.smoke else 10)
    log_every = 1 if args.smoke else max(1, min(10, warmup))
    if warmup < 1 or warmup % log_every or steps < warmup + log_every:
        parser.error(f"need 1 <= --warmup (a multiple of the log interval {log_every}) and --steps >= warmup + "
                     f"{log_every}")
    shapes = SMOKE_SHAPES if args.smoke else GPU_SHAPES
    shapes = {w: replace(s, batch=b) for w, s in shapes.items() for b in [parse_batches(args.batch).get(w, s.batch)]}
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (peak_flops(name) if device == "cuda" else None)
    bf16 = device == "cuda" or args.bf16
    compile_ = device == "cuda" if args.compile is None else args.compile
    print(f"{name}: peak {_fmt(peak and peak / 1e12, '.1f')} TFLOP/s bf16 dense; {steps} steps a side, the first "
          f"{warmup} not timed; bf16 {bf16}, compile {compile_}", flush=True)

    launchers = args.launchers if args.launchers is not None else (["zero2", "fsdp2"] if device == "cuda" else [])
    launched_workloads = LAUNCHED_WORKLOADS if args.launchers is not None else ("mlm",)
    processes = torch.cuda.device_count() if device == "cuda" else 2
    for w in set(args.workloads) & set(launched_workloads) if launchers else ():
        if shapes[w].batch % processes:
            parser.error(f"--launchers: the {w} batch of {shapes[w].batch} does not split over {processes} processes; "
                         f"set --batch {w}=N with N a multiple of {processes}")

    work = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    start = time.perf_counter()
    plans = []
    for w in args.workloads:
        data = prepare_data(w, shapes[w], steps, work)
        sides = [("multissl", None), (PEERS[w], None)]
        sides += [(f"multissl-{name}", name) for name in launchers if w in launched_workloads]
        sides = [(side, launcher) for side, launcher in sides if not args.sides or side in args.sides]
        for side, launcher in sides:
            plans.append({"workload": w, "side": side, "shape": asdict(shapes[w]), "data": data, "steps": steps,
                          "warmup": warmup, "log_every": log_every, "device": device, "bf16": bf16,
                          "compile": compile_, "threads": args.threads or None, "launcher": launcher,
                          "processes": processes if launcher else 1})
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        outcomes = list(pool.map(lambda p: run_side(p, work, args.timeout), plans))
    by_workload: dict[str, dict[str, dict[str, Any]]] = {}
    for plan, outcome in zip(plans, outcomes):
        by_workload.setdefault(plan["workload"], {})[plan["side"]] = outcome
    results = {w: summarise(w, sides, peak) for w, sides in by_workload.items()}
    report = {"device": name, "peak_flops": peak, "smoke": args.smoke, "steps": steps, "warmup": warmup,
              "bf16": bf16, "compile": compile_, "shapes": {w: asdict(shapes[w]) for w in args.workloads},
              "wall_s": time.perf_counter() - start, "workloads": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1), encoding="utf-8")
    print()
    print(table(results))
    for w, r in results.items():
        counted = r["sides"].get("multissl", {}).get("counted_flops_per_unit")
        if not r["flops_per_unit"]:
            continue
        check = ""
        if w in ("mlm", "clm") and counted:
            cpu = " (on CPU without the fused SDPA kernel's, which it has no formula for)" if device == "cpu" else ""
            check = f"; FlopCounterMode counts {counted / 1e9:.4g}{cpu}"
        print(f"{w}: {r['flops_per_unit'] / 1e9:.4g} GFLOP per {UNIT_NAMES[r['unit']]} ({r['flops_source']}{check})")
    print(f"\n{time.perf_counter() - start:.0f} s in all; written to {out}")
    if args.keep:
        print(f"work folder: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    if any("error" in s for r in results.values() for s in r["sides"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
