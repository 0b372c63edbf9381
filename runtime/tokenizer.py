"""Load the tokenizer a recipe names, and check that it is a real one.

A spec is either a local directory that `AutoTokenizer.from_pretrained` loads, or `mistral-common:v1`: the
SentencePiece model shipped in the PyPI package mistral-common (`mistral_common/data/tokenizer.model.v1`,
32,000 pieces). For the latter the model is copied into a cache folder as `tokenizer.model`, converted there
to a `tokenizer.json`, and that folder is loaded with `AutoTokenizer`.

Why convert ourselves: transformers 5.24 converts a bare `tokenizer.model` only when the `protobuf` package is
installed, and without it falls back to a TikToken reader that fails on a SentencePiece file. The conversion
below reads the model with a twenty-line protobuf wire reader and builds the same `tokenizers` pipeline as
transformers' `build_tokenizer_from_spm_proto` (byte-identical `tokenizer.json` for v1; ids identical to
`sentencepiece` itself, tested on the NIST corpus). The sanity check exists because of a silent trap:
`LlamaTokenizerFast(vocab_file=...)` returns a tokenizer of length 3 that encodes everything to `[]`.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

from dapc.errors import DapcError
from dapc.lock import MISTRAL_COMMON_MODELS, MISTRAL_COMMON_PREFIX, file_sha256, tokenizer_identity

__all__ = ["TokenizerError", "cache_dir", "load_tokenizer", "resolve_tokenizer_dir", "tokenizer_sha256"]

_MIN_VOCAB = 100


class TokenizerError(DapcError):
    """A tokenizer spec that names nothing loadable, or a tokenizer that fails the sanity check."""


def cache_dir() -> Path:
    """Where dapc keeps derived files: `$DAPC_CACHE_DIR`, else `$XDG_CACHE_HOME/dapc`, else `~/.cache/dapc`."""
    if os.environ.get("DAPC_CACHE_DIR"):
        return Path(os.environ["DAPC_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dapc"


def resolve_tokenizer_dir(spec: str) -> Path:
    """The local folder `AutoTokenizer.from_pretrained` loads for `spec` (built once for `mistral-common:*`)."""
    if spec.startswith(MISTRAL_COMMON_PREFIX):
        return _mistral_common_dir(spec)
    folder = Path(spec)
    if not folder.is_dir():
        raise TokenizerError(
            f"tokenizer {spec!r} is neither a local directory nor one of "
            f"{', '.join(MISTRAL_COMMON_PREFIX + k for k in sorted(MISTRAL_COMMON_MODELS))}"
        )
    return folder


def load_tokenizer(spec: str) -> Any:
    """An HF tokenizer for `spec`, checked: more than 100 tokens, an EOS token, and non-empty encodings."""
    from transformers import AutoTokenizer

    folder = resolve_tokenizer_dir(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # transformers raises many types here; the user needs the spec and the cause
        raise TokenizerError(f"AutoTokenizer cannot load {str(folder)!r}: {e}", spec) from e
    _sanity_check(tokenizer, spec)
    return tokenizer


def tokenizer_sha256(spec: str) -> str:
    """Identity of the files `load_tokenizer` reads (`dapc.lock.tokenizer_identity` of its folder): sha256 over
    (name, sha256) of each tokenizer file, weights excluded."""
    identity = tokenizer_identity(str(resolve_tokenizer_dir(spec)))
    assert identity is not None  # resolve_tokenizer_dir returned an existing folder
    return identity


def _sanity_check(tokenizer: Any, spec: str) -> None:
    size = len(tokenizer)
    if size <= _MIN_VOCAB:
        raise TokenizerError(
            f"tokenizer has {size} tokens (expected more than {_MIN_VOCAB}): it did not load its vocabulary", spec
        )
    if tokenizer.eos_token_id is None:
        raise TokenizerError("tokenizer defines no EOS token, which joins documents when packing", spec)
    if not tokenizer("Zero trust architecture", add_special_tokens=False)["input_ids"]:
        raise TokenizerError("tokenizer encodes 'Zero trust architecture' to no tokens", spec)


def _mistral_common_dir(spec: str) -> Path:
    version = spec[len(MISTRAL_COMMON_PREFIX) :]
    if version not in MISTRAL_COMMON_MODELS:
        raise TokenizerError(
            f"unknown mistral-common tokenizer {version!r}; known: {', '.join(sorted(MISTRAL_COMMON_MODELS))}", spec
        )
    try:
        import mistral_common
    except ImportError as e:
        raise TokenizerError(
            "the PyPI package mistral-common is not installed (pip install mistral-common)", spec
        ) from e
    source = Path(mistral_common.__file__).parent / "data" / MISTRAL_COMMON_MODELS[version]
    if not source.is_file():
        raise TokenizerError(f"mistral-common has no {source.name} (looked at {source})", spec)
    sha = file_sha256(source)
    target = cache_dir() / "tokenizers" / f"mistral-common-{version}-{sha[:16]}"
    if (target / "tokenizer.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        shutil.copyfile(source, staging / "tokenizer.model")
        _write_hf_tokenizer(staging / "tokenizer.model", staging)
        try:
            os.rename(staging, target)  # atomic; another process may have won the race, which is fine
        except OSError:
            if not (target / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_hf_tokenizer(model_path: Path, folder: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    model = _read_spm_model(model_path.read_bytes())
    backend = _build_bpe_tokenizer(model)
    pieces = model["pieces"]
    trainer = model["trainer"]
    names = {
        key: pieces[trainer[f"{key}_id"]][0] for key in ("unk", "bos", "eos") if 0 <= trainer[f"{key}_id"] < len(pieces)
    }
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=names.get("unk"),
        bos_token=names.get("bos"),
        eos_token=names.get("eos"),
    )
    hf.save_pretrained(str(folder))


# --- SentencePiece model: protobuf wire format, only the fields the conversion needs -------------------------
# ModelProto: 1 pieces {1 piece, 2 score, 3 type}, 2 trainer_spec, 3 normalizer_spec (sentencepiece_model.proto).
_TRAINER_FIELDS = {3: "model_type", 35: "byte_fallback", 40: "unk_id", 41: "bos_id", 42: "eos_id", 45: "unk_piece"}
_NORMALIZER_FIELDS = {
    2: "precompiled_charsmap",
    3: "add_dummy_prefix",
    4: "remove_extra_whitespaces",
    5: "escape_whitespaces",
}
_SPM_BPE = 2
_SPM_NORMAL, _SPM_USER_DEFINED = 1, 4


def _read_spm_model(data: bytes) -> dict:
    pieces: list[tuple[str, float, int]] = []
    trainer = {"model_type": 1, "byte_fallback": 0, "unk_id": 0, "bos_id": 1, "eos_id": 2, "unk_piece": b"<unk>"}
    normalizer = {
        "precompiled_charsmap": b"",
        "add_dummy_prefix": 1,
        "remove_extra_whitespaces": 1,
        "escape_whitespaces": 1,
    }
    for number, value in _fields(data):
        if number == 1:
            piece = {1: b"", 2: 0.0, 3: _SPM_NORMAL}
            piece.update(dict(_fields(value)))
            pieces.append((piece[1].decode(), piece[2], piece[3]))
        elif number == 2:
            trainer.update({_TRAINER_FIELDS[n]: v for n, v in _fields(value) if n in _TRAINER_FIELDS})
        elif number == 3:
            normalizer.update({_NORMALIZER_FIELDS[n]: v for n, v in _fields(value) if n in _NORMALIZER_FIELDS})
    for key in ("unk_id", "bos_id", "eos_id"):  # int32 fields: -1 arrives as a 64-bit varint
        trainer[key] = trainer[key] - (1 << 64) if trainer[key] >= 1 << 63 else trainer[key]
    return {"pieces": pieces, "trainer": trainer, "normalizer": normalizer}


def _fields(data: bytes):
    """(field number, value) pairs of one protobuf message: varints as int, float32 as float, bytes as bytes."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 5:
            (value,), pos = struct.unpack_from("<f", data, pos), pos + 4
        elif wire == 1:
            (value,), pos = struct.unpack_from("<d", data, pos), pos + 8
        elif wire == 2:
            size, pos = _varint(data, pos)
            value, pos = data[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, value


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _build_bpe_tokenizer(model: dict):
    """The `tokenizers` pipeline that encodes like `SentencePieceProcessor.encode` (legacy dummy-prefix handling)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    trainer, spec, pieces = model["trainer"], model["normalizer"], model["pieces"]
    if trainer["model_type"] != _SPM_BPE:
        raise TokenizerError(f"only SentencePiece BPE models are supported (model_type {trainer['model_type']})")
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    normal = {piece: (score, i) for i, (piece, score, kind) in enumerate(pieces) if kind == _SPM_NORMAL}
    ranked = [
        (-score, i, piece[:cut], piece[cut:])
        for piece, (score, i) in normal.items()
        for cut in range(1, len(piece))
        if piece[:cut] in normal and piece[cut:] in normal
    ]
    user_defined = [piece for piece, _, kind in pieces if kind == _SPM_USER_DEFINED]
    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=[(left, right) for _, _, left, right in sorted(ranked)],
            unk_token=trainer["unk_piece"].decode(),
            fuse_unk=True,
            byte_fallback=bool(trainer["byte_fallback"]),
            dropout=None,
            ignore_merges=bool(user_defined),
        )
    )
    steps = []
    if spec["precompiled_charsmap"]:
        steps.append(normalizers.Precompiled(spec["precompiled_charsmap"]))
    if spec["remove_extra_whitespaces"]:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec["escape_whitespaces"]:
        steps.append(normalizers.Replace(" ", "▁"))
    if spec["add_dummy_prefix"]:
        # Metaspace skips the dummy prefix when the text already starts with "▁"; SentencePiece does not.
        steps.append(normalizers.Replace(Regex(r"\A▁"), "▁▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    pre = []
    if spec["add_dummy_prefix"]:
        pre.append(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False))
    if user_defined:
        pattern = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
        pre.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    if pre:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(pre)
    steps = [decoders.Replace("▁", " ")]
    if trainer["byte_fallback"]:
        steps.append(decoders.ByteFallback())
    if spec["add_dummy_prefix"]:
        steps += [decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    elif trainer["byte_fallback"]:
        steps.append(decoders.Fuse())
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer
