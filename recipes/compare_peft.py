"""KEN against LoRA (PEFT) and simple sparse baselines on one task and training budget.

    python recipes/compare_peft.py                      # all-MiniLM-L6-v2, movie snippets
    python recipes/compare_peft.py --model packaged:SmolLM2-135M-Instruct --train-size 1000
    python recipes/compare_peft.py --model bert-base-uncased --dataset rotten_tomatoes

Runs, for every seed, the full fine-tune; KEN at several k, and the same k for the
largest-change and random baselines and for KEN on the change (a variant), all stored as
KEN subnetworks; LoRA at several ranks. Writes results.json, results.md and results.png
(metric against bytes stored) into --output-dir. The same as `ken compare`; see
`ken compare --help` for every option.
"""

import sys

from ken_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
