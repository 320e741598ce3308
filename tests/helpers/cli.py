"""The project's commands run as a user types them: a fresh Python process in the repository root."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from tests.helpers.config import REPO

# A hung command fails its test instead of stalling the suite (pytest's own timeout is the outer bound).
COMMAND_TIMEOUT_S = 600

# Two epochs of 4 batches on the tiny Llama, validating (and checkpointing) after each.
FAST = [
    "model=tiny_llama",
    "debug=fast",
    # The last step's weights: a tiny random model's validation BLEU stays 0, so its best checkpoint is the first.
    "export=last",
    "trainer.max_steps=8",
    "trainer.val_check_interval=4",
    "callbacks.model_checkpoint.save_top_k=-1",
]


def run_python(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = COMMAND_TIMEOUT_S, new_session: bool = False
) -> subprocess.CompletedProcess:
    """``python <args>`` from the repository root, in this environment plus ``env``, output captured; with
    ``new_session``, in a process group of its own (as a terminal starts a command: Ctrl-C signals that group)."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        preexec_fn=_as_a_terminal_starts_it,
        start_new_session=new_session,
    )


def _as_a_terminal_starts_it() -> None:
    """Ctrl-C interrupts the command even where the tests run in a background job (whose children start with SIGINT
    ignored), as it does for a user at a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(
    run_dir: Path,
    *overrides: str,
    entry: tuple[str, ...] = ("run.py",),
    env: Mapping[str, str] | None = None,
    timeout: float = COMMAND_TIMEOUT_S,
) -> subprocess.CompletedProcess:
    """``python run.py <overrides>`` (or another entry point) writing into ``run_dir``; it must succeed."""
    result = run_python(*entry, f"hydra.run.dir={run_dir}", *overrides, env=env, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_failing(
    run_dir: Path, *overrides: str, env: Mapping[str, str] | None = None, new_session: bool = False
) -> subprocess.CompletedProcess:
    """``python run.py <overrides>`` that must fail; the test reads what it said."""
    result = run_python("run.py", f"hydra.run.dir={run_dir}", *overrides, env=env, new_session=new_session)
    assert result.returncode != 0, result.stdout[-3000:]
    return result
