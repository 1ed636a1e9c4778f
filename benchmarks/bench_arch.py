"""Planning facts from a config alone: how long ``from_config`` takes per preset (no weights).

``tensadapt.arch.from_config`` reads config attributes through the family table; nothing is
built. This measures the time of one call (config construction included, lazy imports warmed
first), the minimum over repeats, for every bundled preset. The tests check the property
(no module is built); the numbers live here, not in assertions.

Run: python benchmarks/bench_arch.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    from tensadapt.arch import PRESETS, from_config, preset_config

    from_config(preset_config("tiny-llama"))  # warm the lazy imports
    print("| preset | layers | sites | from_config (ms, min) |")
    print("| --- | ---: | ---: | ---: |")
    for name in PRESETS:
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            arch = from_config(preset_config(name))
            best = min(best, time.perf_counter() - start)
        print(f"| {name} | {arch.n_layers} | {len(arch.sites)} | {best * 1e3:.2f} |")


if __name__ == "__main__":
    main()
