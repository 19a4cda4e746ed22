"""ken-hf: KEN pruning (Mastromattei & Zanzotto, ACL Findings 2024) for the Hugging Face stack.

KEN keeps, row by row, the fine-tuned values a kernel density estimate marks as representative
and resets the rest to their pre-trained values; ken-hf stores what it keeps as a subnetwork.

Layer 1 (``ken_hf.selection``: ``ken_select``, ``ken_prune``, ``ken_select_many``) is plain
torch and loads with the package; every other name loads its module on first use, so that
``import ken_hf`` does not import transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .selection import ken_prune, ken_select, ken_select_many

if TYPE_CHECKING:  # the names of ``_LAZY``, re-exported for type checkers and doc tools
    from .auto_k import AutoK as AutoK
    from .callback import KENCallback as KENCallback
    from .config import KENConfig as KENConfig
    from .errors import KENConfigError as KENConfigError
    from .errors import KENError as KENError
    from .errors import UnsafePathError as UnsafePathError
    from .modeling import AutoKENModel as AutoKENModel
    from .modeling import AutoKENModelForCausalLM as AutoKENModelForCausalLM
    from .modeling import AutoKENModelForQuestionAnswering as AutoKENModelForQuestionAnswering
    from .modeling import AutoKENModelForSeq2SeqLM as AutoKENModelForSeq2SeqLM
    from .modeling import (
        AutoKENModelForSequenceClassification as AutoKENModelForSequenceClassification,
    )
    from .modeling import AutoKENModelForTokenClassification as AutoKENModelForTokenClassification
    from .modeling import KENModel as KENModel
    from .modeling import KENModelForCausalLM as KENModelForCausalLM
    from .modeling import KENModelForQuestionAnswering as KENModelForQuestionAnswering
    from .modeling import KENModelForSeq2SeqLM as KENModelForSeq2SeqLM
    from .modeling import KENModelForSequenceClassification as KENModelForSequenceClassification
    from .modeling import KENModelForTokenClassification as KENModelForTokenClassification
    from .modeling import UnknownSubnetworkError as UnknownSubnetworkError
    from .storage.checkpoints import CheckpointError as CheckpointError
    from .storage.subnetwork_file import KENFormatError as KENFormatError
    from .subnetwork import BaseMismatchError as BaseMismatchError
    from .subnetwork import KENSubnetwork as KENSubnetwork
    from .subnetwork import prune_model as prune_model

__version__ = "0.1.0"

_LAZY = {
    "KENConfig": "config",
    "KENSubnetwork": "subnetwork",
    "prune_model": "subnetwork",
    "BaseMismatchError": "subnetwork",
    "KENFormatError": "storage.subnetwork_file",
    "KENError": "errors",
    "KENConfigError": "errors",
    "UnsafePathError": "errors",
    "CheckpointError": "storage.checkpoints",
    "KENModel": "modeling",
    "KENModelForSequenceClassification": "modeling",
    "KENModelForCausalLM": "modeling",
    "KENModelForTokenClassification": "modeling",
    "KENModelForQuestionAnswering": "modeling",
    "KENModelForSeq2SeqLM": "modeling",
    "UnknownSubnetworkError": "modeling",
    "AutoKENModel": "modeling",
    "AutoKENModelForSequenceClassification": "modeling",
    "AutoKENModelForCausalLM": "modeling",
    "AutoKENModelForTokenClassification": "modeling",
    "AutoKENModelForQuestionAnswering": "modeling",
    "AutoKENModelForSeq2SeqLM": "modeling",
    "KENCallback": "callback",
    "AutoK": "auto_k",
}

__all__ = ["__version__", "ken_prune", "ken_select", "ken_select_many", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'ken_hf' has no attribute {name!r}")
