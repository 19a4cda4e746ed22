"""The paper's claim, measured on the demo task: accuracy after KEN against the share of
parameters reset, for keep ratios 10 % to 90 % of each row, mean and spread over seeds,
with the full fine-tune as the reference. A measurement, not a target.

Task: all-MiniLM-L6-v2 fine-tuned on 4,000 Rotten Tomatoes snippets (2 epochs), 2,000
held out, exactly as ``ken demo``. Two variants of KEN per ratio:

- ``ken-hf``: exact k per row, the newly initialised classifier stored whole;
- ``published``: the published code's behaviour: compatibility mode (value-based keeping,
  kept zeros reset) and the classifier weight pruned against its random initialisation
  like every other tensor (only the classifier bias, the state dict's last entry, kept).

Writes benchmarks/results/bench_claim.json, and the picture docs/images/bench_claim.png
(shown by the docs' page on the paper's claim).

    python benchmarks/bench_claim.py [--seeds 0 1 2] [--train-size 4000] [--epochs 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from ken_hf import KENConfig, prune_model
from ken_hf.experiments.demo import fine_tune_with_ken
from ken_hf.experiments.run_settings import DemoSettings
from ken_hf.storage.checkpoints import new_parameters

RESULTS = Path(__file__).resolve().parent / "results"
RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


class Snapshot(TrainerCallback):
    """Keeps the model's parameters as they are when training begins (pre-trained values,
    and the random initialisation of the new head)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.pretrained = {n: p.detach().clone() for n, p in model.named_parameters()}


def run_seed(seed: int, settings: DemoSettings) -> dict:
    settings = DemoSettings(
        **{**settings.__dict__, "seed": seed, "output_dir": f"runs/claim-{seed}"}
    )
    snapshot = Snapshot()
    trainer, seconds = fine_tune_with_ken(settings, snapshot)
    model = trainer.model
    finetuned = {n: p.detach().clone() for n, p in model.named_parameters()}
    full = trainer.evaluate()["eval_accuracy"]
    new = new_parameters(model, model.name_or_path)
    total = sum(p.numel() for p in finetuned.values())
    rows = []
    for ratio in RATIOS:
        row = {"keep_ratio": ratio}
        for variant, config, new_tensors in (
            ("ken-hf", KENConfig(keep_ratio=ratio), new),
            (
                "published",
                KENConfig(keep_ratio=ratio, compat=True, modules_to_save=["classifier.bias"]),
                set(),
            ),
        ):
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    parameter.copy_(finetuned[name])
            subnetwork = prune_model(
                model, snapshot.pretrained, config, new_tensors=new_tensors, progress=False
            )
            row[variant] = trainer.evaluate()["eval_accuracy"]
            row[f"{variant}_reset"] = subnetwork.reset_fraction(total)
        rows.append(row)
        print(
            f"seed {seed} keep {ratio:.1f}: ken-hf {row['ken-hf']:.4f} "
            f"(reset {row['ken-hf_reset']:.1%}), published {row['published']:.4f} "
            f"(reset {row['published_reset']:.1%}), full {full:.4f}",
            flush=True,
        )
    return {"seed": seed, "full": full, "train_seconds": seconds, "ratios": rows}


def summarise(runs: list[dict]) -> list[dict]:
    def spread(values):
        return statistics.stdev(values) if len(values) > 1 else 0.0

    table = []
    for i, ratio in enumerate(RATIOS):
        entry = {"keep_ratio": ratio}
        for variant in ("ken-hf", "published"):
            values = [run["ratios"][i][variant] for run in runs]
            resets = [run["ratios"][i][f"{variant}_reset"] for run in runs]
            entry[variant] = {
                "mean": statistics.mean(values),
                "std": spread(values),
                "reset_mean": statistics.mean(resets),
            }
        table.append(entry)
    fulls = [run["full"] for run in runs]
    return [{"full": {"mean": statistics.mean(fulls), "std": spread(fulls)}}, *table]


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full, rows = summary[0]["full"], summary[1:]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    styles = {"ken-hf": ("#0072B2", "o", "-"), "published": ("#D55E00", "s", "--")}
    for variant, (colour, marker, line) in styles.items():
        x = [100 * r[variant]["reset_mean"] for r in rows]
        y = [r[variant]["mean"] for r in rows]
        err = [r[variant]["std"] for r in rows]
        axis.errorbar(
            x,
            y,
            yerr=err,
            color=colour,
            marker=marker,
            linestyle=line,
            capsize=3,
            label=f"KEN, {variant}",
        )
    axis.axhline(full["mean"], color="black", linewidth=1, label="full fine-tune")
    axis.axhspan(full["mean"] - full["std"], full["mean"] + full["std"], color="grey", alpha=0.2)
    axis.set_xlabel("parameters reset to pre-trained values (%)")
    axis.set_ylabel("held-out accuracy")
    axis.set_title("all-MiniLM-L6-v2, Rotten Tomatoes snippets: KEN vs full fine-tune")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--eval-size", type=int, default=2000)
    parser.add_argument("--epochs", type=float, default=2.0)
    args = parser.parse_args()
    settings = DemoSettings(
        train_size=args.train_size, eval_size=args.eval_size, epochs=args.epochs
    )
    start = time.perf_counter()
    runs = [run_seed(seed, copy.deepcopy(settings)) for seed in args.seeds]
    summary = summarise(runs)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_claim.json").write_text(
        json.dumps({"settings": settings.__dict__, "runs": runs, "summary": summary}, indent=2)
    )
    plot(summary, RESULTS.parents[1] / "docs" / "images" / "bench_claim.png")
    full = summary[0]["full"]
    print(f"\nfull fine-tune: {full['mean']:.4f} ± {full['std']:.4f} ({len(runs)} seeds)")
    print("| keep | reset (ken-hf) | ken-hf accuracy | reset (published) | published accuracy |")
    print("|---|---|---|---|---|")
    for row in summary[1:]:
        a, b = row["ken-hf"], row["published"]
        print(
            f"| {row['keep_ratio']:.1f} | {a['reset_mean']:.1%} | {a['mean']:.4f} ± {a['std']:.4f} "
            f"| {b['reset_mean']:.1%} | {b['mean']:.4f} ± {b['std']:.4f} |"
        )
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
