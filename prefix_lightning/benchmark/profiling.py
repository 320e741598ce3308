"""Where a step's time goes: one training step or decoding batch under torch.profiler (a trace to open in
Perfetto or chrome://tracing and a table of the costliest operators), and on CUDA every host-device
synchronisation it makes, counted by the Python line that caused it."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile


@contextmanager
def profiled(folder: str, name: str, device: str) -> Iterator[dict[str, Any]]:
    """Profile the block; writes ``<folder>/<name>.trace.json`` and ``<name>.txt`` and fills the yielded dict with
    the files and, on CUDA, ``syncs`` (how many) and ``sync_sites`` (the lines that made them, most first)."""
    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    found: dict[str, Any] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with profile(activities=activities, record_shapes=True) as profiler:
                yield found
            if cuda:
                torch.cuda.synchronize(device)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    trace, table = out / f"{name}.trace.json", out / f"{name}.txt"
    profiler.export_chrome_trace(str(trace))
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table.write_text(profiler.key_averages().table(sort_by=sort, row_limit=40) + "\n")
    found.update(trace=str(trace), table=str(table))
    if cuda:
        sites = Counter(f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
        found.update(syncs=sum(sites.values()), sync_sites=[f"{site} x{count}" for site, count in sites.most_common()])
