"""Export weights of this project as a Hugging Face directory that ``AutoModelForCausalLM`` loads as
``GPT2LMHeadModel``, with its tokenizer, so transformers, lm-eval and the hub can use them.

    python export_hf.py out/paper/run out/hf/run-600                       # a run: its latest raw snapshot
    python export_hf.py out/paper/run out/hf/ema-300 --kind=ema --step=300
    python export_hf.py out/paper/run/lawa/step_00000600.safetensors out/hf/lawa-600   # lawa.py --save_dir
    python export_hf.py ckpt.pt out/hf/nanogpt --tokenizer=gpt2             # a nanoGPT / Sophia checkpoint

The tokenizer is the one the model was trained with: ``--tokenizer``, else the ``meta.json`` of
``--data_dir``, else of the data named by the run's config.json (found beside SOURCE or above it).
"""

from ewa.tools import cli
from ewa.tools.hf import export_run


def main(argv: list[str] | None = None) -> None:
    p = cli.parser("export_hf.py", __doc__)
    p.add_argument("source", help="a snapshot, an average of lawa.py --save_dir, a run directory, or a nanoGPT ckpt.pt")
    p.add_argument("out_dir", help="the Hugging Face directory to write (must not exist)")
    p.add_argument("--step", type=int, help="for a run directory: the snapshot's step (default: the latest)")
    p.add_argument("--kind", default="raw",
                   help="for a run directory: which snapshots: raw (default), ema, ema_<decay>, swa")
    p.add_argument("--data_dir", help="the data the model was trained on: its meta.json names the tokenizer")
    p.add_argument("--tokenizer", choices=["bytes", "gpt2"], help="the tokenizer, instead of --data_dir")
    p.add_argument("--shard_size", type=int, default=5 * 10**9, help="bytes per safetensors shard (default: 5 GB)")
    a = p.parse_args(argv)
    out = cli.exit_on_error(lambda: export_run(a.source, a.out_dir, a.step, a.kind, a.data_dir, a.tokenizer,
                                               a.shard_size))
    print(f"wrote {out}: AutoModelForCausalLM.from_pretrained({str(out)!r}) loads it as GPT2LMHeadModel")


if __name__ == "__main__":
    main()
