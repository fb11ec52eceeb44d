"""Outputs recorded on a device: a twin that answers each input with the logits the device produced for it.

``qrobust export-inputs`` (qrobust.exchange) writes every input the gate feeds a pair's twin, in batches
of ``.npy`` files, and a manifest naming each sample by the SHA-256 of its float32 bytes. A runner on the
device (a phone NPU, a board, TensorRT, ExecuTorch: anything that reads .npy) writes one logits file per
batch under the same name and copies the manifest beside them. ``RecordedOutputs(folder)`` then stands in
for the twin: given a batch, it finds each sample by its bytes and returns the recorded logits. The
inputs are pixel-identical on every host (qrobust.data.perturbations), so a sample the export did not
hold (other thresholds, seed or sample cap since the export) is refused, never guessed.

A runner may also record a layer's activations, ``<case>/batch-NNNNN@<layer>.npy`` (the layer name
URL-quoted): EigenCAM then runs on them, as the pair's ``quantized_target_layer`` (by default its
``target_layer``) names them.

Files are read with ``numpy.load(allow_pickle=False)`` and the manifest as JSON: nothing in them runs.
Every problem is one line naming the file: a missing or extra file, a wrong shape, dtype or sample count,
NaN or Inf logits, a manifest of another format.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

import numpy as np
import torch

from qrobust.errors import ModelOutputError, UnsupportedError, show
from qrobust.runtimes.base import RuntimeModel

MANIFEST = "manifest.json"
FORMAT = 1
LIVE_ONLY = "recorded outputs hold the device's logits (and the activations it recorded) only"


def sample_key(sample: torch.Tensor) -> str:
    """How the export names one input sample and the twin finds it: SHA-256 of its float32 C-order bytes."""
    return hashlib.sha256(np.ascontiguousarray(sample.detach().cpu().numpy(), dtype=np.float32).tobytes()).hexdigest()


def layer_file(batch_file: str, layer: str) -> str:
    """Where a runner writes a layer's activations for a batch: beside its logits, the layer URL-quoted."""
    return f"{batch_file.removesuffix('.npy')}@{quote(layer, safe='')}.npy"


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
        self._where: dict[str, tuple[str, int]] = {}  # sample key -> (batch file, row)
        self._rows: dict[str, int] = {}  # batch file -> its samples
        self._layers: dict[tuple[str, str], torch.Tensor] = {}  # (batch file, layer) -> activations, as read

    def describe(self) -> str:
        return f"recorded outputs ({self.folder})"

    def run(self, x: torch.Tensor, layers: Sequence[str] = ()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The recorded logits of each sample of ``x`` and, for ``layers``, its recorded activations."""
        index = self._load()
        keys = [sample_key(sample) for sample in x]
        for key in keys:
            if key not in index:
                raise ModelOutputError(f"{show(str(self.folder / MANIFEST))}: an input the gate feeds is not in the export "
                                       "(its thresholds, seed or sample cap changed since): export again and rerun "
                                       "the device")
        logits = torch.stack([index[k] for k in keys]) if keys else torch.zeros(0, 0)
        acts = {layer: torch.stack([self._activation(layer, *self._where[k]) for k in keys]) for layer in layers}
        return logits, acts

    def layer_for(self, name: str, reference: RuntimeModel | None = None) -> str:
        """A layer is named as the runner recorded it (``<batch>@<layer>.npy``): checked when first read."""
        return name

    def _activation(self, layer: str, batch_file: str, row: int) -> torch.Tensor:
        key = (batch_file, layer)
        if key not in self._layers:
            path = self.folder / layer_file(batch_file, layer)
            if not path.is_file():
                raise ModelOutputError(f"{show(str(path))} is missing: the runner recorded no activations of layer "
                                       f"{layer!r} (CAMs on recorded outputs need them; or gate the pair without CAMs)")
            values = self._array(path, self._rows[batch_file])
            if not np.isfinite(values).all():
                raise ModelOutputError(f"{show(str(path))}: activations hold NaN or Inf")
            self._layers[key] = torch.from_numpy(values.astype(np.float32))
        values = self._layers[key]
        return values[row]

    def quant_params(self) -> list[dict]:
        raise UnsupportedError(f"{LIVE_ONLY}: the quantizer properties need the live twin")

    def _load(self) -> dict[str, torch.Tensor]:
        """Sample key -> logits, every file checked."""
        if self._index is not None:
            return self._index
        manifest = read_manifest(self.folder / MANIFEST)
        expected, stems, index, classes = set(), set(), {}, None
        for case in manifest["cases"]:
            for batch in case["batches"]:
                path = self.folder / batch["file"]
                expected.add(path.resolve())
                stems.add(str(path.resolve()).removesuffix(".npy") + "@")
                logits = self._logits(path, len(batch["keys"]), classes)
                classes = logits.shape[1]
                bad = ~np.isfinite(logits).all(axis=1)
                if bad.any():
                    raise ModelOutputError(f"{show(str(path))}: {int(bad.sum())} of {len(logits)} rows hold NaN or Inf "
                                           f"(first sample id {batch['ids'][int(bad.argmax())]})")
                for row, (key, values) in enumerate(zip(batch["keys"], torch.from_numpy(logits.astype(np.float32)))):
                    index[key] = values
                    self._where[key] = (batch["file"], row)
                self._rows[batch["file"]] = len(batch["keys"])
        extra = sorted(p for p in self.folder.rglob("*") if p.is_file() and p.name != MANIFEST
                       and p.resolve() not in expected and not self._is_layer_file(p, stems))
        if extra:
            raise ModelOutputError(f"{show(str(extra[0]))}: not a batch of {show(str(self.folder / MANIFEST))} "
                                   f"({len(extra)} such file(s)): remove it, or export again")
        self._index = index
        return index

    @staticmethod
    def _is_layer_file(path: Path, stems: set[str]) -> bool:
        name = str(path.resolve())
        return name.endswith(".npy") and "@" in name and name[:name.rindex("@") + 1] in stems

    @staticmethod
    def _array(path: Path, rows: int | None) -> np.ndarray:
        try:
            values = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise ModelOutputError(f"{show(str(path))} is missing: the device runner wrote no logits for this batch") from None
        except (OSError, ValueError) as exc:
            raise ModelOutputError(f"{show(str(path))}: not a .npy array ({show(str(exc), 120)})") from None
        if values.dtype.kind != "f":
            raise ModelOutputError(f"{show(str(path))}: dtype {values.dtype}, expected floats")
        if rows is not None and (values.ndim < 1 or values.shape[0] != rows):
            raise ModelOutputError(f"{show(str(path))}: {values.shape[0] if values.ndim else 0} rows, expected {rows}: "
                                   "one per input sample of the batch")
        return values

    @classmethod
    def _logits(cls, path: Path, rows: int, classes: int | None) -> np.ndarray:
        logits = cls._array(path, None)
        if logits.ndim != 2 or logits.shape[0] != rows or (classes is not None and logits.shape[1] != classes):
            wanted = f"({rows}, {classes if classes is not None else 'classes'})"
            raise ModelOutputError(f"{show(str(path))}: shape {tuple(logits.shape)}, expected {wanted}: one row of "
                                   "logits per input sample of the batch")
        return logits


def load_outputs(folder: str | Path) -> RecordedOutputs:
    """A twin from the logits a device recorded for an export (``qrobust export-inputs``), for a ModelPair."""
    return RecordedOutputs(folder)
