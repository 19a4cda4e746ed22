"""Layer 1: the KEN selection rule over plain tensors (no transformers import here)."""

from .ken import ken_prune, ken_select, ken_select_many

__all__ = ["ken_prune", "ken_select", "ken_select_many"]
