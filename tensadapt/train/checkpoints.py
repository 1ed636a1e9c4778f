"""Checkpoints of ``tensadapt train --save-steps N`` and the one ``--resume [DIR]`` continues from.

A checkpoint is ``OUT/checkpoints/checkpoint-<step>/``, written by
:class:`~tensadapt.trainer.AdapterTrainer`: the adapter (``adapter_config.json`` +
``adapter.safetensors``, the new head included), the optimizer, scheduler and RNG states and
``trainer_state.json`` -- adapter-sized, not model-sized. A preset's trained tokenizer is kept in
each checkpoint too, with the hash of the texts it was trained on (:data:`TEXTS_FILE`): the
``tokenizers`` trainers do not give the same vocabulary in another process, and a resumed run must
tokenise as the first one did.

The ``Trainer`` writes ``trainer_state.json`` last, so a checkpoint without it was cut short by a
crash; :func:`latest_checkpoint` passes over such a directory.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..atomic import atomic_write
from .options import OptionError
from .tokenizer import TEXTS_FILE, texts_digest

#: the checkpoints' directory inside ``--out``
CHECKPOINTS_DIR = "checkpoints"
#: written last into a checkpoint by the ``Trainer``: its presence means the checkpoint is whole
STATE_FILE = "trainer_state.json"
_STEP = re.compile(r"^checkpoint-(\d+)$")


def checkpoints_of(out: Path) -> Path:
    """Where a run writing to ``out`` keeps its checkpoints."""
    return out / CHECKPOINTS_DIR


def latest_checkpoint(directory: Path) -> Path | None:
    """The complete checkpoint of the highest step in ``directory`` (``None``: there is none)."""
    if not directory.is_dir():
        return None
    steps = []
    for d in directory.iterdir():
        m = _STEP.match(d.name)
        if m and d.is_dir() and (d / STATE_FILE).is_file():
            steps.append((int(m.group(1)), d))
    return max(steps)[1] if steps else None


def resume_checkpoint(resume: bool | str | os.PathLike[str], out: Path | None) -> Path:
    """The checkpoint ``--resume`` names: ``True`` -- the latest complete one of ``out``; a path --
    that checkpoint directory (or a run directory: its latest checkpoint).

    Raises:
        OptionError: no ``--out`` to look in, or no complete checkpoint there (named).
    """
    if resume is True:
        if out is None:
            raise OptionError("--resume without a directory needs --out (the run to continue)")
        where = checkpoints_of(out)
    else:
        if isinstance(resume, bool):  # False: the caller asked for no resume
            raise OptionError("--resume: nothing to resume from")
        where = Path(resume)
        if (where / STATE_FILE).is_file():
            return where
        if (where / CHECKPOINTS_DIR).is_dir():
            where = where / CHECKPOINTS_DIR
    found = latest_checkpoint(where)
    if found is None:
        raise OptionError(
            f"--resume: no complete checkpoint in {where} (a checkpoint-<step> directory with "
            f"{STATE_FILE}); train with --save-steps N --out DIR to write checkpoints"
        )
    return found


class KeepTexts(TrainerCallback):
    """Records, in every checkpoint, the hash of the texts the kept tokenizer was trained on."""

    def __init__(self, texts: list[str]) -> None:
        self.record = json.dumps({"sha256": texts_digest(texts), "n_texts": len(texts)})

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: object
    ) -> None:
        d = Path(args.output_dir or ".") / f"checkpoint-{state.global_step}"
        if d.is_dir():
            atomic_write(d / TEXTS_FILE, lambda tmp: Path(tmp).write_text(self.record))
