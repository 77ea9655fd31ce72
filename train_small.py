"""Train GPT-2 small with EMA (and online LAWA when configured), saving snapshots for LAWA.

    torchrun --standalone --nproc_per_node=8 train_small.py [--key=value ...]
    python train_small.py configs/tiny.py            # any config file, one process, CPU or GPU
"""

from ewa.engine.trainer import main

if __name__ == "__main__":
    main("configs/small.py")
