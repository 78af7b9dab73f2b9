"""Report layer: JSON report, plots, tables and CI checks. Writers only: no maths here."""
