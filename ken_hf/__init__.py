"""ken-hf: KEN pruning (Mastromattei & Zanzotto, ACL Findings 2024) for the Hugging Face stack."""

from .selection import ken_prune, ken_select, ken_select_many

__version__ = "0.1.0"

__all__ = ["__version__", "ken_prune", "ken_select", "ken_select_many"]
