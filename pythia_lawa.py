"""LAWA on Pythia / Hugging Face checkpoints: averaging, perplexity, zero-shot (lm-eval), GPU-hour savings.

    python pythia_lawa.py download   EleutherAI/pythia-1b-deduped --steps 48000 60000 105000 141000
    python pythia_lawa.py average    EleutherAI/pythia-1b-deduped --out_dir out/pythia-1b-deduped/lawa
    python pythia_lawa.py perplexity EleutherAI/pythia-1b-deduped --data philpapers.jsonl
    python pythia_lawa.py zeroshot   EleutherAI/pythia-1b-deduped --steps 48000 60000 105000 141000
    python pythia_lawa.py savings    out/pythia-1b-deduped/perplexity.jsonl --tolerance 0 0.5 1
See `python pythia_lawa.py <command> --help` and the README.
"""

from ewa.tools.pythia import main

if __name__ == "__main__":
    main()
