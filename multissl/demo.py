"""``multissl demo``: the tiny presets on the embedded data, a results table, and what pretraining
bought on a text, a speech and an image task (the lift reports)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from multissl.registry import find

# recipe -> (its accuracy metric, the unit its speed is reported in)
DEMO_RECIPES: dict[str, tuple[str, str]] = {
    "mlm": ("masked_accuracy", "tokens"),
    "clm": ("next_token_accuracy", "tokens"),
    "wav2vec2": ("contrastive_accuracy", "audio_seconds"),
    "clip": ("zero_shot_top1", "samples"),
    "simclr": ("contrastive_accuracy", "samples"),
    "mae": ("", "samples"),  # no accuracy of its own: its probe line says what it learned
}
DEMO_DATA = {"mlm": "text corpus", "clm": "text corpus", "wav2vec2": "speech corpus", "clip": "shapes images",
             "simclr": "MNIST digits", "mae": "MNIST digits"}


# pretraining recipe -> the fine-tuning task its demo lift report runs
DEMO_LIFT = {"mlm": "text-classification", "wav2vec2": "audio-classification", "simclr": "image-classification"}
DEMO_LIFT_FRACTIONS = [0.1, 1.0]
DEMO_LIFT_ARGS = {"image-classification": ["trainer.max_steps=100"]}
"""Shorter than the task's preset, to keep ``make demo`` near 15 minutes on 2 cores."""
DEMO_PRETRAIN_STEPS = {"clm": 150, "mae": 150}
"""Recipes the demo runs for fewer steps than their preset, to keep it near 15 minutes on 2 cores: the
CLM preset's 1,000 steps take about 7 minutes and the demo lifts only the MLM model on text; MAE
has no lift report in the demo, and half its preset already shows the held-out loss falling."""


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
                args = [f"trainer.max_steps={steps}"] if steps else DEMO_LIFT_ARGS.get(DEMO_LIFT[name], [])
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
        recipe = find("pretrain", name)
        args = [f"trainer.output_dir={Path(output_dir) / name}"]
        max_steps = steps or DEMO_PRETRAIN_STEPS.get(name)
        if max_steps:
            args.append(f"trainer.max_steps={max_steps}")
        shortened = "" if steps or not max_steps else f", {max_steps} steps"
        print(f"\n== {name}: tiny preset{shortened} on the embedded {DEMO_DATA[name]} ==", flush=True)
        result = recipe.main(args)
        history = result.history
        speeds = sorted(r[f"throughput/{unit}_per_s"] for r in history if f"throughput/{unit}_per_s" in r)
        first_eval = next((r for r in history if "eval/loss" in r), {})
        final = result.final_metrics
        results.append({
            "recipe": name,
            "eval loss before": first_eval.get("eval/contrastive_loss", first_eval.get("eval/loss")),
            "eval loss after": final.get("contrastive_loss", final.get("loss")),
            "accuracy before": first_eval.get(f"eval/{accuracy}") if accuracy else None,
            "accuracy after": final.get(accuracy) if accuracy else None,
            "speed": f"{speeds[len(speeds) // 2]:,.0f} {unit.replace('_', '-')}/s" if speeds else None,
            "output": str(Path(output_dir) / name / "model"),
            "samples": final.get("samples"),
            "perplexity": final.get("perplexity", final.get("codevector_perplexity")),
            "retrieval": final.get("image_to_text_R@1"),
            "retrieval_chance": final.get("retrieval_chance"),
            "probe": next(({k: r[k] for k in r if k.startswith("probe/")} for r in reversed(history)
                           if "probe/linear_acc" in r), None),
        })
    return results


def print_results(results: list[dict[str, Any]]) -> None:
    cols = ["recipe", "eval loss before", "eval loss after", "accuracy before", "accuracy after", "perplexity", "speed"]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) and v < 1000 else (f"{v:.0f}" if isinstance(v, float) else ("-" if v is None else str(v)))  # noqa: E731
    table = [cols] + [[fmt(r[c]) for c in cols] for r in results]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    print("\nResults on the held-out split (before = at initialisation). Accuracy: masked token (mlm), next token "
          "(clm),\npositive frame ranked first among distractors (wav2vec2), zero-shot top-1 over 36 classes (clip), "
          "the other view\nranked first among 2 x batch - 2 (simclr); mae's loss is on the hidden patches' "
          "normalised pixels. Perplexity: of the\ntokens (mlm, clm), of the codebook use (wav2vec2: high = healthy, ~2 = collapsed).")
    for i, row in enumerate(table):
        print("  " + "  ".join(v.rjust(w) for v, w in zip(row, widths)))
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))
    for r in results:
        loader = {"clip": "open_clip's create_model_and_transforms('local-dir:...')",
                  "simclr": "timm.create_model('local-dir:...', pretrained=True)",
                  "mae": "transformers' AutoModel or pipeline('image-feature-extraction')"}.get(r["recipe"], "transformers' from_pretrained")
        print(f"  {r['recipe']} model: {r['output']}  (loads with {loader})")
        if r.get("probe"):
            p = r["probe"]
            print(f"    frozen features on held-out digits: linear probe {p['probe/linear_acc']:.3f}, "
                  f"kNN {p['probe/knn_acc']:.3f} (chance {p['probe/chance']:.3f})")
        if r.get("retrieval") is not None:
            print(f"    held-out image->text R@1 {r['retrieval']:.3f} (chance {r['retrieval_chance']:.4f})")
        for s in r.get("samples") or []:
            print(f"    sample: {s!r}")
