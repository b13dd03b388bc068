"""Self-describing, code-free checkpoints.

A segflow checkpoint is one safetensors file: the weights as tensors, and in the header's
string metadata (key "segflow") a JSON document that says everything needed to use them:

    {"format": 1,
     "architecture": {"family": "fcn", "variant": "fcn8s", "backbone": "resnet18"},
     "labels": {"name", "classes", "palette", "ignore_index"},
     "normalization": {"mean": [...], "std": [...]},
     "training": {"data", "command", "seconds", ...},
     "metrics": {...}, "crf": {...}}

Torch pickles (.pt/.pth) are accepted too, but only through `torch.load(weights_only=True)`,
which refuses anything that would run code on load. Files are read and written through
segflow's storage layer (`segflow.storage`: retried, atomic, URLs redacted in every
message), so a checkpoint may live at any URL (local path, s3://, ...). Reading a safetensors file's
metadata (`read_checkpoint_meta`) needs no torch, so the driver can plan without it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1
METADATA_KEY = "segflow"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


def save_checkpoint(
    path: str,
    state_dict: dict[str, torch.Tensor],
    meta: dict,
    storage_options: dict | None = None,
    float_dtype: torch.dtype | None = None,
) -> str:
    """Write weights plus `meta` as one safetensors file at `path` (any fsspec URL).

    `float_dtype` (e.g. torch.float16) stores floating-point weights at lower precision to
    halve the file; loading casts them back to the network's dtype. Returns the sha256 of
    the bytes written, which is the checkpoint's identity.
    """
    from safetensors.torch import save as save_safetensors

    from segflow.storage import commit_file

    meta = {"format": FORMAT_VERSION, **meta}
    tensors = {k: _stored(v, float_dtype) for k, v in state_dict.items()}
    data = save_safetensors(tensors, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
    commit_file(os.fspath(path), data, storage_options=storage_options)  # complete or absent, never half a checkpoint
    return hashlib.sha256(data).hexdigest()


def _stored(t: torch.Tensor, float_dtype: torch.dtype | None) -> torch.Tensor:
    t = t.detach().cpu()
    if float_dtype is not None and t.is_floating_point():
        t = t.to(float_dtype)
    return t.contiguous()


def read_checkpoint(url: str, storage_options: dict | None = None) -> tuple[dict[str, torch.Tensor], dict, str]:
    """Read a checkpoint from any fsspec URL -> (state_dict, meta, sha256 of the file)."""
    data = _read_bytes(url, storage_options)
    digest = hashlib.sha256(data).hexdigest()
    if _looks_like_safetensors(data):
        from safetensors.torch import load as load_safetensors

        return load_safetensors(data), _safetensors_meta(url, data), digest
    return (*_read_torch_pickle(url, data), digest)


def read_checkpoint_meta(url: str, storage_options: dict | None = None) -> tuple[dict, str]:
    """(meta, sha256 of the file) of a checkpoint, without loading its weights (nor torch, for safetensors)."""
    data = _read_bytes(url, storage_options)
    digest = hashlib.sha256(data).hexdigest()
    if _looks_like_safetensors(data):
        return _safetensors_meta(url, data), digest
    return _read_torch_pickle(url, data)[1], digest


def _read_bytes(url: str, storage_options: dict | None) -> bytes:
    """The checkpoint's bytes, retried on transient storage errors; errors name the (redacted) URL and the fix."""
    from segflow.errors import ConfigError
    from segflow.storage import filesystem_for, redact, with_retries

    url = os.fspath(url)  # a pathlib.Path too
    try:
        fs, path = filesystem_for(url, storage_options)
        return with_retries(fs.cat_file, path, what=url)
    except FileNotFoundError:
        raise CheckpointError(f"{redact(url)}: checkpoint not found; check the path or URL") from None
    except PermissionError:
        raise CheckpointError(f"{redact(url)}: permission denied; check the credentials for this location") from None
    except (IsADirectoryError, NotADirectoryError):
        raise CheckpointError(f"{redact(url)}: not a file; --checkpoint names one .safetensors (or .pt) file") from None
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None


def _looks_like_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    (header_len,) = struct.unpack("<Q", data[:8])
    return 0 < header_len <= len(data) - 8 and data[8:9] == b"{"


def _safetensors_meta(url: str, data: bytes) -> dict:
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    raw = header.get("__metadata__", {}).get(METADATA_KEY)
    if raw is None:
        raise CheckpointError(
            f"{_redact(url)}: safetensors file without segflow metadata; it does not say its architecture "
            "or classes. Save it with segflow.models.checkpoint.save_checkpoint"
        )
    return json.loads(raw)


def _read_torch_pickle(url: str, data: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    import torch

    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{_redact(url)}: refused: not a safetensors file, and not a torch file that loads with "
            f"weights_only=True (it may hold pickled code: {first_line}). "
            "Re-save the weights as safetensors with segflow metadata"
        ) from None
    if not isinstance(obj, dict) or "state_dict" not in obj or "meta" not in obj:
        raise CheckpointError(f"{_redact(url)}: a torch file must hold {{'state_dict': ..., 'meta': ...}}; re-save it with save_checkpoint")
    return obj["state_dict"], obj["meta"]


def _redact(url: str) -> str:
    from segflow.storage import redact

    return redact(url)
