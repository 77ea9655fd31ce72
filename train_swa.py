"""The SWA baseline: continue a run from its resume checkpoint at swa_start (75% of training
by default) with an annealed SWA learning rate, averaging the weights every swa_every steps.

    torchrun --standalone --nproc_per_node=8 train_swa.py configs/small.py --init_from=out/small
    python train_swa.py configs/tiny.py --init_from=out/tiny --swa_start=0.25   # early SWA
Without --init_from the run trains from scratch and starts SWA at swa_start. Output goes to
<out_dir>-swa unless --out_dir is given.
"""

from ewa.engine.trainer import main

if __name__ == "__main__":
    main("configs/small.py", swa=True)
