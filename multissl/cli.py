"""``multissl pretrain RECIPE ...``, ``finetune TASK ...``, ``lift TASK ...``, ``probe``, ``push``, ``demo``.

Errors caused by input (config, data, paths) print as one line and exit with status 2; an
interrupted run exits with 130 after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from multissl.errors import ConfigError, MultiSSLError, TrainingInterrupted
from multissl.probe import TASKS, ProbeConfig, probe_output


def quiet_libraries() -> None:
    """Keep the console for our progress bar and results, not library chatter."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    # accelerate warns on every checkpoint that tied weights are stored once; that is intended
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    quiet_hub()


def quiet_hub() -> None:
    """huggingface_hub's notes ("no files have been modified", ...): multissl says what a push did."""
    import huggingface_hub.utils.logging as hub_logging

    hub_logging.set_verbosity_error()


def launched_rank() -> int:
    """This process's rank under torchrun or ``accelerate launch`` (0 when started alone). A config
    error is the same on every process (each reads the same config), so only rank 0 prints it;
    errors that can be one process's own (its data, its disk) are printed by whoever meets them."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def say_error(line: str) -> None:
    """Write ``line`` and its newline to stderr in one write: under torchrun every process may print
    the same refusal into one pipe, and ``print`` (two writes when stderr is unbuffered, as with
    PYTHONUNBUFFERED=1) let one process's line land inside another's."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def run_recipe(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Run a recipe's main with one-line errors; exit codes: 0 ok, 2 bad input, 130 interrupted."""
    quiet_libraries()
    try:
        main(argv)
    except TrainingInterrupted as err:
        say_error(f"multissl: {err}")
        leave_process_group(130)
        sys.exit(130)
    except KeyboardInterrupt:  # before training started (data preparation): nothing to save yet
        say_error("multissl: interrupted")
        sys.exit(130)
    except MultiSSLError as err:
        if not (isinstance(err, ConfigError) and launched_rank() > 0):
            say_error(f"multissl: error: {err}")
        leave_process_group(2)
        sys.exit(2)
    leave_process_group(0)
    return 0


def leave_process_group(status: int) -> None:
    """Under torchrun, after a finished run or an error every process agreed on (an interrupt, an
    output folder in use), exit with ``status`` without interpreter finalisation. With torch 2.11's
    gloo backend a process that has saved everything still aborts now and then on its way out
    ("terminate called without an active exception", exit -6 instead of our status; a gloo thread
    outlives its owner, pytorch/pytorch#179291), in ``destroy_process_group`` itself as well as at
    interpreter shutdown (CI saw both). Everything a run writes is closed by then (the trainer ends
    its trackers and every collective has returned), so output is flushed and the process leaves
    with ``os._exit``, which runs no C++ destructor. Outside torchrun (a group a caller opened in
    this process) the group is closed and the interpreter left alone."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    if "TORCHELASTIC_RUN_ID" in os.environ:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    if status == 0:
        gc.collect()  # DDP holds reference cycles: drop its reducers before their group goes
    with contextlib.suppress(Exception):  # the caller is finishing anyway: its status is what matters
        dist.destroy_process_group()


def push(ns: argparse.Namespace) -> int:
    """``multissl push``: refused while a run in another process still writes the folder (a push at the
    end of training, ``hub.push=true``, runs in the run's own process through the callback)."""
    from multissl.hub import push_to_hub
    from multissl.run_lock import refuse_if_in_use

    folder = Path(ns.output_dir).expanduser()
    for claimed in (folder,) if (folder / "model").is_dir() else (folder, folder.parent):  # a model folder: its run
        refuse_if_in_use(claimed, "wait for it to finish, then push")
    result = push_to_hub(ns.output_dir, ns.repo_id, private=ns.private, revision=ns.revision,
                         commit_message=ns.commit_message, token=ns.token, exist_ok=ns.exist_ok,
                         prune=not ns.keep_old_files)
    if result.changed:
        print(f"pushed {len(result.files)} files to {result.url} (branch {result.revision}, commit {result.commit})")
        if result.deleted:
            print(f"removed files an earlier push left that this model no longer has: {', '.join(result.deleted)}")
    else:
        print(f"{result.url} (branch {result.revision}) already holds these files: nothing uploaded, no new commit")
    return 0


def add_probe_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``multissl probe OUTPUT_DIR [options]`` to an argparse sub-parser set (see `run_probe_command`)."""
    d = ProbeConfig()
    p = subparsers.add_parser(
        "probe", help="linear and kNN probes of a trained model's frozen features",
        description="Freeze a trained model, mean-pool one feature vector per example, fit a linear and a kNN "
        "classifier on the training examples and report their accuracy on held-out ones, beside chance.")
    p.add_argument("output_dir", help="a run's output_dir (with model/), or a model folder")
    p.add_argument("--task", choices=TASKS, default="",
                   help="default: the model's embedded task (text-topics, keywords or shapes; digits for image backbones), or files with --files")
    p.add_argument("--files", nargs="+", default=[], help="labelled .csv/.tsv/.jsonl/.parquet files (task files)")
    p.add_argument("--eval-files", nargs="+", default=[], help="eval examples (default: hold out 20%% of --files)")
    p.add_argument("--text-column", default=d.text_column)
    p.add_argument("--label-column", default=d.label_column)
    p.add_argument("--path-column", default=d.path_column, help="audio/image manifests: the file path column")
    for name in ("max_train", "max_eval", "batch_size", "knn_k", "linear_epochs", "seed"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    p.add_argument("--knn-extra-k", type=int, nargs="*", default=d.knn_extra_k, metavar="K",
                   help="more neighbour counts to report (default: %(default)s; none: --knn-extra-k)")
    p.add_argument("--linear-weight-decay", type=float, default=d.linear_weight_decay)
    p.add_argument("--max-seconds", type=float, default=d.max_seconds, help="audio: cut longer files to this")
    p.add_argument("--device", default="", help="default: cuda when available, else cpu")
    p.add_argument("--json", default="", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--random-init", type=int, default=None, metavar="SEED",
                   help="probe the same architecture (and tokenizer or image processor) with the fresh weights a new "
                   "model gets under SEED instead of the saved ones: the baseline to read a pretrained probe against")
    return p


def _config_from_args(ns: argparse.Namespace) -> ProbeConfig:
    task = ns.task or ("files" if ns.files else "")
    return ProbeConfig(
        task=task, files=list(ns.files), eval_files=list(ns.eval_files), text_column=ns.text_column,
        label_column=ns.label_column, path_column=ns.path_column, max_train=ns.max_train, max_eval=ns.max_eval,
        batch_size=ns.batch_size, knn_k=ns.knn_k, knn_extra_k=list(ns.knn_extra_k), linear_epochs=ns.linear_epochs,
        linear_weight_decay=ns.linear_weight_decay, max_seconds=ns.max_seconds, seed=ns.seed)


def format_probe_table(result: dict[str, Any], cfg: ProbeConfig) -> str:
    """The results as a short two-column table."""
    k = min(cfg.knn_k, result["train_examples"])
    rows = [
        ("model", f"{result['model']} ({result['modality']})"),
        ("task", result["task"]),
        ("examples", f"{result['train_examples']} train / {result['eval_examples']} eval"),
        ("classes", str(result["classes"])),
        ("linear accuracy", f"{result['linear_acc']:.3f}"),
        (f"kNN accuracy (k={k})", f"{result['knn_acc']:.3f}"),
        *[(f"kNN accuracy (k={min(extra, result['train_examples'])})", f"{result[f'knn{extra}_acc']:.3f}")
          for extra in cfg.knn_extra_k if f"knn{extra}_acc" in result],
        ("chance", f"{result['chance']:.3f} (majority class)"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name.ljust(width)}  {value}" for name, value in rows)


def run_probe_command(ns: argparse.Namespace) -> int:
    """``multissl probe``: print the results table (and write JSON when asked); returns 0. Input errors
    are raised as `multissl.errors.MultiSSLError` for the CLI to print as one line."""
    cfg = _config_from_args(ns)
    result = probe_output(ns.output_dir, cfg, device=ns.device or None, random_init=ns.random_init)
    weights = "" if ns.random_init is None else f" at random init (seed {ns.random_init}: its architecture, fresh weights)"
    print(f"frozen-feature probe of {result['model']}{weights}")
    print(format_probe_table(result, cfg), flush=True)
    if ns.json:
        from multissl.config import to_dict

        out = Path(ns.json).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**result, "config": to_dict(cfg)}, indent=2) + "\n")
    return 0


def list_recipes() -> int:
    """``multissl recipes``: every installed recipe and task, with its shipped configs and package."""
    from multissl.registry import available

    for kind in ("pretrain", "finetune"):
        for name, recipe in available(kind).items():
            configs = ", ".join(recipe.configs()) or "no shipped configs"
            origin = "" if recipe.source == "multissl" else f"  (from {recipe.source})"
            print(f"{kind} {name}: {configs}{origin}")
    return 0


def _number_list(kind: type) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="multissl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="run a pretraining recipe", add_help=False)
    p.add_argument("recipe")
    p.add_argument("args", nargs=argparse.REMAINDER, help="[--config FILE] [key=value ...]")
    f = sub.add_parser("finetune", help="fine-tune a pretrained output on a labelled task", add_help=False)
    f.add_argument("task")
    f.add_argument("args", nargs=argparse.REMAINDER, help="[--config FILE] [model.init_from=OUTPUT_DIR] [key=value ...]")
    lift = sub.add_parser("lift", help="what pretraining buys: fine-tune from the pretrained output and from random "
                          "weights at several label fractions; writes lift.md, lift.png and lift.json",
                          description="For each label fraction and seed, fine-tune TASK (a) from PRETRAINED and (b) "
                          "from the same architecture with random weights, with the same steps and settings; report "
                          "the held-out headline metric of both as a Markdown table and a plot. Other arguments "
                          "([--config FILE] [key=value ...]) go to every run.")
    lift.add_argument("task")
    lift.add_argument("--pretrained", required=True, help="a pretraining run's output_dir, a model folder, or a Hub id")
    lift.add_argument("--fractions", type=_number_list(float), default=[0.1, 1.0],
                      help="shares of the training labels, comma-separated (default 0.1,1)")
    lift.add_argument("--seeds", type=_number_list(int), default=[0], help="comma-separated (default 0)")
    lift.add_argument("--output-dir", default=None, help="default: outputs/lift-TASK")
    add_probe_parser(sub)
    from multissl.demo import DEMO_RECIPES

    d = sub.add_parser("demo", help="tiny runs of each recipe on the embedded data, then a results table")
    d.add_argument("--output-dir", default="outputs/demo")
    d.add_argument("--steps", type=int, default=None, help="override each preset's max_steps")
    d.add_argument("--recipes", nargs="+", choices=list(DEMO_RECIPES), default=None, help="a subset of the recipes")
    d.add_argument("--no-lift", action="store_true", help="skip the fine-tuning lift reports")
    sub.add_parser("recipes", help="list the recipes and their shipped configs")
    h = sub.add_parser("push", help="upload a trained model with its card to the Hugging Face Hub",
                       description="Upload a run's final model (its model/ folder: weights, config, tokenizer or "
                       "feature extractor, model card) with the resolved training config and a metrics summary. "
                       "Checkpoints, optimizer states and TensorBoard logs are never uploaded.")
    h.add_argument("output_dir", help="a run's output_dir, or its model folder")
    h.add_argument("--repo-id", required=True, help="NAME or NAMESPACE/NAME")
    h.add_argument("--private", action="store_true", help="create the repo private")
    h.add_argument("--revision", default="", help="branch to push to (created from main when missing)")
    h.add_argument("--commit-message", default="")
    h.add_argument("--token", default=None, help="default: HF_TOKEN, else the token saved by `hf auth login`")
    h.add_argument("--exist-ok", action="store_true", help="add a commit to the repo when it already exists")
    h.add_argument("--keep-old-files", action="store_true",
                   help="keep weights/configs an earlier push left that this model no longer has (default: remove them)")
    ns, extra = parser.parse_known_args(argv)
    if ns.command == "lift":  # key=value overrides (and --config FILE) for every run, anywhere after the task
        ns.args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")

    if ns.command == "push":  # a push needs none of the training libraries
        quiet_hub()
    else:
        quiet_libraries()
    try:
        if ns.command in ("pretrain", "finetune"):
            from multissl.registry import find

            return run_recipe(find(ns.command, ns.recipe if ns.command == "pretrain" else ns.task).main, ns.args)
        if ns.command == "lift":
            from multissl.lift import print_table, run_lift

            out = ns.output_dir or f"outputs/lift-{ns.task}"
            report = run_lift(ns.task, ns.pretrained, out, ns.fractions, ns.seeds, ns.args)
            print_table(report)
            print(f"\nreport: {Path(out) / 'lift.md'} (plot: {Path(out) / 'lift.png'})")
            return 0
        if ns.command == "probe":
            return run_probe_command(ns)
        if ns.command == "demo":
            from multissl.demo import demo
            from multissl.run_lock import claim

            with claim(ns.output_dir, "--output-dir"):  # each recipe's trainer also locks its own folder
                demo(ns.output_dir, ns.steps, ns.recipes, lift=not ns.no_lift)
            return 0
        if ns.command == "push":
            return push(ns)
        return list_recipes()
    except TrainingInterrupted as err:
        say_error(f"multissl: {err}")
        return 130
    except MultiSSLError as err:
        say_error(f"multissl: error: {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
