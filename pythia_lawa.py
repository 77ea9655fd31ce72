"""LAWA on Pythia / Hugging Face checkpoints: averaging, perplexity, zero-shot (lm-eval), GPU-hour savings.

    python pythia_lawa.py download   EleutherAI/pythia-1b-deduped --steps 48000 60000 105000 141000
    python pythia_lawa.py average    EleutherAI/pythia-1b-deduped --out_dir out/pythia-1b-deduped/lawa
    python pythia_lawa.py perplexity EleutherAI/pythia-1b-deduped --data philpapers.jsonl
    python pythia_lawa.py zeroshot   EleutherAI/pythia-1b-deduped --steps 48000 60000 105000 141000
    python pythia_lawa.py savings    out/pythia-1b-deduped/perplexity.jsonl --tolerance 0 0.5 1

By default with the paper's windows: k=5, nu=1000, interval=3000, from step 21000.
See `python pythia_lawa.py <command> --help` and the README.
"""

import argparse

from ewa.tools import cli, hf
from ewa.tools.merge import WindowPlan
from ewa.tools.pythia import (
    GPU_HOURS_FILE,
    PYTHIA_LAST_STEP,
    Scoring,
    download_revisions,
    report_savings,
    score_perplexity,
    score_zero_shot,
    write_averages,
)


def plan(a: argparse.Namespace) -> WindowPlan:
    return WindowPlan(a.k, a.nu, a.interval, a.start, a.end, tuple(a.steps or ()))


def scoring(a: argparse.Namespace) -> Scoring:
    return Scoring(a.device, a.dtype, a.batch_size, a.save_dir, a.out)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("pythia_lawa.py", __doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    source = argparse.ArgumentParser(add_help=False)
    source.add_argument("model", help="hub id (EleutherAI/pythia-1b-deduped), or a folder of save_pretrained "
                        "directories named by step (step21000/, step22000/, ...)")
    source.add_argument("--k", type=int, default=5, help="checkpoints per window (default: 5)")
    source.add_argument("--nu", type=int, default=1000, help="steps between a window's checkpoints (default: 1000)")
    source.add_argument("--interval", type=int, default=3000, help="steps between windows (default: 3000)")
    source.add_argument("--start", type=int, default=21000, help="first window step (default: 21000)")
    source.add_argument("--end", type=int,
                        help=f"last window step (default: the last checkpoint; {PYTHIA_LAST_STEP} for a hub id)")
    source.add_argument("--steps", type=int, nargs="+",
                        help="only the windows at these steps (e.g. Table 2's 48000 60000 105000 141000)")
    source.add_argument("--cache_dir", help="Hugging Face cache for hub revisions (default: HF_HUB_CACHE)")

    evaluation = argparse.ArgumentParser(add_help=False)
    evaluation.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    evaluation.add_argument("--dtype", default="auto", choices=["auto", *hf.DTYPES],
                            help="of weights and compute (default: the checkpoint's on a GPU, float32 on a CPU)")
    evaluation.add_argument("--batch_size", type=int, default=8, help="sequences per forward pass (default: 8)")
    evaluation.add_argument("--save_dir", help="also write each average there as step<N>/ (default: memory only)")
    evaluation.add_argument("--out", help="results JSONL (default: out/<model>/<command>.jsonl)")

    def add(name: str, parents: list, summary: str, run) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=parents, help=summary, description=summary)
        sub.set_defaults(run=run)
        return sub

    add("download", [source], "fetch the revisions the windows need into the local Hugging Face cache",
        lambda a: download_revisions(a.model, plan(a), a.cache_dir))
    average = add("average", [source], "write each window's LAWA average as a Hugging Face directory",
                  lambda a: write_averages(a.model, plan(a), a.out_dir, a.cache_dir))
    average.add_argument("--out_dir", required=True, help="folder for step<N>/ directories")

    ppl = add("perplexity", [source, evaluation], "token and word perplexity of original vs LAWA on held-out files",
              lambda a: score_perplexity(a.model, plan(a), a.data, a.tokens, a.seq_len, scoring(a), a.cache_dir))
    ppl.add_argument("--data", nargs="+", required=True,
                     help="held-out files: .jsonl with a 'text' field per line, or plain text")
    ppl.add_argument("--tokens", type=int, default=1_000_000, help="tokens scored per file (default: 1,000,000)")
    ppl.add_argument("--seq_len", type=int, help="tokens per window (default: the model's context)")

    zs = add("zeroshot", [source, evaluation], "zero-shot lm-evaluation-harness tasks, original vs LAWA (Table 2)",
             lambda a: score_zero_shot(a.model, plan(a), a.tasks, a.include_path, a.limit, scoring(a), a.cache_dir))
    zs.add_argument("--tasks", nargs="+", default=["lambada_openai", "sciq", "arc_easy", "wikitext"],
                    help="lm-eval task names (default: the paper's)")
    zs.add_argument("--include_path", help="folder of task YAMLs of your own")
    zs.add_argument("--limit", type=int, help="examples per task (default: all)")

    sv = add("savings", [], "GPU hours LAWA saves to reach the original's final perplexity (Figure 6)",
             lambda a: report_savings(a.results, a.tolerance, a.file, a.metric, a.final_step, a.gpu_hours,
                                      a.gpu_hours_model, a.plot))
    sv.add_argument("results", nargs="+", help="perplexity.jsonl of one or more models")
    sv.add_argument("--file", help="held-out file to use, when the runs scored several")
    sv.add_argument("--metric", default="word_perplexity", choices=["word_perplexity", "token_perplexity"])
    sv.add_argument("--tolerance", type=float, nargs="+", default=[0.0],
                    help="tolerated increases over the original's final perplexity (default: 0)")
    sv.add_argument("--final_step", type=int,
                    help="the original's step whose perplexity is the target (default: its last)")
    sv.add_argument("--gpu_hours", default=str(GPU_HOURS_FILE),
                    help="GPU hours per model (default: configs/pythia_gpu_hours.json)")
    sv.add_argument("--gpu_hours_model", help="entry of that file to use (default: from the model id)")
    sv.add_argument("--plot", help="PNG of GPU hours saved against the tolerance")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cli.exit_on_error(lambda: args.run(args))


if __name__ == "__main__":
    main()
