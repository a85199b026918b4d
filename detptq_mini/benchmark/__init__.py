"""The benchmark harness: named cells (method x bits x calibration seed), one subprocess per cell, resumable.

Three modules, data flowing one way (``suites`` <- ``report`` <- ``runner``):

* :mod:`.suites`: what to run. :class:`~.suites.Cell` (one ``detptq-mini quantize ... --json`` run), the named
  suites :data:`~.suites.SUITES` (``full``, ``ablations``, ``loss-norm``, ``simple``, ``quick``) with their settings
  (:data:`~.suites.FULL_BITS`, :data:`~.suites.SEEDS`, :data:`~.suites.RECON_ITERS`, :data:`~.suites.RECON_LR`,
  ...), :func:`~.suites.select_cells`.
* :mod:`.report`: a result file as tables: :func:`~.report.summarize` (one JSON-ready dict for the book) and
  :func:`~.report.to_markdown` (a row per method, a column per bits, mean ± std over seeds, % of FP, cost,
  settings, the commands and the machine); :func:`~.report.compare` judges "A beats B" over the seeds (gap > 2
  pooled std).
* :mod:`.runner`: :func:`~.runner.run_suite` runs a suite one cell per subprocess (:func:`~.runner.run_cell`), one
  at a time or ``jobs`` at once, rewrites the result file and its markdown atomically after every cell (cells in
  the suite's order: :func:`~.runner.ordered_cells`), resumes where a run stopped and logs every run's command and
  code (:func:`~.runner.code_version`); :func:`~.runner.load_results` reads a result file.

Command line: ``detptq-mini benchmark --suite full`` (see ``benchmarks/README.md``).
"""

from .report import METHOD_NAMES, Comparison, cell_of, compare, row_of, summarize, to_markdown, unit_losses
from .runner import (SuiteRun, cell_args, code_version, load_results, machine_info, ordered_cells, run_cell,
                     run_suite)
from .suites import (EIGHT_BIT_OFF, FULL_BITS, FULL_CALIB, FULL_VAL, LOSS_NORM_BEFORE, LP_EXTRA_P, ODOL_COMBOS,
                     QUANT_PROB_ONE, RECON_ITERS, RECON_LR, RECON_METHODS, SEEDS, SUITES, Cell, bits_pair, is_done,
                     on_model, select_cells, suite_cells)

__all__ = ["Cell", "SUITES", "RECON_ITERS", "RECON_LR", "RECON_METHODS", "FULL_BITS", "FULL_CALIB", "FULL_VAL", "SEEDS",
           "LP_EXTRA_P", "ODOL_COMBOS", "QUANT_PROB_ONE", "EIGHT_BIT_OFF", "LOSS_NORM_BEFORE", "METHOD_NAMES",
           "SuiteRun", "bits_pair", "is_done", "on_model", "suite_cells", "select_cells", "cell_args", "run_cell",
           "run_suite", "ordered_cells", "load_results", "machine_info", "code_version", "summarize", "to_markdown",
           "unit_losses", "Comparison", "compare", "row_of", "cell_of"]
