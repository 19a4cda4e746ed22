"""``AutoK``: the search for the smallest keep ratio whose metric stays within a tolerance
of the unpruned model's (bisection on the keep ratio; ``KENCallback(auto_k=...)`` runs it
when training ends: ``AutoK.run`` probes by pruning, evaluating and putting the fine-tuned
values back)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping

import torch

from .errors import KENConfigError, shown
from .storage.checkpoints import tensors_of
from .utils.json_input import is_integer


@dataclasses.dataclass
class AutoK:
    """Settings of ``KENCallback``'s search for the smallest keep ratio that keeps quality.

    When training ends, the callback bisects the keep ratio between ``low`` and 1: each
    probe prunes the model, evaluates it on the Trainer's eval set and puts the fine-tuned
    values back. A ratio is good when the metric is at most ``tolerance`` (relative) worse
    than the unpruned model's; the smallest good ratio found is used (1 if none is). The
    search needs an eval set, holds one more copy of the weights meanwhile, and is not
    available with sharded training (FSDP2, DeepSpeed ZeRO-3).

    Args:
        metric: a key of ``Trainer.evaluate``'s output without its ``eval_`` prefix (e.g.
            ``"loss"``, ``"accuracy"`` from ``compute_metrics``).
        tolerance: the largest relative loss of quality accepted: a probe is good when
            ``|change| <= tolerance * |unpruned value|`` in the bad direction.
        low: the smallest keep ratio considered, in (0, 1).
        max_evaluations: the number of probes (each one evaluation), an integer >= 1.
        greater_is_better: whether a larger metric is better (True for accuracy, False for
            loss).

    Raises:
        KENConfigError: a field out of its range: ``metric`` not a non-empty string,
            ``tolerance`` not a finite number >= 0, ``low`` not in (0, 1),
            ``max_evaluations`` not an integer >= 1, or ``greater_is_better`` not a bool.

    Example:
        ```python
        from ken_hf import AutoK, KENCallback

        search = AutoK(metric="accuracy", greater_is_better=True, tolerance=0.01)
        trainer.add_callback(KENCallback(auto_k=search))  # the curve: callback.auto_k_curve
        ```
    """

    metric: str = "loss"
    tolerance: float = 0.01
    low: float = 0.05
    max_evaluations: int = 6
    greater_is_better: bool = False

    def __post_init__(self) -> None:
        def number(value: object) -> bool:
            return isinstance(value, numbers.Real) and not isinstance(value, bool)

        checks = [
            ("metric", isinstance(self.metric, str) and self.metric != "", "a non-empty string"),
            ("tolerance", number(self.tolerance) and 0 <= self.tolerance < math.inf,
             "a finite number >= 0"),
            ("low", number(self.low) and 0 < self.low < 1, "in (0, 1)"),
            ("max_evaluations", is_integer(self.max_evaluations) and self.max_evaluations >= 1,
             "an integer >= 1"),
            ("greater_is_better", isinstance(self.greater_is_better, bool), "True or False"),
        ]  # fmt: skip
        for field, valid, allowed in checks:
            if not valid:
                raise KENConfigError(
                    f"AutoK.{field} must be {allowed}, got {shown(getattr(self, field))}"
                )

    def search(self, reference: float, probe: Callable[[float], float]) -> tuple[float, list[dict]]:
        """Bisect the keep ratio between ``low`` and 1 with ``max_evaluations`` probes.

        Args:
            reference: the unpruned model's metric.
            probe: the metric of the model pruned at a keep ratio (the model must be the
                unpruned one again when it returns).

        Returns:
            The smallest keep ratio found within tolerance (1.0 when none was), and the
            curve: per probe, the keep ratio, the metric and whether it was within
            tolerance.
        """
        low, high = self.low, 1.0
        curve = []
        for _ in range(self.max_evaluations):
            ratio = (low + high) / 2
            value = probe(ratio)
            loss_of_quality = reference - value if self.greater_is_better else value - reference
            good = loss_of_quality <= self.tolerance * abs(reference)
            curve.append({"keep_ratio": ratio, self.metric: value, "within_tolerance": good})
            low, high = (low, ratio) if good else (ratio, high)
        return high, curve

    def run(
        self,
        trainer: object,
        model: torch.nn.Module,
        before: Mapping[str, float],
        prune: Callable[[float], None],
    ) -> tuple[float, list[dict]]:
        """The search when training ends: each probe prunes ``model`` in place, evaluates it
        on the Trainer's eval set (metrics ``ken_probe_*``), logs ``ken_auto_k_ratio`` and
        ``ken_auto_k_<metric>``, and puts the fine-tuned values back (a copy of every weight
        is held meanwhile).

        Args:
            trainer: the ``transformers.Trainer`` (its ``evaluate`` and ``log``).
            model: the unwrapped model the Trainer trained.
            before: the unpruned model's metrics (``ken_before_*``).
            prune: prunes ``model`` in place at a keep ratio.

        Returns:
            As ``search``.

        Raises:
            KENConfigError: ``metric`` is not among the evaluation's metrics.
        """
        key = f"ken_before_{self.metric}"
        if key not in before:
            raise KENConfigError(f"auto_k: metric {self.metric!r} not in {sorted(before)}")
        finetuned = {name: t.detach().clone() for name, t in tensors_of(model).items()}

        def probe(ratio: float) -> float:
            prune(ratio)
            value = trainer.evaluate(metric_key_prefix="ken_probe")[f"ken_probe_{self.metric}"]
            with torch.no_grad():
                for name, tensor in tensors_of(model).items():
                    tensor.copy_(finetuned[name])
            trainer.log({"ken_auto_k_ratio": ratio, f"ken_auto_k_{self.metric}": value})
            return value

        return self.search(before[key], probe)
