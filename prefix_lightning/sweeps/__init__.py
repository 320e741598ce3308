"""Sweeps: per-run result records, skipping and resuming sweep jobs, aggregation into tables, plots and a report,
and what reaches the dashboards (W&B, TensorBoard) beyond Lightning's metric logging."""
