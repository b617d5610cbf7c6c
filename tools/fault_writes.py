"""Fault injection on writes: every command that writes is killed (SIGKILL, no handler runs) at
each step of its writes and at random moments, and run against a full disk (RLIMIT_FSIZE: a
write(2) past the limit fails with EFBIG, through libhdf5 and our code as ENOSPC does).

After each fault: the target is the old output or the complete new one (never a partial
file), the inputs are unchanged, a full disk is one error line with exit 6; the next run
succeeds and leaves no temporary file. A killed pretraining resumes from its last complete
checkpoint to the weights of an uninterrupted run.

Usage: python tools/fault_writes.py [--kills N] [--timed N] [--seed S] [--json OUT]
(--kills 0: every write step of every command; docs/reliability.md has the figures)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "tests" / "fixtures" / "bundles" / "small"
KANG = ROOT.parent / "shared" / "data" / "labelled" / "kang2018_pbmc_counts.h5ad"
N_CELLS = 60
DEADLINE = 120  # seconds: a command of these sizes that runs longer is a hang
TRAIN_SCENARIOS = ("evaluate --record", "export", "pretrain checkpoints")  # need torch
TRAIN = ["--batch-size", "8", "--max-steps", "4", "--checkpoint-every", "1", "--eval-every", "2"]


@dataclass
class Scenario:
    name: str
    prog: str  # scgpt-run or scgpt-train
    args: list[str]
    target: Path
    old: bytes | Path | None = None  # what is at the target before: bytes, a copy, nothing
    inputs: list[Path] = field(default_factory=list)
    compare: str | None = None  # for a run folder: the file that must equal the new one's

    @property
    def is_run(self) -> bool:
        """A training run: judged by what --resume makes of it, not by its files."""
        return self.compare is not None


def scenarios(work: Path, train: bool) -> list[Scenario]:
    data, out, parts = work / "in" / "kang.h5ad", work / "out", sorted((work / "parts").glob("*"))
    model = ["--model", str(BUNDLE)]

    def serve(name: str, args: list[str], target: Path) -> Scenario:
        return Scenario(
            name,
            "scgpt-run",
            [*args, "--out", str(target), "--overwrite"],
            target,
            b"old",
            [data, *parts],
        )

    found = [
        serve("annotate --out .h5ad", ["annotate", str(data), *model], out / "a.h5ad"),
        serve("annotate --out .csv", ["annotate", str(data), *model], out / "a.csv"),
        serve("embed --out .npy", ["embed", str(data), *model], out / "e.npy"),
        serve("merge", ["merge", *map(str, parts)], out / "m.h5ad"),
        serve(
            "reference build",
            ["reference", "build", str(data), *model, "--label-key", "cell_type"],
            out / "r.scref",
        ),
        Scenario(
            "annotate --inplace",
            "scgpt-run",
            ["annotate", str(work / "inplace.h5ad"), *model, "--inplace"],
            work / "inplace.h5ad",
            data,
        ),
    ]
    if train:
        bundle, tiny = work / "bundle", ["--config", str(work / "tiny.json")]
        found.append(
            Scenario(
                "evaluate --record",
                "scgpt-train",
                [
                    "evaluate",
                    "--bundle",
                    str(bundle),
                    "--data",
                    str(data),
                    "--label-key",
                    "cell_type",
                    "--record",
                ],
                bundle,
                BUNDLE,
                [data],
            )
        )
        found.append(
            Scenario(
                "export",
                "scgpt-train",
                [
                    "export",
                    str(work / "run"),
                    "--out",
                    str(out / "b"),
                    "--overwrite",
                    "--precision",
                    "fp32",
                    "--max-len",
                    "32",
                    "--validation-cells",
                    "8",
                ],
                out / "b",
                BUNDLE,
                [data],
            )
        )
        found.append(
            Scenario(
                "pretrain checkpoints",
                "scgpt-train",
                ["pretrain", "--data", str(data), "--out", str(work / "pre"), *TRAIN, *tiny],
                work / "pre",
                None,
                [data],
                "model.safetensors",
            )
        )
    return found


def prepare(work: Path, train: bool) -> None:
    import anndata as ad

    (work / "in").mkdir(parents=True)
    (work / "out").mkdir()
    ad.read_h5ad(KANG)[:N_CELLS].copy().write_h5ad(work / "in" / "kang.h5ad")
    data, parts = work / "in" / "kang.h5ad", work / "parts"
    parts.mkdir()
    for i in (1, 2):
        _main(
            "scgpt-run",
            [
                "annotate",
                str(data),
                "--model",
                str(BUNDLE),
                "--shard",
                f"{i}/2",
                "--out",
                str(parts / f"kang.{i}.part"),
            ],
        )
    if train:
        (work / "tiny.json").write_text(json.dumps({"tokens": {"max_seq_len": 32}}))
        _main(
            "scgpt-train",
            [
                "pretrain",
                "--data",
                str(data),
                "--out",
                str(work / "run"),
                *TRAIN,
                "--config",
                str(work / "tiny.json"),
            ],
        )


def _main(prog: str, args: list[str], **child: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, __file__, "--child", json.dumps(child), prog, *args]
    env = {**os.environ, "SOURCE_DATE_EPOCH": "0"}  # the same provenance time in every run
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=DEADLINE, check=False, env=env
    )


# The child: the command in this process, with write steps counted and a fault at one


def child(spec: dict, prog: str, args: list[str]) -> None:
    import resource
    import signal
    import threading

    if "fsize" in spec:  # a full disk: the write fails (EFBIG) instead of killing (SIGXFSZ)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(spec["fsize"]), resource.RLIM_INFINITY))
    if "after" in spec:
        threading.Timer(float(spec["after"]), os.kill, (os.getpid(), signal.SIGKILL)).start()
    count = _hook_writes(int(spec.get("kill_at", 0)), prog == "scgpt-train")
    if "count_to" in spec:
        import atexit

        atexit.register(lambda: Path(spec["count_to"]).write_text(str(count[0])))
    sys.argv = [prog, *args]
    if prog == "scgpt-run":
        from scgpt_runtime.cli import main
    else:
        from scgpt_export.cli import main
    main()


def _hook_writes(kill_at: int, torch: bool) -> list[int]:
    """Count the calls that write, rename or remove; SIGKILL before the `kill_at`-th."""
    import pathlib
    import signal

    import h5py
    import safetensors.numpy

    targets = [(os, n) for n in ("replace", "rename", "fsync", "unlink", "rmdir", "mkdir")]
    targets += [(shutil, n) for n in ("copyfile", "move", "rmtree")]
    targets += [(h5py.Group, n) for n in ("create_dataset", "create_group", "__setitem__")]
    targets += [(h5py.AttributeManager, "__setitem__"), (h5py.File, "close")]
    targets += [(pathlib.Path, "write_text"), (pathlib.Path, "write_bytes")]
    targets += [(safetensors.numpy, "save_file")]
    if torch:
        import safetensors.torch

        targets += [(safetensors.torch, "save_file")]
    count = [0]

    def hooked(fn):
        def call(*a, **k):
            count[0] += 1
            if count[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*a, **k)

        return call

    for owner, name in targets:
        setattr(owner, name, hooked(getattr(owner, name)))
    return count


# Checking what a fault left


def digest(s: Scenario) -> str | None:
    """What a target holds: its bytes' sha256; for a folder (a bundle) its files' but the
    hidden temporary ones (leftovers are counted apart); for a run, its weights'."""
    path = s.target / s.compare if s.compare else s.target
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(q for q in path.rglob("*") if q.is_file() and q.name[0] != "."):
            h.update(str(p.relative_to(path)).encode() + _sha(p).encode())
        return h.hexdigest()
    return _sha(path) if path.exists() else None


def _sha(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix in (".safetensors", ".scref"):
        # safetensors lays out tensors and metadata in hash-map order: hash the content
        with contextlib.suppress(ValueError, KeyError, TypeError):
            data = _tensors(data)
    return hashlib.sha256(data).hexdigest()


def _tensors(data: bytes) -> bytes:
    n = int.from_bytes(data[:8], "little")
    header, body = json.loads(data[8 : 8 + n]), data[8 + n :]
    out = [json.dumps(header.pop("__metadata__", None), sort_keys=True).encode()]
    for name in sorted(header):
        lo, hi = header[name]["data_offsets"]
        out += [name.encode(), str(header[name]["shape"]).encode(), body[lo:hi]]
    return b"\0".join(out)


def leftovers(s: Scenario) -> list[str]:
    """Hidden temporary files and folders beside the target (and inside a run folder)."""
    found = [p for p in s.target.parent.iterdir() if p.name.startswith(f".{s.target.name}.")]
    if s.target.is_dir():
        found += [p for p in s.target.rglob(".*") if p.name.endswith((".tmp", ".old"))]
    return sorted(str(p) for p in found)


def restore(s: Scenario) -> None:
    if s.target.is_dir():
        shutil.rmtree(s.target)
    elif s.target.exists():
        s.target.unlink()
    if isinstance(s.old, bytes):
        s.target.write_bytes(s.old)
    elif isinstance(s.old, Path):
        (shutil.copytree if s.old.is_dir() else shutil.copyfile)(s.old, s.target)


def one_line_error(r: subprocess.CompletedProcess, code: int) -> str | None:
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    if r.returncode != code or len(errors) != 1 or "Traceback" in r.stderr:
        return f"exit {r.returncode}: {r.stderr.strip().splitlines()[-1:] or ['(no output)']}"
    return None


def check_resume(s: Scenario, final: dict[str, object]) -> str | None:
    """A killed pretraining: --resume finishes it with the uninterrupted weights, or, before
    its first checkpoint, says in one line that there is nothing to resume."""
    import numpy as np
    from safetensors.numpy import load_file

    before = (s.target / "checkpoints" / "latest").exists()
    r = _main("scgpt-train", ["pretrain", "--out", str(s.target), "--resume"])
    if not before and r.returncode != 0:  # nothing to resume yet: one line that says so
        return one_line_error(r, 3)
    if r.returncode != 0:
        return f"--resume failed: {one_line_error(r, 0)}"
    got = load_file(s.target / "model.safetensors")
    if any(not np.allclose(got[k], v, rtol=1e-5, atol=1e-6) for k, v in final.items()):
        return "--resume ended with weights other than the uninterrupted run's"
    return None


def fault_runs(
    s: Scenario, events: int, duration: float, kills: int, timed: int, rng: random.Random
) -> list[dict]:
    """The faults to inject: kills at write steps, kills at moments, full disks."""
    steps = list(range(1, events + 1))
    chosen = steps if kills == 0 or kills >= events else sorted(rng.sample(steps, kills))
    faults = [{"kill_at": n} for n in chosen]
    faults += [{"after": round(rng.uniform(0.2, 1.0) * duration, 3)} for _ in range(timed)]
    size = max((p.stat().st_size for p in _written(s)), default=1 << 20)
    return faults + [{"fsize": max(1, int(size * f))} for f in (0.0, 0.3, 0.9)]


def _written(s: Scenario) -> list[Path]:
    if s.target.is_dir():
        return [p for p in s.target.rglob("*") if p.is_file()]
    return [s.target] if s.target.exists() else []


def run_scenario(s: Scenario, work: Path, kills: int, timed: int, rng: random.Random) -> dict:
    restore(s)
    count = work / "count"
    t0 = time.perf_counter()
    clean = _main(s.prog, s.args, count_to=str(count))
    duration = time.perf_counter() - t0
    if clean.returncode != 0:
        raise SystemExit(f"{s.name}: the uninterrupted run failed: {clean.stderr[-2000:]}")
    new, events = digest(s), int(count.read_text())
    final = {}
    if s.is_run:
        from safetensors.numpy import load_file

        final = load_file(s.target / "model.safetensors")
    inputs = {p: _sha(p) for p in s.inputs}
    failures, kinds = [], Counter()
    for fault in fault_runs(s, events, duration, kills, timed, rng):
        restore(s)
        old = digest(s)
        r = _main(s.prog, s.args, **{k: str(v) for k, v in fault.items()})
        kind = next(iter(fault))
        kinds[kind] += 1
        problem = _judge(s, r, fault, old, new, final)
        if any(_sha(p) != h for p, h in inputs.items()):
            problem = "an input was modified"
        if problem:
            failures.append({"scenario": s.name, "fault": fault, "problem": problem})
    restore(s)
    r = _main(s.prog, s.args)  # the next run after all those faults: clean, no leftovers
    if r.returncode != 0 or leftovers(s) or digest(s) != new:
        failures.append(
            {
                "scenario": s.name,
                "fault": "none, after the faults",
                "problem": f"exit {r.returncode}, leftovers {leftovers(s)}",
            }
        )
    return {
        "scenario": s.name,
        "write_steps": events,
        "seconds": round(duration, 2),
        "faults": dict(kinds),
        "failures": failures,
    }


def _judge(s, r, fault, old, new, final) -> str | None:
    if r.returncode == 0:  # the fault came too late (or the write fitted)
        return None if digest(s) == new else "exit 0 with a target other than the new"
    if "fsize" in fault:
        if (err := one_line_error(r, 6)) is not None:
            return f"full disk: {err}"
        if not s.is_run and digest(s) != old:
            return "full disk: the target changed"
        if not s.is_run and leftovers(s):
            return f"full disk: temporary files left: {leftovers(s)}"
        return None
    if r.returncode != -9:
        return f"killed, yet exit {r.returncode}: {r.stderr[-300:]}"
    if s.is_run:
        return check_resume(s, final)
    if digest(s) not in (old, new):
        return "a partial target: neither the old output nor the new"
    return None


def faults(work: Path, kills: int, timed: int, seed: int, only: list[str] | None = None) -> dict:
    """Inject the faults into every scenario (or those named in `only`); the report."""
    rng = random.Random(seed)
    train = only is None or any(n in TRAIN_SCENARIOS for n in only)
    prepare(work, train)
    chosen = [s for s in scenarios(work, train) if only is None or s.name in only]
    t0 = time.perf_counter()
    results = [run_scenario(s, work, kills, timed, rng) for s in chosen]
    return {
        "seed": seed,
        "minutes": round((time.perf_counter() - t0) / 60, 1),
        "faults": sum(sum(r["faults"].values()) for r in results),
        "scenarios": results,
        "failures": [f for r in results for f in r["failures"]],
    }


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        return child(json.loads(sys.argv[2]), sys.argv[3], sys.argv[4:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=0, help="write steps killed per command (0: all)")
    p.add_argument("--timed", type=int, default=5, help="kills at random moments per command")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", action="append", help="a scenario by name; repeatable")
    p.add_argument("--json", type=Path, help="write the report here too")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as work:
        report = faults(Path(work), a.kills, a.timed, a.seed, a.only)
    text = json.dumps(report, indent=2)
    if a.json:
        a.json.write_text(text + "\n")
    print(text)
    sys.exit(1 if report["failures"] else 0)


if __name__ == "__main__":
    main()
