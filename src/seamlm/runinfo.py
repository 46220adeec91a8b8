"""What a run records next to its results so that it can be reproduced: versions, device, time."""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
from importlib import metadata
from typing import Any

import torch


def package_versions(names: tuple[str, ...] = ("seamlm", "torch", "transformers", "accelerate", "peft", "gguf")) -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def environment_info() -> dict[str, Any]:
    return {
        "versions": package_versions(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def fingerprint(obj: Any) -> str:
    """Short stable hash of JSON-serialisable data (used to check that a resumed run sees the same data)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
