"""Wall time of the test suite against an older checkout (issue 14: "the full suite ... in less
wall time than today's").

Two suites differ in their tests as well as in the code, so the comparison that says whether the
code and the test set-up got faster is the *same tests*: the ids both checkouts collect (a renamed
or new test is in one list only). Each round runs that common set in the baseline checkout, then
in this one (``python -m pytest -q -n WORKERS --dist loadgroup -p no:cacheprovider @IDS``, the
checkout first on ``PYTHONPATH`` and as working folder), so that load hits both alike. With
``--whole`` each round also runs each checkout's whole suite. Reported: median and min–max wall
seconds per suite, and the ratio of the medians.

Make a baseline checkout with e.g. ``git worktree add /tmp/base <rev>`` (the editable install of
this checkout's plugins serves both).

Run: python benchmarks/bench_suite.py --baseline DIR [--runs 3] [--workers 2] [--whole]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cli import ROOT, _env  # noqa: E402  (a checkout first on PYTHONPATH)


def collect(root: Path) -> set[str]:
    """The test ids ``pytest --collect-only`` finds in checkout ``root``."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=root,
        env=_env(root),
        capture_output=True,
        text=True,
        check=True,
    )
    return {line for line in proc.stdout.splitlines() if "::" in line}


def run_suite(root: Path, workers: int, ids: Path | None) -> float:
    """Wall seconds of one pytest run in ``root`` (the ids in file ``ids``, or everything); the
    run must pass."""
    argv = [sys.executable, "-m", "pytest", "-q", "-n", str(workers), "--dist", "loadgroup"]
    argv += ["-p", "no:cacheprovider"] + ([f"@{ids}"] if ids is not None else [])
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=root, env=_env(root), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{root}: pytest failed\n{proc.stdout[-3000:]}")
    return wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--baseline", type=Path, required=True, help="the older checkout")
    ap.add_argument("--runs", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--workers", type=int, default=2, help="pytest-xdist workers (default 2)")
    ap.add_argument("--whole", action="store_true", help="also each checkout's whole suite")
    args = ap.parse_args(argv)
    base = args.baseline.resolve()

    base_ids, ids = collect(base), collect(ROOT)
    common = sorted(base_ids & ids)
    with tempfile.TemporaryDirectory() as tmp:
        id_file = Path(tmp) / "common.txt"
        id_file.write_text("\n".join(common) + "\n")
        suites = [("common", id_file)] + ([("whole", None)] if args.whole else [])
        times: dict[tuple[str, str], list[float]] = {}
        for r in range(args.runs):
            for name, file in suites:
                for label, root in (("baseline", base), ("this", ROOT)):
                    t = run_suite(root, args.workers, file)
                    times.setdefault((name, label), []).append(t)
                    print(f"round {r + 1} {name:6s} {label:8s} {t:7.1f} s", flush=True)

    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"-n {args.workers}, {args.runs} rounds; tests: baseline {len(base_ids)}, "
        f"this {len(ids)}, common {len(common)}"
    )
    print("| suite | checkout | tests | median s | min-max s |")
    print("|---|---|---|---|---|")
    for name, _ in suites:
        for label, n in (("baseline", len(base_ids)), ("this", len(ids))):
            ts = times[(name, label)]
            count = len(common) if name == "common" else n
            print(
                f"| {name} | {label} | {count} | {statistics.median(ts):.1f} | "
                f"{min(ts):.1f}-{max(ts):.1f} |"
            )
        ratio = statistics.median(times[(name, "this")]) / statistics.median(
            times[(name, "baseline")]
        )
        print(f"| {name} | this / baseline | | {ratio:.2f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
