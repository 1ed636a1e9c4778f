"""Shared fixtures: tiny models built from configs (no downloads)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# One torch thread per test process. The suite's parallelism is pytest-xdist's worker processes
# (`make test`: one per core); torch's intra-op threads on top of them oversubscribe the cores, and
# on these tiny models the threads wait on each other more than they compute (the same 343 tests
# of test_core, test_families_e2e, test_numerics and test_export with `-n 2`: 55-72 s with torch's
# default 2 threads per worker, 39-42 s with 1). The environment variable carries it to the child
# processes tests start (CLI runs, killed savers, torchrun workers).
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

settings.register_profile("ci", max_examples=25, deadline=None)
settings.register_profile("dev", max_examples=15, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

#: tiny model families used across the suite: preset name, targets
FAMILIES = {
    "bert": ("tiny-bert", ("q", "k", "v", "o")),
    "gpt2": ("tiny-gpt2", ("q", "k", "v", "o")),
    "llama": ("tiny-llama", ("q", "k", "v", "o")),
    "vit": ("tiny-vit", ("q", "k", "v")),
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--full",
        action="store_true",
        default=False,
        help="run whole products of cases (e.g. the torch.compile matrix) instead of the "
        "documented default sample; the environment variable TENSADAPT_FULL=1 does the same",
    )


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Back to one thread after a test that set more (``train --threads 2`` runs in-process)."""
    yield
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def build_model(preset: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised tiny base model (eval mode) from a bundled preset config."""
    from transformers import AutoModel

    from tensadapt.arch import preset_config

    torch.manual_seed(seed)
    model = AutoModel.from_config(preset_config(preset))
    return model.eval()


def model_inputs(
    model: torch.nn.Module, batch: int = 2, seq: int = 7, seed: int = 1
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    if cfg.model_type == "vit":
        return {
            "pixel_values": torch.randn(
                batch, cfg.num_channels, cfg.image_size, cfg.image_size, generator=g
            )
        }
    return {"input_ids": torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)}


def hidden(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs).last_hidden_state


def randomize(model: torch.nn.Module, scale: float = 0.2, seed: int = 3) -> None:
    """Give every adapter factor random non-zero values (so updates are non-trivial)."""
    from tensadapt.model import get_adapter

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in get_adapter(model).parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture
def tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path
