"""The paper's analyses of a training run: k x nu ablation, linear mode connectivity,
checkpoint diversity, loss spikes and restarts before one; each writes a table, its records and a plot.

    python analyze.py ablation out/tiny [--k=2,5,10] [--nu=10,20,50]
    python analyze.py lmc out/tiny --a=100 --b=600
    python analyze.py diversity out/tiny out/tiny-lowlr
    python analyze.py spikes out/tiny/lawa_k5_nu20.jsonl   # or a run dir with online LAWA
    python analyze.py recover out/spiky                    # restart before a spike: raw vs LAWA
See `python analyze.py <command> --help` and the README's "Analyses" section.
"""

from ewa.tools.analyze import main

if __name__ == "__main__":
    main()
