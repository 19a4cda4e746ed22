"""The selection's exactness does not depend on torch's global float32 matmul precision.

The density step's error bound assumes IEEE float32 matrix products; users and libraries
(transformers with ``torch_compile=True``) switch products to TF32 or bf16 process-wide.
``ken_select`` must give the same masks whatever those settings are, and leave them as it
found them, also when it raises.
"""

from __future__ import annotations

import pytest
import torch

from ken_hf.selection import ken_select
from ken_hf.selection.precision import full_precision_matmul

PER_BACKEND = hasattr(torch._C, "_get_fp32_precision_getter")  # torch >= 2.9

CUDA = pytest.param(
    "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
)

# Real MiniLM rows of both widths and several tensor families: (name, rows taken).
ROWS = [
    ("encoder.layer.0.attention.self.query.weight", 48),
    ("encoder.layer.2.intermediate.dense.weight", 48),
    ("encoder.layer.4.output.dense.weight", 16),
    ("embeddings.word_embeddings.weight", 32),
]


def _reset_to_default() -> None:
    """torch's default settings: full-precision matmul, cuDNN convolutions in TF32."""
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = True
    if PER_BACKEND:
        torch.backends.fp32_precision = "none"
        torch.backends.cuda.matmul.fp32_precision = "none"
        torch.backends.mkldnn.matmul.fp32_precision = "none"


def _reduce(setting: str) -> None:
    """Switch the process to one reduced-precision setting, as a user or library would."""
    if setting in ("high", "medium"):
        torch.set_float32_matmul_precision(setting)
    elif setting == "allow_tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif setting == "cuda matmul tf32":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    elif setting == "mkldnn matmul bf16":
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    elif setting == "generic tf32":
        torch.backends.fp32_precision = "tf32"
    else:
        raise AssertionError(setting)


SETTINGS = ["high", "medium", "allow_tf32"]
if PER_BACKEND:  # the per-backend API exists from torch 2.9 only
    SETTINGS += ["cuda matmul tf32", "mkldnn matmul bf16", "generic tf32"]


def _observed() -> dict[str, object]:
    """Every precision setting a user can read back."""
    state: dict[str, object] = {"cudnn.allow_tf32": torch.backends.cudnn.allow_tf32}
    try:
        state["matmul precision"] = torch.get_float32_matmul_precision()
    except RuntimeError:  # torch >= 2.9 refuses while the legacy and new settings disagree
        state["matmul precision"] = "refused: legacy and per-backend settings disagree"
    if PER_BACKEND:
        state["generic"] = torch.backends.fp32_precision
        state["cuda.matmul"] = torch.backends.cuda.matmul.fp32_precision
        state["mkldnn.matmul"] = torch.backends.mkldnn.matmul.fp32_precision
    return state


def _full_precision_now() -> dict[str, object]:
    """The settings float32 products run under right now, for a spy inside the selection."""
    state: dict[str, object] = {"matmul precision": torch.get_float32_matmul_precision()}
    if PER_BACKEND:
        state["cuda.matmul"] = torch.backends.cuda.matmul.fp32_precision
        state["mkldnn.matmul"] = torch.backends.mkldnn.matmul.fp32_precision
    return state


FULL = {"matmul precision": "highest"} | (
    {"cuda.matmul": "ieee", "mkldnn.matmul": "ieee"} if PER_BACKEND else {}
)


@pytest.fixture(autouse=True)
def default_precision(monkeypatch):
    """Each test starts from and leaves torch's default precision settings. CPU rows take
    the torch path (the one CUDA takes, whose density products these tests are about): the
    default compiled CPU path has no matrix products."""
    monkeypatch.setenv("KEN_HF_SELECT_BACKEND", "torch")
    _reset_to_default()
    yield
    _reset_to_default()


def _masks(weights: dict[str, torch.Tensor], device: str) -> dict[tuple[str, int], torch.Tensor]:
    """KEN masks of the chosen rows at k = 25/50/75 % of the width: ``{(name, k): bool [R, n]}``."""
    masks = {}
    for name, count in ROWS:
        rows = weights[name][:count].to(device)
        width = rows.shape[1]
        for k in (width // 4, width // 2, 3 * width // 4):
            masks[(name, k)] = ken_select(rows, k, name=name).cpu()
    return masks


@pytest.fixture(scope="module")
def default_masks(minilm_weights) -> dict[str, dict[tuple[str, int], torch.Tensor]]:
    """Masks under the default settings, per device (CPU: the compiled path's masks, so the
    torch path under reduced precision is compared with the other path)."""
    _reset_to_default()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {device: _masks(minilm_weights, device) for device in devices}


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("setting", SETTINGS)
def test_masks_do_not_depend_on_matmul_precision(minilm_weights, default_masks, device, setting):
    _reduce(setting)
    before = _observed()
    masks = _masks(minilm_weights, device)
    assert _observed() == before, "ken_select left the precision settings changed"
    for key, expected in default_masks[device].items():
        assert torch.equal(masks[key], expected), f"{key}: mask differs under {setting!r}"
    if setting == "generic tf32":
        # The matmul settings were unset ("none", following the generic one) and still are.
        torch.backends.fp32_precision = "ieee"
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("setting", SETTINGS)
def test_density_products_run_at_full_precision(minilm_weights, monkeypatch, device, setting):
    """A spy on torch.bmm records the settings each density product runs under."""
    seen: list[dict[str, object]] = []
    real_bmm = torch.bmm

    def spy(*args, **kwargs):
        seen.append(_full_precision_now())
        return real_bmm(*args, **kwargs)

    _reduce(setting)
    before = _observed()
    monkeypatch.setattr(torch, "bmm", spy)
    rows = minilm_weights["encoder.layer.0.attention.self.query.weight"][:8].to(device)
    ken_select(rows, 96)
    assert seen, "the density step ran no matrix product"
    assert all(state == FULL for state in seen), seen[0]
    assert _observed() == before


@pytest.mark.parametrize("setting", SETTINGS)
def test_settings_restored_when_selection_raises(minilm_weights, monkeypatch, setting):
    def failing_bmm(*args, **kwargs):
        raise RuntimeError("product failed")

    _reduce(setting)
    before = _observed()
    monkeypatch.setattr(torch, "bmm", failing_bmm)
    rows = minilm_weights["encoder.layer.0.attention.self.query.weight"][:4]
    with pytest.raises(RuntimeError, match="product failed"):
        ken_select(rows, 96)
    assert _observed() == before


def test_nested_and_raising_blocks_restore_once_at_the_outermost_exit():
    torch.set_float32_matmul_precision("medium")
    with full_precision_matmul():
        with pytest.raises(ValueError):
            with full_precision_matmul():
                raise ValueError("inner")
        assert _full_precision_now() == FULL  # the outer block is still at full precision
    assert torch.get_float32_matmul_precision() == "medium"
