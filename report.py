"""Report and plots for any run directory: Original vs EMA vs SWA vs LAWA at each eval step.

    python report.py out/small [--assets=assets]
"""

from ewa.tools.report import main

if __name__ == "__main__":
    main()
