"""Sample shards shared between xdist workers: one case's shards evaluated by several workers at once.

Under ``-n M`` a case's sample shards are dealt into M *slots* (slot j: every M-th shard from the j-th).
The worker judging the case evaluates every slot nobody else has claimed; helper tests sent to other
workers (``qrobust.scheduling``) claim a slot, evaluate it and leave its states in a file. A slot is
claimed by creating its claim file exclusively, so each is evaluated once. The judge waits only for a
slot another process has claimed, that is, one being evaluated right now: nothing waits on a test that
has not started, so no order of tests can deadlock. A helper that fails, or a process that dies, leaves
its slot to the judge, which evaluates it itself. The fold is in shard order whoever evaluated a shard,
so the records are those of a serial run.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path

POLL_S = 0.05


def folder_for(run: str) -> Path:
    """The folder the workers of one xdist run share (``run``: xdist's testrunuid)."""
    return Path(tempfile.gettempdir()) / f"qrobust-slots-{run}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SlotStore:
    """The claim, state and failure files of one xdist run's slots; ``count`` is the number of workers."""

    def __init__(self, folder: str | Path, count: int):
        self.folder, self.count = Path(folder), count

    def _path(self, unit: str, slot: int, suffix: str) -> Path:
        name = hashlib.sha256(unit.encode()).hexdigest()[:24]
        return self.folder / f"{name}-{slot}.{suffix}"

    def claim(self, unit: str, slot: int) -> bool:
        """Whether this process takes ``slot`` of ``unit`` (False: another process has)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self._path(unit, slot, "claim"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as claim:
            claim.write(str(os.getpid()))
        return True

    def put(self, unit: str, slot: int, states: dict) -> None:
        import torch

        target = self._path(unit, slot, "pt")
        partial = target.with_suffix(".partial")
        torch.save(states, partial)
        partial.replace(target)

    def give_up(self, unit: str, slot: int) -> None:
        """A claimed slot this process could not evaluate: the judge evaluates it itself."""
        self._path(unit, slot, "failed").touch()

    def take(self, unit: str, slot: int) -> dict | None:
        """The states of a slot another process claimed, once written; None when its owner gave up or died."""
        import torch

        state, failed, claim = (self._path(unit, slot, s) for s in ("pt", "failed", "claim"))
        while True:
            if state.exists():
                return torch.load(state, weights_only=True)
            if failed.exists():
                return None
            owner = claim.read_text() if claim.exists() else ""  # empty while the claimant writes its pid
            if owner.isdigit() and not _alive(int(owner)):
                return None
            time.sleep(POLL_S)
