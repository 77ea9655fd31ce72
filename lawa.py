"""LAWA: average the k latest checkpoints spaced nu steps apart, at every interval steps, and
compare each average's validation loss with the raw model's at the same step, on the same fixed
held-out tokens the training used.

    python lawa.py out/tiny                               # k, nu, interval, start from the run's config
    python lawa.py out/small --k=5 --nu=200 --interval=1000 --save_dir=out/small/lawa
    torchrun --standalone --nproc_per_node=8 lawa.py out/small     # windows split across ranks
    python lawa.py ckpts/ --config=out/small/config.json  # nanoGPT ckpt_*.pt, HF dirs, ...
See the README for the window definition.
"""

from ewa.tools import cli
from ewa.tools.lawa import evaluate_run


def main(argv: list[str] | None = None) -> list[dict]:
    p = cli.parser("lawa.py", __doc__)
    p.add_argument("path", help="a run directory, or a folder of checkpoints named by step")
    cli.add_flags(p, cli.WindowSettings)
    cli.add_flags(p, cli.EvalOptions)
    p.add_argument("--save_dir", help="also write each averaged checkpoint here (safetensors)")
    p.add_argument("--out", help="JSONL of the results (default: <run>/lawa_k<k>_nu<nu>.jsonl)")
    p.add_argument("--wandb_log", action="store_true", help="log into the run's wandb run (a new one for a folder)")
    p.add_argument("--wandb_run_name", default="", help="name of a new wandb run (default: wandb's)")
    a = p.parse_args(argv)
    window, options = cli.from_args(cli.WindowSettings, a), cli.from_args(cli.EvalOptions, a)
    return cli.exit_on_error(lambda: evaluate_run(a.path, window, options, a.save_dir, a.out, a.wandb_log,
                                                  a.wandb_run_name))


if __name__ == "__main__":
    main()
