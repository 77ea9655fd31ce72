"""The paper's analyses of a run directory (or any folder of checkpoints), each writing a table
(``.md``), its records (``.jsonl``) and a plot (``.png``) into the run directory or ``--out_dir``.

    python analyze.py ablation out/tiny --k=2,5,10 --nu=10,20,50      # appendix A.1, Figure 10
    python analyze.py lmc out/tiny --a=100 --b=600                    # appendix A.3, Figure 13
    python analyze.py diversity out/tiny out/tiny-lowlr               # section 2.2
    python analyze.py spikes out/tiny/lawa_k5_nu20.jsonl             # section 4.3 (or a run dir with online LAWA)
    python analyze.py recover out/spiky                               # restart before a spike: raw vs LAWA
    python analyze.py zeroshot out/tiny --tasks=TASK,... --include_path=DIR   # Table 2, raw/EMA/SWA/LAWA

With ``--wandb_log`` each logs its figures into the run's wandb run, on an axis of its own.
See `python analyze.py <command> --help` and the README's "Analyses" section.
"""

import argparse

from ewa.tools import cli
from ewa.tools.analysis import Threshold
from ewa.tools.analyze import (
    Output,
    analyze_ablation,
    analyze_diversity,
    analyze_lmc,
    analyze_recovery,
    analyze_spikes,
    analyze_zero_shot,
)


def alphas(text: str) -> list[float]:
    """An argparse type: weights in [0, 1] separated by commas."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers separated by commas, e.g. 0,0.5,1") from None
    if not values or not all(0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every alpha must lie in [0, 1]")
    return values


def output(a: argparse.Namespace) -> Output:
    return Output(a.out_dir, a.wandb_log)


def command(sub, name: str, help: str, run, evaluates: bool = True) -> argparse.ArgumentParser:
    """A subcommand calling ``run(args)``, with the output flags (and the evaluation flags)."""
    p = sub.add_parser(name, help=help)
    p.set_defaults(run=run)
    if evaluates:
        cli.add_flags(p, cli.EvalOptions)
    p.add_argument("--out_dir", help="where the table, records and plot go (default: the run directory)")
    p.add_argument("--wandb_log", action="store_true", help="also log the figures into the run's wandb run")
    return p


def spike_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--window", type=cli.integer(1), default=5,
                   help="trend: the median of this many previous evals (default 5)")
    p.add_argument("--threshold", default="2%",
                   help="a spike exceeds the trend by more than this: 0.05 (loss) or 2%% (default)")


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("analyze.py", __doc__)
    sub = p.add_subparsers(dest="command", required=True)

    a = command(sub, "ablation", "LAWA val loss over a grid of k and nu (appendix A.1)", lambda a: analyze_ablation(
        a.path, a.k, a.nu, a.interval, a.start, a.end, cli.from_args(cli.EvalOptions, a), output(a)))
    a.add_argument("path", help="a run directory, or a folder of checkpoints named by step")
    a.add_argument("--k", type=cli.int_list(1), default="2,5,10", help="checkpoints per window, e.g. 2,5,10 (default)")
    a.add_argument("--nu", type=cli.int_list(1),
                   help="steps between a window's checkpoints (default: 1, 2 and 5 x the snapshot spacing)")
    a.add_argument("--interval", type=cli.integer(1),
                   help="steps between evaluations (default: the run's eval_interval)")
    a.add_argument("--start", type=cli.integer(0), default=0, help="first evaluation step (default 0)")
    a.add_argument("--end", type=cli.integer(0), help="last evaluation step (default: the last checkpoint)")

    m = command(sub, "lmc", "val loss along the line between two checkpoints (appendix A.3)",
                lambda a: analyze_lmc(a.path, a.a, a.b, a.alphas, cli.from_args(cli.EvalOptions, a), output(a)))
    m.add_argument("path", help="a run directory, or a folder of checkpoints: the evaluation data and --a/--b steps")
    m.add_argument("--a", required=True, help="θa (alpha = 1): a step of PATH, or a checkpoint file / directory")
    m.add_argument("--b", required=True, help="θb (alpha = 0): a step of PATH, or a checkpoint file / directory")
    m.add_argument("--alphas", type=alphas, default="0,0.2,0.4,0.6,0.8,1",
                   help="weights of θa to evaluate (default 0,0.2,...,1); 0 and 1 are always added")

    d = command(sub, "diversity", "top-1 disagreement between checkpoints vs their distance (section 2.2)",
                lambda a: analyze_diversity(a.paths, a.anchors, a.distances, cli.from_args(cli.EvalOptions, a),
                                            output(a)))
    d.add_argument("paths", nargs="+", help="one or more run directories (e.g. a high-LR and a low-LR run)")
    d.add_argument("--anchors", type=cli.int_list(0),
                   help="steps t of the pairs (t, t + d) (default: a quarter and half of the run)")
    d.add_argument("--distances", type=cli.int_list(1),
                   help="distances d (default: 1, 2, 5, 10, ... x the snapshot spacing)")

    s = command(sub, "spikes", "steps where the raw val loss jumps above its trend, and LAWA there (section 4.3)",
                lambda a: analyze_spikes(a.path, a.window, Threshold.parse(a.threshold), output(a)), evaluates=False)
    s.add_argument("path", help="a training run directory (raw and online LAWA in its metrics.jsonl) "
                   "or a JSONL written by lawa.py")
    spike_flags(s)

    r = command(sub, "recover", "restart before a loss spike from the raw checkpoint and from the LAWA average",
                lambda a: analyze_recovery(a.path, a.spike, a.at, a.steps, cli.from_args(cli.WindowSettings, a),
                                           a.reset_optimizer, a.window, Threshold.parse(a.threshold), output(a)),
                evaluates=False)
    r.add_argument("path", help="a training run directory with resume checkpoints and raw snapshots before the spike")
    r.add_argument("--spike", type=cli.integer(1), help="the spike's eval step (default: the first spike found)")
    r.add_argument("--at", type=cli.integer(0), help="the restart step (default: the latest before the spike with a "
                   "resume checkpoint and a complete LAWA window)")
    r.add_argument("--steps", type=cli.integer(1),
                   help="steps to train each restart (default: to ten evals past the spike)")
    cli.add_flags(r, cli.WindowSettings, "k", "nu", "weights")
    r.add_argument("--reset_optimizer", action="store_true", help="restart both with a fresh AdamW state")
    spike_flags(r)

    z = command(sub, "zeroshot", "zero-shot lm-eval tasks of raw, EMA, SWA and LAWA models (Table 2)",
                lambda a: analyze_zero_shot(a.path, a.tasks, a.include_path, a.steps,
                                            cli.from_args(cli.WindowSettings, a), a.limit, a.batch_size,
                                            cli.from_args(cli.EvalOptions, a), output(a)))
    z.add_argument("path", help="a run directory (its EMA snapshots, SWA's of <run>-swa), or a folder of checkpoints")
    z.add_argument("--tasks", type=lambda text: [t for t in text.split(",") if t], required=True,
                   help="lm-eval task names, e.g. shakespeare_word_order,shakespeare_passages")
    z.add_argument("--include_path", help="folder of task YAMLs of your own (e.g. data/shakespeare/tasks)")
    z.add_argument("--steps", type=cli.int_list(0),
                   help="steps to score (default: nearest 25, 50, 75 and 100%% of the run)")
    cli.add_flags(z, cli.WindowSettings, "k", "nu", "weights")
    z.add_argument("--limit", type=cli.integer(1), help="examples per task (default: all)")
    z.add_argument("--batch_size", type=cli.integer(1), default=8, help="sequences per forward pass (default: 8)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cli.exit_on_error(lambda: args.run(args))


if __name__ == "__main__":
    main()
