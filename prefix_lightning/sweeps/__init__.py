"""Sweeps: a sweep's result records (written by each run, ``training/record.py``) aggregated into tables, plots, a
paired comparison of two methods and one report, and the Hydra callbacks that aggregate when a multirun ends and
close each job's W&B run."""
