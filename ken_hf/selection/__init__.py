"""Layer 1: selection rules over plain tensors (no transformers import here)."""

from .ken import ken_prune, ken_select, ken_select_many, select_rows

__all__ = ["ken_prune", "ken_select", "ken_select_many", "select_rows"]
