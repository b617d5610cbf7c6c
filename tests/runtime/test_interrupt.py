"""Ctrl-C and SIGTERM: exit 130 and 143, and no output or temporary file left behind.

The signal is sent from inside the final write (the fsync before the rename), the moment the
issue found a 50 MB hidden temporary file left in the output folder.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from scgpt_runtime.cli import cli
from scgpt_runtime.io import atomic


@pytest.mark.parametrize(
    ("how", "code", "word"),
    [
        (lambda: os.kill(os.getpid(), signal.SIGTERM), 143, "terminated"),
        (lambda: (_ for _ in ()).throw(KeyboardInterrupt), 130, "interrupted"),
    ],
    ids=["SIGTERM", "Ctrl-C"],
)
def test_an_interrupted_write_leaves_nothing(
    kang_small, served_bundle, tmp_path, monkeypatch, how, code, word
):
    def interrupted(path: Path) -> None:
        how()

    monkeypatch.setattr(atomic, "_fsync", interrupted)
    out = tmp_path / "out.h5ad"
    args = ["annotate", kang_small, "--model", served_bundle, "--out", out]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == code, result.output
    assert result.output.strip().splitlines()[-1] == f"Error: {word}"
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []  # neither the output nor a hidden temporary file


def test_sigterm_while_serving_ends_the_process_at_once(kang, served_bundle, tmp_path):
    """The real signal from outside (what timeout and Slurm send), while the model runs (the
    whole Kang file one cell at a time takes far longer than the signal takes to arrive): no
    handler runs outside a write, so the process dies of the signal (143 in a shell) even
    where a library call never returns, and nothing has been written yet."""
    out = tmp_path / "emb.npy"
    cmd = [sys.executable, "-c", "from scgpt_runtime.cli import main; main()"]
    cmd += ["embed", str(kang), "--model", str(served_bundle), "--out", str(out)]
    cmd += ["--batch-size", "1", "--threads", "1"]
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    for line in p.stderr:  # serving once the log names the graphs
        if "graphs on" in line:
            break
    p.send_signal(signal.SIGTERM)
    err = p.stderr.read()
    assert p.wait(timeout=60) == -signal.SIGTERM, err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
