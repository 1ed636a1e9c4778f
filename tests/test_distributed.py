"""Data-parallel training on the gloo backend: 2 processes (``torchrun``, loopback only) train
shared CP and Tucker factors on halves of a global batch; after N steps the factors equal a
single-process run on the whole batch. Three ways to hold the model:

- ``inplace-ddp``: the first API (``ta.inject`` in place) under DDP;
- ``object-ddp``: a :class:`~tensadapt.model.TensadaptModel` (its forward opens the executor's
  frame) under DDP;
- ``object-fsdp2``: the same object under FSDP2 (``torch.distributed.fsdp.fully_shard`` on each
  encoder layer, then on the root, where the shared factors are sharded and all-gathered).

One ``torchrun`` (fixture :func:`trained`) trains all three ways in turn, in the same two
worker processes, each way from a fresh model and into its own folder; each test then checks one
way against its own single-process run. (One launch instead of three: starting torchrun and two
workers that import torch and transformers costs more than the training.)

This file is also the worker script: ``torchrun ... tests/test_distributed.py OUT_DIR [WAY ...]``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WAYS = ("inplace-ddp", "object-ddp", "object-fsdp2")
SPECS = {
    "cp": {
        "factorization": "cp",
        "targets": ["q", "k", "v", "o"],
        "modes": ["heads", "qkv", "depth"],
        "rank": 4,
        "alpha": 8,
    },
    "tucker": {
        "factorization": "tucker",
        "targets": ["q", "k", "v"],
        "modes": ["qkv", "depth"],
        "rank": 3,
    },
}
STEPS = 4
GLOBAL_BATCH = 8
WORLD = 2


def global_batch() -> torch.Tensor:
    return torch.randint(0, 1000, (GLOBAL_BATCH, 6), generator=torch.Generator().manual_seed(42))


def make_model(name: str, way: str = "inplace-ddp") -> torch.nn.Module:
    """The same adapted model in every process: same base seed, same factor seed, random factors
    (so that every factor gets a gradient from step 1); adapted in place (``inplace-*``) or held
    by a :class:`TensadaptModel` (``object-*``)."""
    from conftest import build_model, randomize

    import tensadapt as ta
    from tensadapt.model import TensadaptModel

    model = build_model("tiny-bert", seed=0)
    if way.startswith("object"):
        model = TensadaptModel(model, SPECS[name], seed=0)
    else:
        ta.inject(model, SPECS[name], seed=0)
    randomize(model, scale=0.3, seed=1)
    return model


def train(model: torch.nn.Module, ids: torch.Tensor, forward: torch.nn.Module) -> None:
    """STEPS of SGD with momentum; the loss is a mean over this process's rows."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    for _ in range(STEPS):
        h = forward(input_ids=ids).last_hidden_state  # LayerNorm output: project, not |h|^2
        loss = (h @ torch.linspace(-1, 1, h.shape[-1])).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


def factors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors, whole (an FSDP2-sharded factor is gathered from every rank: a
    collective, so every rank calls this)."""
    from torch.distributed.tensor import DTensor

    from tensadapt.io import adapter_state

    state = adapter_state(model)
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}


def wrap(model: torch.nn.Module, way: str) -> torch.nn.Module:
    """``model`` prepared for data-parallel training ``way``; returns what to call forward on."""
    if way.endswith("ddp"):
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model)  # shared factors are ordinary parameters: one all-reduce each
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.encoder.layer:  # type: ignore[union-attr]
        fully_shard(layer)
    fully_shard(model)  # the root: embeddings, pooler and the shared factors (in the hub)
    from torch.distributed.tensor import DTensor, Shard

    from tensadapt.model import get_adapter

    for p in get_adapter(model).parameters():  # really sharded: each rank holds a part
        assert isinstance(p, DTensor) and p.placements == (Shard(0),), p.shape
    return model


def worker(out: Path, ways: list[str]) -> None:
    """One rank: its half of the global batch, for each of ``ways`` in turn (a fresh model each);
    rank 0 writes the factors to ``out/WAY/NAME.safetensors``."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = global_batch().chunk(world)[rank]
    for way in ways:
        (out / way).mkdir(parents=True, exist_ok=True)
        for name in SPECS:
            model = make_model(name, way)
            train(model, rows, wrap(model, way))
            state = factors(model)
            if rank == 0:
                save_file(state, str(out / way / f"{name}.safetensors"))
        dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_workers(out: Path, ways: list[str]) -> None:
    """``torchrun`` 2 worker processes training each of ``ways``; fails with their output if they
    fail."""
    here = Path(__file__).resolve()
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(here.parent), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc-per-node={WORLD}",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        str(here),
        str(out),
        *ways,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def check_equal_to_single_process(out: Path, way: str) -> None:
    from safetensors.torch import load_file

    for name in SPECS:
        model = make_model(name, way)
        start = {k: v.clone() for k, v in factors(model).items()}
        train(model, global_batch(), model)
        want = factors(model)
        got = load_file(str(out / way / f"{name}.safetensors"))
        assert set(got) == set(want)
        for k in want:
            assert not torch.equal(want[k], start[k]), f"{name}: {k} did not train"
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """The factors every way trained to, from one ``torchrun`` of 2 workers per test run.

    Under pytest-xdist the three tests may land on different worker processes (``--dist
    loadgroup`` no longer groups with pytest 9.2: pytest-dev/pytest-xdist#1386), so the launch is
    shared through the run's common temporary folder: the first worker to get here launches under
    a lock, the others wait for it and read what it wrote. (An ``fcntl`` lock: the workers are
    processes on one POSIX machine, which the kill tests already assume.)"""
    import fcntl

    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        root = root.parent  # shared by this run's xdist workers
    out = root / "distributed"
    with open(root / "distributed.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "done").exists():
            run_workers(out, list(WAYS))
            (out / "done").touch()
    return out


@pytest.mark.slow
def test_ddp_two_processes_equal_single_process(trained: Path) -> None:
    """The first API (``inject`` in place) under DDP."""
    check_equal_to_single_process(trained, "inplace-ddp")


@pytest.mark.slow
@pytest.mark.parametrize("way", [w for w in WAYS if w.startswith("object")])
def test_model_object_two_processes_equal_single_process(trained: Path, way: str) -> None:
    """A :class:`TensadaptModel` under DDP and under FSDP2 (gloo, CPU)."""
    check_equal_to_single_process(trained, way)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2:] or ["inplace-ddp"])
