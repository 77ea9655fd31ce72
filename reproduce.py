"""The paper's story on a CPU in minutes: a tiny GPT at a high learning rate with EMA, SWA,
LAWA (online and offline) and LR-cooldown baselines, then a report and the plots (the stages:
ewa/tools/pipeline.py). Finished stages are reused by a re-run with the same settings.

    python reproduce.py                      # configs/tiny.py on the embedded corpus
    python reproduce.py --lr_compare         # also the same run at a tenth of the learning rate
    python reproduce.py --wsd                # also merge versus decay at a constant learning rate
    python reproduce.py --config=configs/small.py --out=out/paper-small   # the real thing, on GPUs
"""

import argparse

from ewa.tools import cli
from ewa.tools.pipeline import Settings, run_pipeline


def pairs(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(x) for x in item.split("x")) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write (k, nu) pairs as KxNU,KxNU, e.g. 5x10,5x30") from None


def fractions(text: str) -> list[float]:
    return [float(x) for x in text.split(",")] if text else []


def parse_args(argv: list[str] | None) -> Settings:
    p = cli.parser("reproduce.py", __doc__,
                   epilog="Any other --key=value overrides the training config (e.g. --max_steps=100).")
    d = Settings()
    p.add_argument("--config", default=d.config, help="training config file (default: %(default)s)")
    p.add_argument("--out", default=d.out, help="folder of every run of the pipeline (default: %(default)s)")
    p.add_argument("--lawa", type=pairs, default=d.lawa,
                   help="offline LAWA variants as KxNU pairs (default: 5x10,5x20)")
    p.add_argument("--cooldown_at", type=fractions, default=d.cooldown_at,
                   help="fractions of training to branch cooldowns at, or ''")
    p.add_argument("--cooldown_fraction", type=float, default=d.cooldown_fraction,
                   help="cooldown length / t (default: %(default)s)")
    p.add_argument("--lr_compare", action="store_true", help="also run at a tenth of the learning rate (Figure 2)")
    p.add_argument("--wsd", action="store_true",
                   help="also merge versus decay: a constant-LR run, its uniform and 1-sqrt merges against cooldowns")
    p.add_argument("--wsd_at", type=fractions, default=d.wsd_at,
                   help="fractions of training where --wsd compares merges and cooldowns (default: 0.25,0.5,0.75)")
    p.add_argument("--fresh", action="store_true", help="start over instead of reusing finished stages")
    p.add_argument("--assets", default=d.assets, help="where the plots are copied (default: %(default)s)")
    args, overrides = p.parse_known_args(argv)
    return Settings(**vars(args), overrides=overrides)


def main(argv: list[str] | None = None) -> str:
    settings = parse_args(argv)
    return cli.exit_on_error(lambda: run_pipeline(settings), FileNotFoundError)


if __name__ == "__main__":
    main()
