"""ken-hf: KEN pruning (Mastromattei & Zanzotto, ACL Findings 2024) for the Hugging Face stack.

Layer 1 (``ken_hf.selection``) is plain torch; the model classes, which import
transformers, load on first use.
"""

from __future__ import annotations

import importlib

from .selection import ken_prune, ken_select, ken_select_many

__version__ = "0.1.0"

_LAZY = {
    "KENConfig": "config",
    "KENSubnetwork": "subnetwork",
    "prune_model": "subnetwork",
    "BaseMismatchError": "subnetwork",
    "KENFormatError": "serialization",
    "KENError": "errors",
    "KENConfigError": "errors",
    "UnsafePathError": "errors",
    "CheckpointError": "checkpoints",
    "KENModel": "modeling",
    "KENModelForQuestionAnswering": "modeling",
    "AutoKENModel": "modeling",
    "AutoKENModelForSequenceClassification": "modeling",
    "AutoKENModelForCausalLM": "modeling",
    "AutoKENModelForTokenClassification": "modeling",
    "AutoKENModelForQuestionAnswering": "modeling",
    "AutoKENModelForSeq2SeqLM": "modeling",
    "KENCallback": "callback",
    "AutoK": "callback",
}

__all__ = ["__version__", "ken_prune", "ken_select", "ken_select_many", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'ken_hf' has no attribute {name!r}")
