"""LAWA: average the k latest checkpoints spaced nu steps apart, at every interval steps, and
compare each average's validation loss with the raw model's at the same step.

    python lawa.py out/tiny                          # settings from the run's config
    python lawa.py out/small --k=5 --nu=200 --interval=1000 [--save_dir=DIR]
    torchrun --standalone --nproc_per_node=8 lawa.py out/small
See `python lawa.py --help` and the README for the window definition.
"""

from ewa.tools.lawa import main

if __name__ == "__main__":
    main()
