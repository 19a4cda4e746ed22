"""Float32 matrix products at full IEEE precision, whatever the process-wide settings say.

torch lets float32 matrix products run at reduced internal precision: TF32 (10-bit mantissa)
on NVIDIA GPUs, and bf16 or TF32 through oneDNN on CPUs that support them. Which one is
chosen by process-wide settings that users and libraries change, e.g.
``torch.set_float32_matmul_precision("high")`` or ``torch.backends.cuda.matmul.allow_tf32 =
True`` (transformers does so for ``torch_compile=True`` on some GPUs). The density step's error
bound (density.py) assumes IEEE float32 products, so its products run inside
``full_precision_matmul()``, which switches these settings to full precision and puts them
back afterwards, also when the block raises.

Settings touched (and restored):
  * the legacy ``torch.get_float32_matmul_precision()`` (which ``allow_tf32`` also sets);
  * from torch 2.9, the per-backend ``fp32_precision`` of the ``matmul`` operation for
    ``cuda`` and ``mkldnn`` (``torch.backends.cuda.matmul.fp32_precision`` and
    ``torch.backends.mkldnn.matmul.fp32_precision``).
``torch.backends.cudnn.allow_tf32`` governs cuDNN convolutions only, which the selection does
not use, so it is left alone.

Thread safety: these settings are global to the process, not per thread. Entries from several
threads are counted under a lock: the first saves and switches, the last restores, so
concurrent selections never restore a setting while another is still inside. While any
selection runs, float32 products in other threads of the process also run at full precision
(slower, never less exact), and a change to these settings made by another thread during a
selection is undone when the last selection finishes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

# torch >= 2.9 keeps, beside the legacy setting, one fp32_precision per (backend, operation);
# older versions have only the legacy setting.
_HAS_PER_BACKEND = hasattr(torch._C, "_get_fp32_precision_getter")
_BACKENDS = ("cuda", "mkldnn")


@dataclass(frozen=True)
class _Settings:
    """What ``full_precision_matmul`` found on entry.

    legacy: ``"highest"``, ``"high"`` or ``"medium"``. per_backend: ``{backend: value}`` for the
    ``matmul`` operation, where ``"none"`` means it follows the backend's and then the generic
    setting (empty before torch 2.9).
    """

    legacy: str
    per_backend: dict[str, str] = field(default_factory=dict)


_lock = threading.Lock()
_depth = 0  # selections inside full_precision_matmul, over all threads
_saved: _Settings | None = None  # what the first of them found


def _save_and_switch() -> _Settings:
    """Record the current settings, then set every float32 matmul path to full precision."""
    per_backend: dict[str, str] = {}
    if _HAS_PER_BACKEND:
        get = torch._C._get_fp32_precision_getter
        set_ = torch._C._set_fp32_precision_setter
        for backend in _BACKENDS:
            # The getter resolves "none" through the backend-wide setting; a value equal to
            # that one is written back as "none", so that it keeps following it.
            value = get(backend, "matmul")
            per_backend[backend] = "none" if value == get(backend, "all") else value
        # The legacy getter refuses to answer while the two APIs disagree (e.g. after
        # `torch.backends.cuda.matmul.fp32_precision = "tf32"` alone); with both matmul
        # settings at "ieee" they cannot disagree, and they are overwritten next anyway.
        for backend in _BACKENDS:
            set_(backend, "matmul", "ieee")
    saved = _Settings(torch.get_float32_matmul_precision(), per_backend)
    # Sets the legacy value and, from torch 2.9, both backends' matmul to "ieee".
    torch.set_float32_matmul_precision("highest")
    return saved


def _restore(saved: _Settings) -> None:
    """Put back the settings ``_save_and_switch`` recorded."""
    torch.set_float32_matmul_precision(saved.legacy)
    for backend, value in saved.per_backend.items():
        torch._C._set_fp32_precision_setter(backend, "matmul", value)


@contextmanager
def full_precision_matmul() -> Iterator[None]:
    """Run the block's float32 matrix products (``bmm``, ``matmul``, ``@``) in IEEE float32 on
    every device, then restore the process-wide precision settings (also on an exception).

    Reentrant and safe to enter from several threads at once (see the module docstring).
    """
    global _depth, _saved
    with _lock:
        if _depth == 0:
            _saved = _save_and_switch()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved is not None:
                saved, _saved = _saved, None
                _restore(saved)
