"""DDP on the gloo backend: 2 processes (``torchrun``, loopback only) train shared CP and Tucker
factors on halves of a global batch; after N steps the factors equal a single-process run on the
whole batch.

This file is also the worker script: ``torchrun ... tests/test_distributed.py OUT_DIR``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

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


def make_model(name: str) -> torch.nn.Module:
    """The same adapted model in every process: same base seed, same factor seed, random factors
    (so that every factor gets a gradient from step 1)."""
    from conftest import build_model, randomize

    import tensadapt as ta

    model = build_model("tiny-bert", seed=0)
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
    from tensadapt.io import adapter_state

    return adapter_state(model)


def worker(out: Path) -> None:
    """One DDP rank: its half of the global batch; rank 0 writes the factors."""
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = global_batch().chunk(world)[rank]
    for name in SPECS:
        model = make_model(name)
        ddp = DDP(model)  # shared factors are ordinary parameters: one all-reduce each
        train(model, rows, ddp)
        if rank == 0:
            save_file(factors(model), str(out / f"{name}.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ddp_two_processes_equal_single_process(tmp_path: Path) -> None:
    from safetensors.torch import load_file

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
        str(tmp_path),
    ]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert time.time() - t0 < 60
    for name in SPECS:
        model = make_model(name)
        start = {k: v.clone() for k, v in factors(model).items()}
        train(model, global_batch(), model)
        want = factors(model)
        got = load_file(str(tmp_path / f"{name}.safetensors"))
        assert set(got) == set(want)
        for k in want:
            assert not torch.equal(want[k], start[k]), f"{name}: {k} did not train"
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
