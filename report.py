"""Report and plots for any run directory: Original vs EMA vs SWA vs LAWA at each eval step, in
<run>/report.md, with ema_swa.png and lawa.png (see ewa/tools/report.py for what it reads).

    python report.py out/small [--assets=assets]
"""

from pathlib import Path

from ewa.tools import cli
from ewa.tools.report import write_report


def main(argv: list[str] | None = None) -> None:
    p = cli.parser("report.py", __doc__)
    p.add_argument("run_dir")
    p.add_argument("--assets", help="also write the plots here (e.g. assets)")
    a = p.parse_args(argv)
    print(cli.exit_on_error(lambda: write_report(a.run_dir, a.assets), FileNotFoundError))
    also = f" (plots also in {a.assets})" if a.assets else ""
    print(f"wrote {Path(a.run_dir) / 'report.md'}, ema_swa.png and lawa.png{also}")


if __name__ == "__main__":
    main()
