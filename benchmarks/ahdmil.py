"""AHDMIL: AUC, accuracy and seconds per slide of DMIN on every tile and of AHDMIL, measured in one
run on the same slides, with the keep rate and the tumour recall of the screen under our operating
threshold and under the paper's rule 1[P > 0].

A thin wrapper of ``benchmarks/run.py --method ahdmil``: it runs
:func:`mini_kd.experiments.ahdmil.run_experiment`, the same function notebook 04 runs, and writes
its JSON, with the targets, met or not: AHDMIL at least 2x faster than DMIN on every tile, an AUC
at least DMIN's, at least 95 % of the tumour tiles kept (cohorts with label maps).

    python benchmarks/ahdmil.py --preset book --out benchmarks/results/ahdmil.json [--cohort FOLDER]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import main  # noqa: E402

if __name__ == "__main__":
    main(method="ahdmil")
