"""Train GPT-2 medium with EMA (and online LAWA when configured), saving snapshots for LAWA.

    torchrun --standalone --nproc_per_node=8 train_medium.py [--key=value ...]
    python train_medium.py configs/tiny.py            # any config file, one process, CPU or GPU
"""

from ewa.engine.trainer import main

if __name__ == "__main__":
    main("configs/medium.py")
