"""KEN after a custom training loop driven by `accelerate` (no Trainer).

    python recipes/accelerate_loop.py                       # one process (CPU or one GPU)
    python recipes/accelerate_loop.py --train-size 1000 --epochs 2 --keep-ratio 0.25
    accelerate launch --multi_gpu --num_processes 8 recipes/accelerate_loop.py   # 8 GPUs
    # several CPU processes (gloo), on a machine without GPUs or with --cpu:
    OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 recipes/accelerate_loop.py
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 recipes/accelerate_loop.py --cpu

(`accelerate launch --cpu --num_processes 2` starts one process only, and `Accelerator()`
without `cpu=True` on a machine without GPUs sees each of several launched processes as
alone: this recipe passes `cpu=True` there, and stops if the launcher started several
processes that the accelerator does not see.)

Fine-tunes the packaged all-MiniLM-L6-v2 with a new two-label head on the packaged Rotten
Tomatoes snippets in a plain PyTorch loop (`Accelerator.prepare` for the model, optimizer
and data loader; `accelerator.backward`), then every process waits for the others, the model
is unwrapped (`accelerator.unwrap_model`: DDP's wrapper off), and the main process alone:

1. loads the pre-trained base (`from_pretrained` of the same folder, a fresh head),
2. prunes the fine-tune in place with `prune_model(model, base, KENConfig(keep_ratio=...))`
   (the new head, which the base checkpoint lacks, is stored whole),
3. evaluates held-out accuracy before and after KEN,
4. saves the subnetwork with the tokenizer into `--output-dir`/ken,
5. reloads it with `AutoKENModelForSequenceClassification.from_pretrained` and checks that
   the reloaded model's logits equal the pruned model's, bit for bit.

The other processes write nothing. The figures are printed as JSON and written to
`--output-dir`/results.json. The defaults run in about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ken_hf import AutoKENModelForSequenceClassification, KENConfig, prune_model
from ken_hf.experiments.assets import minilm_path
from ken_hf.experiments.tasks import movie_review_splits
from ken_hf.storage.checkpoints import new_parameters


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Fine-tune with a custom accelerate loop, then prune with KEN on the "
        "main process, save the subnetwork and reload it."
    )
    parser.add_argument("--train-size", type=int, default=200, help="training snippets")
    parser.add_argument("--eval-size", type=int, default=200, help="held-out snippets")
    parser.add_argument("--max-length", type=int, default=32, help="tokens per snippet")
    parser.add_argument("--batch-size", type=int, default=16, help="per process")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument(
        "--max-steps", type=int, default=None, help="stop after this many optimizer steps"
    )
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument(
        "--keep-ratio", type=float, default=0.5, help="share of each row KEN keeps fine-tuned"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even with a GPU")
    parser.add_argument("--output-dir", type=Path, default=Path("accelerate_loop_output"))
    return parser.parse_args(argv)


def batches(data: Dataset, tokenizer: PreTrainedTokenizerBase, size: int, **kwargs) -> DataLoader:
    """Padded batches of a tokenized split (its ``label`` column becomes ``labels``)."""
    return DataLoader(
        data.with_format("torch"),
        batch_size=size,
        collate_fn=DataCollatorWithPadding(tokenizer),
        **kwargs,
    )


def wait_for_everyone(accelerator: Accelerator) -> None:
    """``accelerator.wait_for_everyone()``; for CPU processes (gloo) a plain barrier, since
    accelerate before 1.16 passes ``device_ids`` there, which fails where a GPU is present
    ("invalid device ordinal" on rank 1 of a one-GPU machine)."""
    if accelerator.distributed_type == DistributedType.MULTI_CPU:
        torch.distributed.barrier()
    else:
        accelerator.wait_for_everyone()


def train(
    accelerator: Accelerator,
    model: PreTrainedModel,
    loader: DataLoader,
    *,
    epochs: int,
    learning_rate: float,
    max_steps: int | None = None,
) -> tuple[torch.nn.Module, dict]:
    """The plain training loop. Returns the model as ``prepare`` wrapped it and a summary
    (steps and mean loss of the last epoch, this process's)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    steps, losses = 0, []
    for _ in range(epochs):
        losses = []
        for batch in loader:
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        if max_steps is not None and steps >= max_steps:
            break
    model.eval()
    return model, {"steps": steps, "last_epoch_loss": sum(losses) / max(len(losses), 1)}


@torch.no_grad()
def predict(model: torch.nn.Module, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of every batch of ``loader`` (on ``model``'s device), on the CPU."""
    device = next(model.parameters()).device
    logits, labels = [], []
    for batch in loader:
        batch = {name: value.to(device) for name, value in batch.items()}
        labels.append(batch.pop("labels").cpu())
        logits.append(model(**batch).logits.cpu())
    return torch.cat(logits), torch.cat(labels)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(-1) == labels).float().mean().item()


def prune_and_save(
    model: PreTrainedModel,
    base_path: str,
    tokenizer: PreTrainedTokenizerBase,
    held_out: DataLoader,
    *,
    keep_ratio: float,
    folder: Path,
) -> dict:
    """On one process: prune the unwrapped fine-tune ``model`` in place against the base at
    ``base_path``, save the subnetwork into ``folder``, reload it and compare. Returns the
    figures."""
    finetuned_logits, labels = predict(model, held_out)
    # The pre-trained weights as from_pretrained loads them: the encoder from base_path, a
    # fresh head. KEN would find the head missing from base_path itself; naming it is
    # explicit and also works for a base given as a state dict.
    base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=2)
    new = new_parameters(model, base_path)  # {"classifier.weight", "classifier.bias"}
    start = time.perf_counter()
    subnetwork = prune_model(model, base, KENConfig(keep_ratio=keep_ratio), new_tensors=new)
    seconds = time.perf_counter() - start
    pruned_logits, _ = predict(model, held_out)  # prune_model reset the model in place
    figures = {
        "accuracy_finetuned": accuracy(finetuned_logits, labels),
        "accuracy_pruned": accuracy(pruned_logits, labels),
        "kept_fraction": subnetwork.kept_fraction(),
        "reset_fraction": subnetwork.reset_fraction(sum(p.numel() for p in model.parameters())),
        "stored_whole": sorted(subnetwork.whole),
        "selection_seconds": seconds,
    }
    subnetwork.metrics = {
        "accuracy_before_ken": figures["accuracy_finetuned"],
        "accuracy_after_ken": figures["accuracy_pruned"],
    }
    subnetwork.save_pretrained(folder, tokenizer=tokenizer)

    reloaded = AutoKENModelForSequenceClassification.from_pretrained(folder)
    reloaded.to(next(model.parameters()).device).eval()
    reloaded_logits, _ = predict(reloaded, held_out)
    figures["reloaded_logits_equal"] = torch.equal(reloaded_logits, pruned_logits)
    figures["accuracy_reloaded"] = accuracy(reloaded_logits, labels)
    figures["subnetwork_dir"] = str(folder)
    figures["subnetwork_bytes"] = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    return figures


def main(argv: Sequence[str] | None = None) -> dict:
    """Train, prune on the main process, save and reload. Returns the figures on the main
    process; on the others only ``process_index`` and the training summary."""
    args = parse_args(argv)
    # Without cpu=True, accelerate sets up no process group on a machine without GPUs.
    accelerator = Accelerator(cpu=args.cpu or not torch.accelerator.is_available())
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:  # every process would prune and save alone
        raise RuntimeError(
            f"{launched} processes launched, but the accelerator sees "
            f"{accelerator.num_processes} ({accelerator.distributed_type})"
        )
    set_seed(args.seed)  # the same new head on every process
    base_path = str(minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    train_split, held_out_split = movie_review_splits(
        tokenizer,
        train_size=args.train_size,
        eval_size=args.eval_size,
        max_length=args.max_length,
        seed=args.seed,
    )
    model = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=2)
    generator = torch.Generator().manual_seed(args.seed)
    loader = batches(train_split, tokenizer, args.batch_size, shuffle=True, generator=generator)
    start = time.perf_counter()
    model, summary = train(
        accelerator,
        model,
        loader,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        max_steps=args.max_steps,
    )
    summary["train_seconds"] = time.perf_counter() - start

    wait_for_everyone(accelerator)
    model = accelerator.unwrap_model(model)
    figures: dict = {"process_index": accelerator.process_index, **summary}
    if accelerator.is_main_process:
        held_out = batches(held_out_split, tokenizer, 64)
        figures |= {
            "num_processes": accelerator.num_processes,
            "train_size": args.train_size,
            "eval_size": args.eval_size,
            "keep_ratio": args.keep_ratio,
            **prune_and_save(
                model,
                base_path,
                tokenizer,
                held_out,
                keep_ratio=args.keep_ratio,
                folder=args.output_dir / "ken",
            ),
        }
        (args.output_dir / "results.json").write_text(json.dumps(figures, indent=2) + "\n")
        print(json.dumps(figures, indent=2))
    wait_for_everyone(accelerator)  # the others leave once the subnetwork is saved
    if accelerator.num_processes > 1:
        accelerator.end_training()  # destroys the process group
    return figures


if __name__ == "__main__":
    results = main()
    sys.exit(0 if results.get("reloaded_logits_equal", True) else 1)
