"""ebood.report: the benchmark report (one self-contained HTML page) and the terminal results table.

* :func:`write_report` renders ``report.html`` in a results directory from ``results.json`` and
  ``scores.safetensors`` (the layout the benchmark runner writes).
* :func:`results_table` is the rich table ``ebood bench`` prints (and :func:`failure_results_table`
  the failure-detection one, when the ID labels were known).
* :func:`load_results` reads and checks ``results.json``; problems raise :class:`ReportError`.
"""

from __future__ import annotations

from .html import figure_pairs, render_report, write_report
from .results import ReportError, Results, load_results
from .terminal import failure_results_table, results_table

__all__ = ["write_report", "render_report", "results_table", "failure_results_table", "load_results", "Results", "ReportError", "figure_pairs"]
