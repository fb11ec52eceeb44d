"""Outputs recorded on a device: a twin that answers each input with the logits the device produced for it.

``qrobust export-inputs`` (qrobust.exchange) writes every input the gate feeds a pair's twin, in batches
of ``.npy`` files, and a manifest naming each sample by the SHA-256 of its float32 bytes. A runner on the
device (a phone NPU, a board, TensorRT, ExecuTorch: anything that reads .npy) writes one logits file per
batch under the same name and copies the manifest beside them. ``RecordedOutputs(folder)`` then stands in
for the twin: given a batch, it finds each sample by its bytes and returns the recorded logits. The
inputs are pixel-identical on every host (qrobust.data.perturbations), so a sample the export did not
hold (other thresholds, seed or sample cap since the export) is refused, never guessed.

Files are read with ``numpy.load(allow_pickle=False)`` and the manifest as JSON: nothing in them runs.
Every problem is one line naming the file: a missing or extra file, a wrong shape, dtype or sample count,
NaN or Inf logits, a manifest of another format.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from qrobust.errors import ModelOutputError, UnsupportedError, show
from qrobust.runtimes.base import RuntimeModel

MANIFEST = "manifest.json"
FORMAT = 1
LIVE_ONLY = "recorded outputs hold the device's logits only"


def sample_key(sample: torch.Tensor) -> str:
    """How the export names one input sample and the twin finds it: SHA-256 of its float32 C-order bytes."""
    return hashlib.sha256(np.ascontiguousarray(sample.detach().cpu().numpy(), dtype=np.float32).tobytes()).hexdigest()


def read_manifest(path: Path) -> dict:
    """An export's manifest, or one line naming the file."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelOutputError(f"{show(str(path))} does not exist: copy the export's {MANIFEST} beside the device's "
                               "outputs (qrobust export-inputs writes it)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelOutputError(f"{show(str(path))}: not a qrobust export manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("cases"), list):
        raise ModelOutputError(f"{show(str(path))}: not a qrobust export manifest of format {FORMAT}")
    return manifest


class RecordedOutputs(RuntimeModel):
    """A twin whose logits were recorded elsewhere (``folder``: the device's logits files and the manifest).
    The folder is read on first use, so a thresholds file can name it before the device has run."""

    runtime = "recorded outputs"

    def __init__(self, folder: str | Path):
        super().__init__()
        self.folder = Path(folder)
        self._index: dict[str, torch.Tensor] | None = None

    def describe(self) -> str:
        return f"recorded outputs ({self.folder})"

    def run(self, x: torch.Tensor, layers: Sequence[str] = ()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if layers:
            raise UnsupportedError(f"{LIVE_ONLY}, not layer {layers[0]!r}: CAMs and per-layer checks need the live twin")
        index = self._load()
        rows = []
        for sample in x:
            found = index.get(sample_key(sample))
            if found is None:
                raise ModelOutputError(f"{show(str(self.folder / MANIFEST))}: an input the gate feeds is not in the export "
                                       "(its thresholds, seed or sample cap changed since): export again and rerun "
                                       "the device")
            rows.append(found)
        return torch.stack(rows) if rows else torch.zeros(0, 0), {}

    def layer_for(self, name: str, reference: RuntimeModel | None = None) -> str:
        raise UnsupportedError(f"{LIVE_ONLY}: no layer {name!r} to read")

    def quant_params(self) -> list[dict]:
        raise UnsupportedError(f"{LIVE_ONLY}: the quantizer properties need the live twin")

    def _load(self) -> dict[str, torch.Tensor]:
        """Sample key -> logits, every file checked."""
        if self._index is not None:
            return self._index
        manifest = read_manifest(self.folder / MANIFEST)
        expected, index, classes = set(), {}, None
        for case in manifest["cases"]:
            for batch in case["batches"]:
                path = self.folder / batch["file"]
                expected.add(path.resolve())
                logits = self._logits(path, len(batch["keys"]), classes)
                classes = logits.shape[1]
                bad = ~np.isfinite(logits).all(axis=1)
                if bad.any():
                    raise ModelOutputError(f"{show(str(path))}: {int(bad.sum())} of {len(logits)} rows hold NaN or Inf "
                                           f"(first sample id {batch['ids'][int(bad.argmax())]})")
                for key, row in zip(batch["keys"], torch.from_numpy(logits.astype(np.float32))):
                    index[key] = row
        extra = sorted(p for p in self.folder.rglob("*") if p.is_file() and p.name != MANIFEST
                       and p.resolve() not in expected)
        if extra:
            raise ModelOutputError(f"{show(str(extra[0]))}: not a batch of {show(str(self.folder / MANIFEST))} "
                                   f"({len(extra)} such file(s)): remove it, or export again")
        self._index = index
        return index

    @staticmethod
    def _logits(path: Path, rows: int, classes: int | None) -> np.ndarray:
        try:
            logits = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise ModelOutputError(f"{show(str(path))} is missing: the device runner wrote no logits for this batch") from None
        except (OSError, ValueError) as exc:
            raise ModelOutputError(f"{show(str(path))}: not a .npy array ({show(str(exc), 120)})") from None
        if logits.dtype.kind != "f":
            raise ModelOutputError(f"{show(str(path))}: dtype {logits.dtype}, expected float logits")
        if logits.ndim != 2 or logits.shape[0] != rows or (classes is not None and logits.shape[1] != classes):
            wanted = f"({rows}, {classes if classes is not None else 'classes'})"
            raise ModelOutputError(f"{show(str(path))}: shape {tuple(logits.shape)}, expected {wanted}: one row of "
                                   "logits per input sample of the batch")
        return logits


def load_outputs(folder: str | Path) -> RecordedOutputs:
    """A twin from the logits a device recorded for an export (``qrobust export-inputs``), for a ModelPair."""
    return RecordedOutputs(folder)
