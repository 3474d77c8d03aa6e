"""Comparison tables and plots over the results store (`results/<model>/<slug>.json`).

`python -m wkvaq_quant.report results/ [--format md|csv] [--plot out.png] [--heatmap out.png]`
"""

from .plots import plot_kv_bits, plot_layer_heatmap
from .table import Row, Table, build_table, format_csv, format_markdown, load_records

__all__ = ["Row", "Table", "build_table", "format_csv", "format_markdown", "load_records", "plot_kv_bits",
           "plot_layer_heatmap"]
