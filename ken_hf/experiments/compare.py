"""KEN against PEFT (LoRA) and simple sparse baselines, on one task and one training budget.

For each seed: one full fine-tune, from which KEN and the sparse baselines select
subnetworks at several k (all stored in the KEN subnetwork format); and LoRA fine-tunes at
several ranks. Every row's metric is computed on the model rebuilt from the files that row
saved, so the table reports what a user who loads those files gets.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm

from ..config import KENConfig, module_name
from ..modeling import AutoKENModelForSequenceClassification
from ..selection import RULES
from ..storage.checkpoints import new_parameters
from ..storage.delta_codec import compress
from ..storage.subnetwork_file import SUBNETWORK_NAME
from ..subnetwork import KENSubnetwork
from ..utils.atomic_files import write_text_atomic
from .finetune import (
    build_trainer,
    load_splits,
    load_tokenizer,
    model_label,
    model_source,
    new_classifier,
)
from .run_settings import CompareSettings, FineTuneSettings

RULE_LABELS = {
    "ken": "KEN",
    "ken_delta": "KEN on the change (variant)",
    "largest_delta": "largest abs(change)",
    "random": "random",
}


def run_comparison(settings: CompareSettings) -> dict:
    """Run every method on every seed; write ``results.json``, ``results.md`` and
    ``results.png`` into ``settings.task.output_dir``; return the JSON's content."""
    for rule in settings.rules:
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}; choose from {', '.join(RULES)}")
    out = Path(settings.task.output_dir)
    rows: list[dict] = []
    start = time.perf_counter()
    for seed in settings.seeds:
        task = dataclasses.replace(settings.task, seed=seed, output_dir=str(out / f"seed{seed}"))
        rows += _run_seed(settings, task)
        # Written after every seed: a long comparison cut short keeps the seeds it finished.
        results = {
            "settings": dataclasses.asdict(settings),
            "model": model_source(settings.task),
            "model_label": model_label(settings.task),
            "machine": _machine(),
            "seconds": time.perf_counter() - start,
            "runs": rows,
            "summary": summarise(rows, settings.task.metric),
        }
        write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
        write_text_atomic(out / "results.md", markdown_table(results))
        plot(results, out / "results.png")
    return results


def _run_seed(settings: CompareSettings, task: FineTuneSettings) -> list[dict]:
    tokenizer = load_tokenizer(task)
    train, held_out = load_splits(task, tokenizer)
    folder = Path(task.output_dir)
    metric = f"eval_{task.metric}"

    def evaluate(model: torch.nn.Module) -> float:
        trainer = build_trainer(task, model, tokenizer, train, held_out, output_dir=folder)
        return trainer.evaluate()[metric]

    # 1. The full fine-tune, the source of every sparse subnetwork.
    model = new_classifier(task, tokenizer)
    pretrained = {name: p.detach().clone() for name, p in model.named_parameters()}
    new_tensors = new_parameters(model, model_source(task))
    seconds = _train(build_trainer(task, model, tokenizer, train, held_out, output_dir=folder))
    full_folder = folder / "full"
    model.save_pretrained(full_folder)
    total = sum(p.numel() for p in model.parameters())
    full_file = full_folder / "model.safetensors"
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(full_folder)
    rows = [
        _row(task, "full", "full fine-tune", evaluate(reloaded), [full_file], total, total, seconds)
    ]
    print(f"seed {task.seed}: full fine-tune {rows[0]['metric']:.4f}")

    # 2., 4., 5. Sparse subnetworks of that fine-tune, every rule at every k.
    budgets = [("keep_ratio", ratio, f"keep {ratio:.0%}") for ratio in settings.keep_ratios]
    if settings.paper_k is not None:
        budgets.append(("k", settings.paper_k, f"k={settings.paper_k}"))
    jobs = [(rule, budget) for rule in settings.rules for budget in budgets]
    for rule, (kind, amount, budget_label) in tqdm(jobs, desc=f"seed {task.seed} subnetworks"):
        config = KENConfig(
            **{kind: amount},
            rule=rule,
            seed=task.seed,
            base_model_name_or_path=model_source(task),
        )
        begin = time.perf_counter()
        subnetwork = KENSubnetwork.from_weights(
            pretrained, model, config, new_tensors=new_tensors, progress=False
        )
        prune_seconds = time.perf_counter() - begin
        where = folder / f"{rule}-{budget_label.replace(' ', '').replace('%', 'pct')}"
        subnetwork.save_pretrained(where)
        value = evaluate(AutoKENModelForSequenceClassification.from_pretrained(where))
        row = _row(
            task,
            rule,
            f"{RULE_LABELS[rule]} {budget_label}",
            value,
            [where / SUBNETWORK_NAME],
            total,
            subnetwork.kept_values(),
            seconds,
            prune_seconds,
        )
        rows.append(row)
        tqdm.write(f"seed {task.seed}: {row['label']} {value:.4f}")

    # 3. LoRA at each rank, the new head trained whole.
    heads = sorted({module_name(name) for name in new_tensors})
    for rank in settings.lora_ranks:
        rows.append(_run_lora(task, tokenizer, train, held_out, rank, heads, settings, evaluate))
        print(f"seed {task.seed}: {rows[-1]['label']} {rows[-1]['metric']:.4f}")
    return rows


def _run_lora(task, tokenizer, train, held_out, rank, heads, settings, evaluate) -> dict:
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model

    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=rank,
        lora_alpha=2 * rank,
        target_modules="all-linear",
        modules_to_save=heads,
    )
    model = get_peft_model(new_classifier(task, tokenizer), lora)
    trainable, total = model.get_nb_trainable_parameters()
    folder = Path(task.output_dir) / f"lora-r{rank}"
    trainer = build_trainer(
        task,
        model,
        tokenizer,
        train,
        held_out,
        learning_rate=settings.lora_learning_rate,
        output_dir=folder,
    )
    seconds = _train(trainer)
    model.save_pretrained(folder)
    reloaded = PeftModel.from_pretrained(new_classifier(task, tokenizer), folder)
    files = [folder / "adapter_model.safetensors"]
    return _row(task, "lora", f"LoRA r={rank}", evaluate(reloaded), files, trainable, None, seconds)


def _train(trainer: transformers.Trainer) -> float:
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def _row(
    task: FineTuneSettings,
    method: str,
    label: str,
    metric: float,
    files: list[Path],
    trainable: int,
    kept: int | None,
    train_seconds: float,
    prune_seconds: float = 0.0,
) -> dict:
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{label}: expected file(s) {missing} were not written")
    return {
        "seed": task.seed,
        "method": method,
        "label": label,
        "metric": metric,
        "files": [str(f) for f in files],
        "bytes": sum(f.stat().st_size for f in files),
        # zstd-compressed as well, so that no method is measured uncompressed against
        # KEN's compressed subnetwork file.
        "zstd_bytes": sum(len(compress(f.read_bytes())) for f in files),
        "trainable_parameters": trainable,
        "kept_values": kept,
        "train_seconds": train_seconds,
        "prune_seconds": prune_seconds,
    }


def summarise(rows: list[dict], metric: str) -> list[dict]:
    """One entry per label, in first-seen order: metric mean and sample standard deviation
    over seeds (None with one seed), mean bytes (as stored and zstd-compressed), percent of
    the full fine-tune's file."""
    labels = list(dict.fromkeys(row["label"] for row in rows))
    full_bytes = statistics.mean(r["bytes"] for r in rows if r["method"] == "full")
    summary = []
    for label in labels:
        group = [r for r in rows if r["label"] == label]
        values = [r["metric"] for r in group]
        stored = statistics.mean(r["bytes"] for r in group)
        kept = [r["kept_values"] for r in group if r["kept_values"] is not None]
        summary.append(
            {
                "label": label,
                "method": group[0]["method"],
                "metric": metric,
                "mean": statistics.mean(values),
                "std": statistics.stdev(values) if len(values) > 1 else None,
                "seeds": len(values),
                "bytes": stored,
                "zstd_bytes": statistics.mean(r["zstd_bytes"] for r in group),
                "percent_of_full": 100 * stored / full_bytes,
                "trainable_parameters": group[0]["trainable_parameters"],
                "kept_values": statistics.mean(kept) if kept else None,
                "train_seconds": statistics.mean(r["train_seconds"] for r in group),
                "prune_seconds": statistics.mean(r["prune_seconds"] for r in group),
            }
        )
    return summary


def markdown_table(results: dict) -> str:
    """The summary as a markdown table, with the settings it came from."""
    settings = results["settings"]["task"]
    lines = [
        f"Model {results['model_label']} (`{results['model']}`), data `{settings['dataset']}` "
        f"({settings['train_size']} train / {settings['eval_size']} held out), "
        f"{settings['epochs']:g} epochs, seeds {sorted({r['seed'] for r in results['runs']})}; "
        f"{results['machine']['cpus']} CPUs, torch {results['machine']['torch']}.",
        "",
        f"| method | {results['summary'][0]['metric']} (mean ± sd) | stored | zstd-compressed "
        "| % of full | trainable params | values kept | training s | pruning s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in results["summary"]:
        spread = f" ± {entry['std']:.4f}" if entry["std"] is not None else ""
        kept = f"{entry['kept_values']:,.0f}" if entry["kept_values"] is not None else "-"
        lines.append(
            f"| {entry['label']} | {entry['mean']:.4f}{spread} | {_size(entry['bytes'])} "
            f"| {_size(entry['zstd_bytes'])} | {entry['percent_of_full']:.1f} "
            f"| {entry['trainable_parameters']:,} | {kept} "
            f"| {entry['train_seconds']:.0f} | {entry['prune_seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Metric against bytes stored, zstd-compressed (log scale), error bars of one standard
    deviation; every point carries a number, spread apart where points crowd, and the key
    beside the plot names each one with its metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"full": "black", "lora": "tab:purple", "ken": "tab:blue"}
    colours.update({"ken_delta": "tab:cyan", "largest_delta": "tab:green", "random": "tab:gray"})
    figure, (axes, key) = plt.subplots(
        1, 2, figsize=(13, 7), gridspec_kw={"width_ratios": [2.2, 1]}
    )
    summary = results["summary"]
    low = min(e["mean"] - (e["std"] or 0.0) for e in summary)
    high = max(e["mean"] + (e["std"] or 0.0) for e in summary)
    heights = _label_heights(summary, gap=(high - low) * 0.025 or 0.01)
    lines = []
    for number, (entry, label_y) in enumerate(zip(summary, heights, strict=True), start=1):
        colour = colours[entry["method"]]
        axes.errorbar(
            entry["zstd_bytes"], entry["mean"], yerr=entry["std"] or 0.0, fmt="o", color=colour,
            capsize=3, alpha=0.8,
        )  # fmt: skip
        axes.annotate(
            str(number),
            (entry["zstd_bytes"], entry["mean"]),
            xytext=(entry["zstd_bytes"] * 1.1, label_y),
            fontsize=8,
            color=colour,
            va="center",
            arrowprops={"arrowstyle": "-", "color": colour, "lw": 0.5},
        )
        spread = f" ± {entry['std']:.4f}" if entry["std"] is not None else ""
        lines.append((f"{number:>2}  {entry['label']}: {entry['mean']:.4f}{spread}", colour))
    for row, (text, colour) in enumerate(lines):
        key.text(0, 1 - row / max(len(lines), 24), text, color=colour, fontsize=8, va="top",
                 family="monospace", transform=key.transAxes)  # fmt: skip
    key.axis("off")
    axes.set_xscale("log")
    axes.set_xlim(right=max(e["zstd_bytes"] for e in summary) * 1.6)
    axes.set_xlabel("bytes stored, zstd-compressed (log scale)")
    axes.set_ylabel(f"held-out {results['summary'][0]['metric']}")
    with_lora = any(e["method"] == "lora" for e in summary)
    compared = "sparse baselines and LoRA" if with_lora else "sparse baselines"
    axes.set_title(f"{results['model_label']}: KEN, {compared}")
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    temporary = path.with_suffix(".tmp.png")
    figure.savefig(temporary, dpi=120)
    plt.close(figure)
    os.replace(temporary, path)


def _label_heights(summary: list[dict], gap: float) -> list[float]:
    """Label heights near each point, at least ``gap`` apart among points whose bytes are
    within a factor of 1.5 (their labels would overlap): points sharing a k share bytes."""
    heights: dict[int, float] = {}
    for index in sorted(range(len(summary)), key=lambda i: summary[i]["mean"]):
        x, y = math.log10(summary[index]["zstd_bytes"]), summary[index]["mean"]
        near = [
            h for i, h in heights.items() if abs(math.log10(summary[i]["zstd_bytes"]) - x) < 0.18
        ]
        for taken in sorted(near):
            if abs(taken - y) < gap:
                y = taken + gap
        heights[index] = y
    return [heights[i] for i in range(len(summary))]


def _size(count: float) -> str:
    return f"{count / 2**20:.2f} MiB"


def _machine() -> dict:
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
