"""A save is all-or-nothing (issue 12): after a crash, a full disk or a concurrent save at any
instant, the directory loads as exactly the old adapter or exactly the new one, never a mix, and
no temporary file outlives the next save.

- Real kills: a forked child saves two adapters alternately in a loop and is SIGKILLed after a
  random delay, :data:`KILLS` times; every time, the directory loads as one of the two, bit for bit.
- Injected disk-full: ``OSError(ENOSPC)`` at every write step of a save (the partial tensors file,
  its fsync, its rename, the config, ...), one step per attempt.
- A real full disk: a small tmpfs, at several sizes (skipped where mounting is not allowed).
- Concurrent saves from two processes into one directory.
- File modes follow the umask.

The figures of the last run (kills that landed mid-write, ...) are printed with ``-s``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_model, randomize

import tensadapt as ta
import tensadapt.io as tio
from tensadapt.io import AdapterSaveError, adapter_state

pytestmark = pytest.mark.slow

SPEC = {"factorization": "cp", "modes": ["qkv", "depth"], "targets": ["q", "k", "v"], "rank": 8}
#: how many random kills the kill test makes
KILLS = 24


def _adapted(seed: int, rank: int = 8) -> torch.nn.Module:
    model = build_model("tiny-bert")
    ta.inject(model, {**SPEC, "rank": rank}, seed=0)
    randomize(model, seed=seed)
    return model


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in adapter_state(model).items()}


def _loaded(d: Path) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a stale readable config is reported, and fine here
        model = ta.load_adapter(build_model("tiny-bert"), d)
    return _snapshot(model)


def _which(got: dict[str, torch.Tensor], *candidates: dict[str, torch.Tensor]) -> int:
    """The index of the candidate ``got`` equals exactly; fails when it is none of them."""
    for i, c in enumerate(candidates):
        if got.keys() == c.keys() and all(torch.equal(got[k], c[k]) for k in c):
            return i
    raise AssertionError(f"loaded adapter is none of the {len(candidates)} saved ones (a mix)")


def _temp_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


def test_random_kills_leave_old_or_new(tmp_path: Path) -> None:
    d = tmp_path / "ad"
    a, b = _adapted(1), _adapted(2)
    sa, sb = _snapshot(a), _snapshot(b)
    ta.save_adapter(a, d)
    rng = random.Random(0)
    seen = {0: 0, 1: 0}
    mid_write = 0
    for _ in range(KILLS):
        pid = os.fork()
        if pid == 0:  # the child: save b, a, b, a ... until killed
            try:
                torch.set_num_threads(1)
                while True:
                    ta.save_adapter(b, d)
                    ta.save_adapter(a, d)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, 0.08))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        mid_write += bool(_temp_files(d))
        seen[_which(_loaded(d), sa, sb)] += 1
    ta.save_adapter(a, d)  # the next save removes what killed saves left
    assert _temp_files(d) == []
    assert _which(_loaded(d), sa, sb) == 0
    print(f"\n{KILLS} kills: old/new loaded {seen[0]}/{seen[1]}, {mid_write} landed mid-write")
    assert seen[0] + seen[1] == KILLS


@contextlib.contextmanager
def _fail_at(step: int | None, counter: list[int]) -> Iterator[None]:
    """Count every write step of a save; raise ``OSError(ENOSPC)`` at step ``step`` (1-based).
    The tensors writer writes half of its file before failing, as a full disk does."""
    real_save, real_fsync, real_replace = tio.save_file, os.fsync, os.replace
    real_write_text = Path.write_text

    def tick() -> bool:
        counter[0] += 1
        return step is not None and counter[0] == step

    def save_file(state: Any, path: str, metadata: Any = None) -> None:
        if tick():
            real_save(state, path, metadata=metadata)
            with open(path, "r+b") as fh:
                fh.truncate(os.path.getsize(path) // 2)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(state, path, metadata=metadata)

    def wrap(real: Callable[..., Any]) -> Callable[..., Any]:
        def f(*args: Any, **kwargs: Any) -> Any:
            if tick():
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(*args, **kwargs)

        return f

    tio.save_file = save_file  # type: ignore[assignment]
    os.fsync = wrap(real_fsync)
    os.replace = wrap(real_replace)
    Path.write_text = wrap(real_write_text)  # type: ignore[method-assign]
    try:
        yield
    finally:
        tio.save_file = real_save  # type: ignore[assignment]
        os.fsync, os.replace = real_fsync, real_replace
        Path.write_text = real_write_text  # type: ignore[method-assign]


def test_disk_full_at_every_write_step(tmp_path: Path) -> None:
    a, b = _adapted(1), _adapted(2, rank=16)
    sa, sb = _snapshot(a), _snapshot(b)
    d = tmp_path / "ad"
    counter = [0]
    ta.save_adapter(a, d)
    with _fail_at(None, counter):
        ta.save_adapter(b, d)
    steps = counter[0]
    assert steps >= 5  # tensors, fsync, rename, config, fsync, rename, directory fsync
    outcomes = []
    for step in range(1, steps + 1):
        ta.save_adapter(a, d)
        counter[0] = 0
        with _fail_at(step, counter), contextlib.suppress(AdapterSaveError):
            ta.save_adapter(b, d)
        outcomes.append(_which(_loaded(d), sa, sb))
        assert _temp_files(d) == [], f"step {step} left {_temp_files(d)}"
    assert 0 in outcomes and 1 in outcomes  # failures before the commit keep the old one
    print(f"\nENOSPC at each of {steps} write steps: old/new = {outcomes}")


def _mount_tmpfs(where: Path, size: int) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    return proc.returncode == 0


def test_real_full_disk_on_a_small_tmpfs(tmp_path: Path) -> None:
    a, b = _adapted(1), _adapted(2, rank=48)
    sa, sb = _snapshot(a), _snapshot(b)
    probe = tmp_path / "probe"
    ta.save_adapter(a, probe / "a")
    ta.save_adapter(b, probe / "b")
    size_a = sum(p.stat().st_size for p in (probe / "a").iterdir())
    size_b = sum(p.stat().st_size for p in (probe / "b").iterdir())
    results = []
    for frac in (0.1, 0.3, 0.5, 0.7, 0.9, 1.5):
        mnt = tmp_path / f"fs{frac}"
        # tmpfs sizes are whole pages; the old adapter always fits, part of the new one may not
        size = size_a + int(frac * size_b) + 8192
        if not _mount_tmpfs(mnt, size):
            pytest.skip(
                "mounting a tmpfs is not allowed here (the ENOSPC injection test covers it)"
            )
        try:
            d = mnt / "ad"
            ta.save_adapter(a, d)
            failed = False
            try:
                ta.save_adapter(b, d)
            except AdapterSaveError as e:
                failed = True
                assert "disk full" in str(e)
            results.append((frac, failed, _which(_loaded(d), sa, sb)))
            assert _temp_files(d) == []
        finally:
            subprocess.run(["umount", str(mnt)], capture_output=True)
    assert any(r[1] for r in results)  # some sizes really filled the disk
    assert all(r[2] == (0 if r[1] else 1) for r in results)  # failed: old; succeeded: new
    print(f"\ntmpfs disk-full: (size fraction, failed, loaded old=0/new=1) {results}")


def test_concurrent_saves_never_mix(tmp_path: Path) -> None:
    d = tmp_path / "ad"
    a, b = _adapted(1), _adapted(2)
    sa, sb = _snapshot(a), _snapshot(b)
    pids = []
    for model in (a, b):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                torch.set_num_threads(1)
                for _ in range(15):
                    ta.save_adapter(model, d)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        pids.append(pid)
    for pid in pids:
        assert os.waitpid(pid, 0)[1] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # serialised saves: the readable config is never stale
        model = ta.load_adapter(build_model("tiny-bert"), d)
    _which(_snapshot(model), sa, sb)
    assert _temp_files(d) == []


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_file_modes_follow_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        d = ta.save_adapter(_adapted(1), tmp_path / "ad")
    finally:
        os.umask(old)
    for name in ("adapter.safetensors", "adapter_config.json"):
        assert (d / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
