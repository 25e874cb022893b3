"""Reports: one self-contained HTML file with the routing-analysis tables and figures."""

from moekit.report.html import render_report

__all__ = ["render_report"]
