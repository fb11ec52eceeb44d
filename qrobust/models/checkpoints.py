"""Safe loading of checkpoints: tensors only, unless one file is explicitly trusted.

``torch.load(weights_only=True)`` refuses any pickle that would construct arbitrary objects (a
``__reduce__`` payload never runs); ``.safetensors`` files hold tensors only. TorchScript archives and
full pickles (whole modules) execute code when loaded, so they need ``trust=True`` for that one file,
and loading one warns. Every failure is one line naming the path, its size and sha256.
"""
from __future__ import annotations

import hashlib
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from qrobust._files import MiB, check_regular_file, sha256_file
from qrobust.errors import InvalidArgument, show


MAX_CHECKPOINT_BYTES = 16 * 1024 * MiB  # 16 GiB: above any vision model's weights


def _describe(path: Path) -> str:
    return f"{path} ({path.stat().st_size} bytes, sha256 {sha256_file(path)[:16]}...)"


def tensor_fingerprint(state: dict) -> str:
    """sha256 over a state dict's names, dtypes, shapes and values, in name order.

    Unlike a file's sha256 it does not change when the same tensors are saved again (``torch.save``
    writes a random record name into its zip), so baselines travel between machines.
    """
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())
    except Exception:  # noqa: BLE001 - corrupt archives (bad names, bad headers) are simply not TorchScript
        return False


def _state_dict_of(obj, path: Path) -> dict:
    """A flat name -> tensor mapping, also from the common {'state_dict': ...} / {'model': ...} wrappers."""
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InvalidArgument(f"checkpoint {_describe(path)}: not a state dict of tensors")
    return obj


def load_checkpoint(path: str | Path, trust: bool = False) -> dict | nn.Module:
    """A state dict (always, for untrusted files), or a module from a trusted TorchScript/full pickle."""
    path = Path(path)
    if not path.exists():
        raise InvalidArgument(f"checkpoint={show(str(path), 200)}: no such file")
    check_regular_file(path, "checkpoint", MAX_CHECKPOINT_BYTES)  # a FIFO would block torch.load forever
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise InvalidArgument(f"checkpoint {path}: .safetensors needs the safetensors package") from None
        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - any parse failure is one line for the user
            raise InvalidArgument(f"checkpoint {_describe(path)}: cannot be read: {_first_line(exc)}") from None
    if _is_torchscript(path):
        if not trust:
            raise InvalidArgument(f"checkpoint {_describe(path)}: TorchScript runs code when loaded; "
                                  "set trust: true for this file if you trust its origin")
        warnings.warn(f"loading trusted TorchScript {path}", stacklevel=2)
        return torch.jit.load(str(path), map_location="cpu")
    try:
        with warnings.catch_warnings():  # torch's note on non-default pickle protocols is not the user's concern
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:  # the safe unpickler refused an object: torch's own wording varies
        if trust:
            raise InvalidArgument(f"checkpoint {_describe(path)}: cannot be read: {_first_line(exc)}") from None
        raise InvalidArgument(f"checkpoint {_describe(path)}: refused: it holds Python objects, not just tensors "
                              "(a whole-module pickle, or a payload), and unpickling it could run code; set "
                              "trust: true for this file only if you trust its origin") from None
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt: one line for the user
        raise InvalidArgument(f"checkpoint {_describe(path)}: cannot be read: {_first_line(exc)}") from None
    if trust:
        warnings.warn(f"loaded trusted pickle {path} (it may have run code)", stacklevel=2)
        if isinstance(obj, nn.Module):
            return obj
    return _state_dict_of(obj, path)


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, without terminal colour codes, bounded."""
    text = ANSI.sub("", str(exc)).strip().splitlines()
    return show(text[0] if text else type(exc).__name__, 200).strip("'")
