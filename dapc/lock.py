"""The lock of what a run is made of: package versions, the tokenizer's identity and the corpus files' hashes.

The compiler records them in `provenance.lock` (outside both plan hashes: the same plan runs under another
torch, and the runtime says so). `dapc plan` records the versions and the tokenizer; `dapc render` also
hashes every corpus file, once, so planning stays fast on a large corpus. The runtime compares what it finds
with the lock through the functions below: one definition of each identity for both packages.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import re
import sys
from pathlib import Path

__all__ = ["PACKAGES", "MISTRAL_COMMON_PREFIX", "MISTRAL_COMMON_MODELS", "TOKENIZER_FILE_RE", "corpus_changes",
           "file_sha256", "files_sha256", "installed_versions", "python_version", "tokenizer_identity",
           "version_differences"]

# What decides the numbers a run produces, beside dapc itself (whose version is `provenance.dapc_version`).
PACKAGES = ("torch", "transformers", "accelerate", "deepspeed", "peft", "bitsandbytes", "torchao", "safetensors")

MISTRAL_COMMON_PREFIX = "mistral-common:"
MISTRAL_COMMON_MODELS = {"v1": "tokenizer.model.v1"}
# Files that define a tokenizer (hashed for its identity); model weights in the same folder are not.
TOKENIZER_FILE_RE = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab.*|merges\.txt|.*\.model|.*\.tiktoken|tekken\.json)$"
)


def installed_versions() -> dict[str, str | None]:
    """Returns each of PACKAGES' installed version (None where it is not installed), from the names of the
    distributions' metadata folders on sys.path (`torch-2.13.0+cpu.dist-info`): nothing is imported or read,
    which keeps `dapc plan` fast (importlib.metadata scans sys.path once per package: ~40 ms for eight)."""
    found: dict[str, str] = {}
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            match = _DIST_INFO.match(name)
            if match:
                found.setdefault(_normalized(match["name"]), match["version"])
    return {name: found.get(_normalized(name)) for name in PACKAGES}


_DIST_INFO = re.compile(r"^(?P<name>[A-Za-z0-9_.]+?)-(?P<version>[0-9][^-]*?)\.(?:dist|egg)-info$")


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def python_version() -> str:
    """Returns the running Python's version, e.g. '3.11.9'."""
    return platform.python_version()


def version_differences(locked: dict[str, str | None], found: dict[str, str | None]) -> list[str]:
    """Returns one line per package whose version differs between the lock and `found`; a package the lock
    has no version for (the plan was made where it was not installed) is not compared."""
    return [f"{name} {locked[name]} when the plan was made, {found.get(name) or 'not installed'} here"
            for name in sorted(locked) if locked[name] is not None and found.get(name) != locked[name]]


def file_sha256(path: str | Path) -> str:
    """Returns the sha256 hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_sha256(paths: list[str]) -> dict[str, str]:
    """Returns {path: sha256} for every file."""
    return {path: file_sha256(path) for path in paths}


def tokenizer_identity(spec: str) -> str | None:
    """Returns the sha256 identity of the tokenizer `spec` names, or None where it is not on this machine
    (a Hub id the compiler does not download).

    A local folder: sha256 over (name, sha256) of each tokenizer file, weights excluded (the same identity
    the prepare manifest records). `mistral-common:vN`: the sha256 of the SentencePiece model the installed
    package ships.
    """
    if spec.startswith(MISTRAL_COMMON_PREFIX):
        found = importlib.util.find_spec("mistral_common")
        name = MISTRAL_COMMON_MODELS.get(spec[len(MISTRAL_COMMON_PREFIX):])
        if found is None or found.origin is None or name is None:
            return None
        source = Path(found.origin).parent / "data" / name
        return file_sha256(source) if source.is_file() else None
    folder = Path(spec)
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and TOKENIZER_FILE_RE.match(p.name)):
        digest.update(f"{path.name}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def corpus_changes(expected: dict[str, tuple[int, str]]) -> tuple[list[str], list[str]]:
    """Returns (changed, missing) among corpus files expected as {path: (bytes, sha256)}: a file whose size
    differs is changed without reading it; one of the same size is changed when its sha256 differs."""
    changed, missing = [], []
    for path, (size, sha) in sorted(expected.items()):
        file = Path(path)
        if not file.is_file():
            missing.append(path)
        elif file.stat().st_size != size or file_sha256(file) != sha:
            changed.append(path)
    return changed, missing
