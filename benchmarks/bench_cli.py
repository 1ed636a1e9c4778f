"""Start-up wall time of the ``tensadapt`` command line (issue 10 item 5).

Each command runs as a fresh process (``python -m tensadapt.cli ...``, so the checkout on
``PYTHONPATH`` is the one measured); the wall time from spawn to exit is taken ``--runs`` times,
interleaved across commands so that a burst of load hits all of them alike. Reported: median and
min–max per command, and whether the process imported torch (checked once per command with
``-X importtime``, which lists every module a process imports).

Commands: ``--help``, ``validate specs/lorta.yaml``, ``schema`` (none needs torch) and
``plan specs/lorta.yaml --model roberta-base`` (planning needs the architecture: torch-bound).

``--baseline DIR`` also measures another checkout (e.g. ``git archive <rev> | tar -x -C DIR``),
interleaved run by run with this one, so both see the same load.

Run: python benchmarks/bench_cli.py [--runs 9] [--baseline DIR] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

COMMANDS: dict[str, list[str]] = {
    "--help": ["--help"],
    "validate specs/lorta.yaml": ["validate", "specs/lorta.yaml"],
    "schema": ["schema"],
    "plan specs/lorta.yaml --model roberta-base": [
        "plan",
        "specs/lorta.yaml",
        "--model",
        "roberta-base",
    ],
}


def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_once(argv: list[str], root: Path = ROOT) -> float:
    """Wall seconds of one ``python -m tensadapt.cli ARGV`` in checkout ``root`` (must exit 0)."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "tensadapt.cli", *argv],
        cwd=root,
        env=_env(root),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"tensadapt {' '.join(argv)} exited {proc.returncode}: {proc.stderr}")
    return dt


def imports_torch(argv: list[str], root: Path = ROOT) -> bool:
    """Whether the command imports torch (``-X importtime`` lists each imported module)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "tensadapt.cli", *argv],
        cwd=root,
        env=_env(root),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    return any(line.split("|")[-1].strip() == "torch" for line in proc.stderr.splitlines())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=9, help="runs per command (default 9)")
    ap.add_argument("--baseline", type=Path, default=None, help="another checkout to compare")
    ap.add_argument("--markdown", action="store_true", help="print a RESULTS.md section")
    args = ap.parse_args()
    roots = {"this checkout": ROOT}
    if args.baseline is not None:
        roots = {"baseline": args.baseline.resolve(), **roots}
    times = {(r, k): [] for r in roots for k in COMMANDS}
    for root in roots.values():  # warm the file cache once
        for argv in COMMANDS.values():
            run_once(argv, root)
    load_before = os.getloadavg()
    for _ in range(args.runs):
        for name, argv in COMMANDS.items():
            for label, root in roots.items():
                times[(label, name)].append(run_once(argv, root))
    load_after = os.getloadavg()
    rows = [
        (
            label,
            name,
            statistics.median(ts),
            min(ts),
            max(ts),
            imports_torch(COMMANDS[name], roots[label]),
        )
        for (label, name), ts in times.items()
    ]
    loads = " / ".join(" ".join(f"{x:.1f}" for x in la) for la in (load_before, load_after))
    if args.markdown:
        base = f" --baseline {args.baseline}" if args.baseline else ""
        print(
            f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
            f"`python benchmarks/bench_cli.py --runs {args.runs}{base} --markdown`\n"
        )
        print(
            f"Machine: {platform.machine()} / {os.cpu_count()} cores / Python "
            f"{platform.python_version()}; load average before / after: {loads}.\n"
        )
        print("| checkout | command | median s | min–max s | imports torch |")
        print("| --- | --- | --- | --- | --- |")
        for label, name, med, lo, hi, tch in sorted(
            rows, key=lambda r: (list(COMMANDS).index(r[1]), r[0])
        ):
            print(
                f"| {label} | `tensadapt {name}` | {med:.3f} | {lo:.3f}–{hi:.3f} | "
                f"{'yes' if tch else 'no'} |"
            )
    else:
        for label, name, med, lo, hi, tch in rows:
            print(f"{label:<14} {name:<45} median {med:.3f} s ({lo:.3f}–{hi:.3f}) torch: {tch}")
        print(f"load average before / after: {loads}")


if __name__ == "__main__":
    main()
