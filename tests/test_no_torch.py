"""The runtime never imports torch, directly or through a dependency."""

from __future__ import annotations

import subprocess
import sys

BLOCK_TORCH = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import scgpt_runtime, scgpt_runtime.cli, scgpt_runtime.io, scgpt_runtime.tokens
from click.testing import CliRunner
result = CliRunner().invoke(scgpt_runtime.cli.cli, ["inspect", "--help"])
assert result.exit_code == 0, result.output
heavy = {"torch", "scipy", "pandas", "anndata"}
loaded = sorted(m for m, mod in sys.modules.items() if mod and m.split(".")[0] in heavy)
assert not loaded, loaded
print("ok")
"""


def test_runtime_imports_without_torch():
    out = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
