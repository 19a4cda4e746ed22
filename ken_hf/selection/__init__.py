"""Layer 1: the KEN selection rule, and baseline rules of the same shape, over plain
tensors (no transformers import here)."""

from .baselines import largest_delta_select, random_select
from .ken import ken_prune, ken_select, ken_select_many
from .rules import RULES, select_by_rule

__all__ = [
    "RULES",
    "ken_prune",
    "ken_select",
    "ken_select_many",
    "largest_delta_select",
    "random_select",
    "select_by_rule",
]
