"""``multissl pretrain RECIPE ...``, ``finetune TASK ...``, ``lift TASK ...``, ``probe``, ``push``, ``demo``.

Errors caused by input (config, data, paths) print as one line and exit with status 2; an
interrupted run exits with 130 after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from multissl.errors import MultiSSLError, TrainingInterrupted


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


def run_recipe(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Run a recipe's main with one-line errors; exit codes: 0 ok, 2 bad input, 130 interrupted."""
    quiet_libraries()
    try:
        main(argv)
    except TrainingInterrupted as err:
        print(f"multissl: {err}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:  # before training started (data preparation): nothing to save yet
        print("multissl: interrupted", file=sys.stderr)
        sys.exit(130)
    except MultiSSLError as err:
        print(f"multissl: error: {err}", file=sys.stderr)
        sys.exit(2)
    return 0


def _recipe_module(name: str, modules: dict[str, str], what: str) -> Any:
    """``recipes.<module>`` for ``name``, or an error naming the closest known name."""
    if name not in modules:
        import difflib

        close = difflib.get_close_matches(name, modules, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise MultiSSLError(f"unknown {what} {name!r}{hint}; available: {', '.join(modules)}")
    return importlib.import_module(f"recipes.{modules[name]}")


def load_recipe(name: str) -> Any:
    from recipes import RECIPES

    return _recipe_module(name, {r: r for r in RECIPES}, "recipe")


def load_task(name: str) -> Any:
    """The recipe module of a fine-tuning task."""
    from recipes import FINETUNE_TASKS

    return _recipe_module(name, FINETUNE_TASKS, "fine-tuning task")


# recipe -> (its accuracy metric, the unit its speed is reported in)
DEMO_RECIPES: dict[str, tuple[str, str]] = {
    "mlm": ("masked_accuracy", "tokens"),
    "clm": ("next_token_accuracy", "tokens"),
    "wav2vec2": ("contrastive_accuracy", "audio_seconds"),
    "clip": ("zero_shot_top1", "samples"),
}
DEMO_DATA = {"mlm": "text corpus", "clm": "text corpus", "wav2vec2": "speech corpus", "clip": "shapes images"}


# pretraining recipe -> the fine-tuning task its demo lift report runs
DEMO_LIFT = {"mlm": "text-classification", "wav2vec2": "audio-classification"}
DEMO_LIFT_FRACTIONS = [0.1, 1.0]


def demo(output_dir: str, steps: int | None, recipes: list[str] | None = None, lift: bool = True) -> list[dict[str, Any]]:
    """Run the tiny presets on the embedded data, print what they achieved, then what pretraining
    bought on one text and one speech task (the lift reports)."""
    results = demo_pretraining(output_dir, steps, recipes)
    if lift:
        from multissl.lift import print_table, run_lift

        reports = []
        for name in recipes or list(DEMO_RECIPES):
            if name in DEMO_LIFT:
                out = Path(output_dir) / f"lift-{DEMO_LIFT[name]}"
                args = [f"trainer.max_steps={steps}"] if steps else []
                reports.append((run_lift(DEMO_LIFT[name], str(Path(output_dir) / name), out, DEMO_LIFT_FRACTIONS, [0], args),
                                out))
        print_results(results)
        for report, out in reports:
            print_table(report)
            print(f"  report: {out / 'lift.md'}, plot: {out / 'lift.png'}")
    else:
        print_results(results)
    return results


def demo_pretraining(output_dir: str, steps: int | None, recipes: list[str] | None = None) -> list[dict[str, Any]]:
    results = []
    for name in recipes or list(DEMO_RECIPES):
        accuracy, unit = DEMO_RECIPES[name]
        recipe = load_recipe(name)
        args = [f"trainer.output_dir={Path(output_dir) / name}"]
        if steps:
            args.append(f"trainer.max_steps={steps}")
        print(f"\n== {name}: tiny preset on the embedded {DEMO_DATA[name]} ==", flush=True)
        result = recipe.main(args)
        history = result.history
        speeds = sorted(r[f"throughput/{unit}_per_s"] for r in history if f"throughput/{unit}_per_s" in r)
        first_eval = next((r for r in history if "eval/loss" in r), {})
        final = result.final_metrics
        results.append({
            "recipe": name,
            "eval loss before": first_eval.get("eval/contrastive_loss", first_eval.get("eval/loss")),
            "eval loss after": final.get("contrastive_loss", final.get("loss")),
            "accuracy before": first_eval.get(f"eval/{accuracy}"),
            "accuracy after": final.get(accuracy),
            "speed": f"{speeds[len(speeds) // 2]:,.0f} {unit.replace('_', '-')}/s" if speeds else None,
            "output": str(Path(output_dir) / name / "model"),
            "samples": final.get("samples"),
            "perplexity": final.get("perplexity", final.get("codevector_perplexity")),
            "retrieval": final.get("image_to_text_R@1"),
            "retrieval_chance": final.get("retrieval_chance"),
        })
    return results


def print_results(results: list[dict[str, Any]]) -> None:
    cols = ["recipe", "eval loss before", "eval loss after", "accuracy before", "accuracy after", "perplexity", "speed"]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) and v < 1000 else (f"{v:.0f}" if isinstance(v, float) else ("-" if v is None else str(v)))  # noqa: E731
    table = [cols] + [[fmt(r[c]) for c in cols] for r in results]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    print("\nResults on the held-out split (before = at initialisation). Accuracy: masked token (mlm), next token "
          "(clm),\npositive frame ranked first among distractors (wav2vec2), zero-shot top-1 over 36 classes (clip). "
          "Perplexity: of the\ntokens (mlm, clm), of the codebook use (wav2vec2: high = healthy, ~2 = collapsed).")
    for i, row in enumerate(table):
        print("  " + "  ".join(v.rjust(w) for v, w in zip(row, widths)))
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))
    for r in results:
        loader = "open_clip's create_model_and_transforms('local-dir:...')" if r["recipe"] == "clip" else (
            "transformers' from_pretrained")
        print(f"  {r['recipe']} model: {r['output']}  (loads with {loader})")
        if r.get("retrieval") is not None:
            print(f"    held-out image->text R@1 {r['retrieval']:.3f} (chance {r['retrieval_chance']:.4f})")
        for s in r.get("samples") or []:
            print(f"    sample: {s!r}")


def push(ns: argparse.Namespace) -> int:
    from multissl.hub import push_to_hub

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
    from multissl.probe import add_probe_parser

    add_probe_parser(sub)
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
        if ns.command == "pretrain":
            recipe = load_recipe(ns.recipe)
            return run_recipe(recipe.main, ns.args)
        if ns.command == "finetune":
            return run_recipe(load_task(ns.task).main, ns.args)
        if ns.command == "lift":
            from multissl.lift import print_table, run_lift

            out = ns.output_dir or f"outputs/lift-{ns.task}"
            report = run_lift(ns.task, ns.pretrained, out, ns.fractions, ns.seeds, ns.args)
            print_table(report)
            print(f"\nreport: {Path(out) / 'lift.md'} (plot: {Path(out) / 'lift.png'})")
            return 0
        if ns.command == "probe":
            from multissl.probe import run_probe_command

            return run_probe_command(ns)
        if ns.command == "demo":
            demo(ns.output_dir, ns.steps, ns.recipes, lift=not ns.no_lift)
            return 0
        if ns.command == "push":
            return push(ns)
        from recipes import FINETUNE_TASKS, RECIPES

        root = Path(importlib.import_module("recipes").__file__).parent / "configs"
        for name in RECIPES:
            configs = sorted(p.name for p in (root / name).glob("*.yaml"))
            print(f"pretrain {name}: {', '.join(configs)}")
        for task, module in FINETUNE_TASKS.items():
            configs = sorted(p.name for p in (root / module).glob("*.yaml"))
            print(f"finetune {task}: {', '.join(configs)}")
        return 0
    except TrainingInterrupted as err:
        print(f"multissl: {err}", file=sys.stderr)
        return 130
    except MultiSSLError as err:
        print(f"multissl: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
