"""Fuzz scgpt-run with broken inputs (tools/fuzz_corpus.py) and count what goes wrong.

Every case is a broken copy of a seed, run through the commands that read it: count files
through `inspect --json`, `annotate --out .csv` and `embed --out .h5ad` (with the test bundle,
--min-gene-fraction 0 so reading goes on to the counts); bundles through `info` and
`annotate`; references through `reference info` and `annotate --reference`. Each command runs
in a worker process (in-process click, many cases per worker) with a deadline; a worker that
does not answer in time is killed (a hang), one that dies is a crash. Per command it checks:

- outcome: exit 0, or a documented error exit (2-6) whose stderr is one line "Error: ...";
  exit 1 or a Python traceback is a bug;
- the input's bytes are unchanged (sha256);
- nothing partial: after an error neither the output nor a hidden temporary file exists.

    python tools/fuzz_inputs.py --minutes 10 [--seed 0] [--workdir /tmp/fuzz] [--json OUT]
    python tools/fuzz_inputs.py --cases 150            # a fixed number of cases instead
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from fuzz_corpus import (
    BUNDLE,
    BYTE_MUTATIONS,
    STRUCT_MUTATIONS,
    make_seeds,
    mutate_bundle,
    mutate_file,
)

DEADLINE = 60.0  # seconds for one command on a seed of at most 2.4 MB: more is a hang
PROBE_DEADLINE = 3.0  # the metadata probe's (io/probe.py): these files' metadata reads in 0.2 s
ERROR_EXITS = {2, 3, 4, 5, 6}
FILE_MUTATIONS = ["truncate", "flip superblock", "flip anywhere"]  # bundles, references: not HDF5


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=None)
    p.add_argument("--cases", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/fuzz"))
    p.add_argument("--json", type=Path)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker()
    if (args.minutes is None) == (args.cases is None):
        p.error("give --minutes or --cases")
    report = fuzz(args.workdir, args.seed, args.cases, args.minutes)
    print(json.dumps({k: v for k, v in report.items() if k != "failures"}, indent=1))
    for f in report["failures"][:20]:
        print(f, file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    sys.exit(1 if report["failures"] else 0)


def fuzz(workdir: Path, seed: int, n_cases: int | None, minutes: float | None) -> dict:
    """Run cases until `n_cases` are done or `minutes` have passed; the tally and failures."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    files = make_seeds(workdir)
    reference = build_reference(workdir, files[0])
    rng = np.random.default_rng(seed)
    stop = time.monotonic() + 60 * minutes if minutes else None
    tally: Counter = Counter()
    kinds: Counter = Counter()
    failures: list[dict] = []
    runner = Runner()
    i = 0
    try:
        while (n_cases is None or i < n_cases) and (stop is None or time.monotonic() < stop):
            case = make_case(workdir / f"case{i}", i, rng, files, reference)
            i += 1
            if case is None:
                continue
            kinds[case["kind"]] += 1
            failed = len(failures)
            for args, src, out in case["commands"]:
                result = runner.run(args, src, out)
                tally[result["outcome"]] += 1
                for flag in ("modified", "partial"):
                    tally[flag] += int(result[flag])
                if (
                    result["outcome"] in ("bug", "hang", "crash")
                    or result["modified"]
                    or result["partial"]
                ):
                    failures.append({"case": case["name"], "args": args, **result})
            if len(failures) == failed:  # a failing case stays, to be run again
                shutil.rmtree(workdir / f"case{i - 1}", ignore_errors=True)
    finally:
        runner.close()
    return {
        "seed": seed,
        "cases": sum(kinds.values()),
        "cases_by_kind": dict(kinds),
        "commands": sum(tally[k] for k in ("ok", "error", "bug", "hang", "crash")),
        **{k: tally[k] for k in ("ok", "error", "bug", "hang", "crash", "modified", "partial")},
        "failures": failures,
    }


def build_reference(workdir: Path, cells: Path) -> Path:
    """A reference of the test bundle from the first seed's labelled cells."""
    from click.testing import CliRunner

    from scgpt_runtime.cli import cli

    ref = workdir / "seed.scref"
    args = ["reference", "build", str(cells), "--model", str(BUNDLE), "--out", str(ref)]
    result = CliRunner().invoke(cli, [*args, "--label-key", "cell_type"])
    if result.exit_code:
        raise SystemExit(f"building the seed reference failed: {result.output}")
    return ref


def make_case(
    folder: Path, i: int, rng: np.random.Generator, files: list[Path], reference: Path
) -> dict | None:
    """One broken input and the commands that read it; None where the mutation does not apply."""
    folder.mkdir()
    pick = rng.random()  # 70% count files, 15% bundles, 15% references
    out = folder / "out"
    cells = files[0]
    if pick < 0.7:  # a count file
        src = files[int(rng.integers(len(files)))]
        kind = "10x" if src.suffix == ".h5" else "h5ad"
        mutation = str(rng.choice([*BYTE_MUTATIONS, *STRUCT_MUTATIONS]))
        path = folder / src.name
        if not mutate_file(src, path, mutation, rng):
            return None
        opts = ["--model", str(BUNDLE), "--min-gene-fraction", "0"]
        commands = [
            (["inspect", str(path), "--json"], path, None),
            (["annotate", str(path), *opts, "--out", f"{out}.csv"], path, Path(f"{out}.csv")),
            (["embed", str(path), *opts, "--out", f"{out}.h5ad"], path, Path(f"{out}.h5ad")),
        ]
    elif pick < 0.85:  # a bundle
        kind, mutation = "bundle", str(rng.choice(FILE_MUTATIONS))
        path = folder / "bundle"
        if not mutate_bundle(BUNDLE, path, mutation, rng):
            return None
        commands = [
            (["info", str(path), "--json"], path, None),
            _annotate(cells, out, path, "--model", str(path)),
        ]
        src = BUNDLE
    else:  # a reference
        kind, mutation = "reference", str(rng.choice(FILE_MUTATIONS))
        path = folder / "ref.scref"
        if not mutate_file(reference, path, mutation, rng):
            return None
        commands = [
            (["reference", "info", str(path), "--json"], path, None),
            _annotate(cells, out, path, "--model", str(BUNDLE), "--reference", str(path)),
        ]
        src = reference
    return {"name": f"{i}: {kind} {src.name}: {mutation}", "kind": kind, "commands": commands}


def _annotate(cells: Path, out: Path, broken: Path, *options: str) -> tuple:
    """annotate CELLS with a broken bundle or reference: (arguments, input, output)."""
    args = ["annotate", str(cells), *options, "--min-gene-fraction", "0", "--out", f"{out}.csv"]
    return args, broken, Path(f"{out}.csv")


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


class Runner:
    """A worker process running commands in-process, restarted after a hang or a crash."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        cmd = [sys.executable, __file__, "--worker"]
        return subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )

    def run(self, args: list[str], src: Path, out: Path | None) -> dict:
        before = digest(src)
        self.proc = self.proc or self._start()
        self.proc.stdin.write(json.dumps(args) + "\n")
        self.proc.stdin.flush()
        line = _readline(self.proc, DEADLINE)
        if line is None:
            outcome, detail = ("hang", "") if self.proc.poll() is None else ("crash", "")
            if outcome == "crash":
                detail = f"worker exited {self.proc.returncode}"
            self.close()
        else:
            answer = json.loads(line)
            detail = answer["exception"] or answer["stderr"][-400:]
            outcome = _outcome(answer)
        partial = False
        if out is not None and outcome != "ok":
            hidden = list(out.parent.glob(f".{out.name}.*"))
            partial = out.exists() or bool(hidden)
        return {
            "outcome": outcome,
            "modified": digest(src) != before,
            "partial": partial,
            "detail": detail,
        }

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def _readline(proc: subprocess.Popen, timeout: float) -> str | None:
    """One line from the worker within `timeout` seconds, else None."""
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return None
    line = proc.stdout.readline()
    return line or None


def _outcome(answer: dict) -> str:
    if answer["exception"] is not None or answer["code"] not in {0, *ERROR_EXITS}:
        return "bug"
    if answer["code"] == 0:
        return "ok"
    lines = answer["stderr"].strip().splitlines()
    last = lines[-1] if lines else ""
    return "error" if last.startswith("Error: ") and "Traceback" not in answer["stderr"] else "bug"


def worker() -> None:
    """Read commands (JSON lists) from stdin, run each with click, answer one JSON line."""
    import traceback
    import warnings

    from click.testing import CliRunner

    import scgpt_runtime.io.probe
    from scgpt_runtime.cli import cli

    scgpt_runtime.io.probe.DEADLINE = PROBE_DEADLINE
    warnings.simplefilter("ignore")
    for line in sys.stdin:
        result = CliRunner().invoke(cli, ["-q", *json.loads(line)])
        exc = result.exception
        bug = exc is not None and not isinstance(exc, SystemExit)
        answer = {
            "code": result.exit_code,
            "stderr": result.stderr,
            "exception": "".join(traceback.format_exception(exc))[-2000:] if bug else None,
        }
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
