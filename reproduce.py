"""The paper's story on a CPU in minutes: a tiny GPT at a high learning rate with EMA, SWA,
LAWA (online and offline) and LR-cooldown baselines, then a report and the plots.

    python reproduce.py                      # configs/tiny.py on the embedded corpus
    python reproduce.py --lr_compare         # also the same run at a tenth of the learning rate
    python reproduce.py --config=configs/small.py --out=out/paper-small   # the real thing, on GPUs
See `python reproduce.py --help`.
"""

from ewa.tools.pipeline import main

if __name__ == "__main__":
    main()
