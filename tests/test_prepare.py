"""runtime.prepare: packing, splitting, determinism, resume after a kill, and located errors on bad input."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest


from runtime.data import PackedDataset
from runtime.prepare import PrepareError, load_manifest, prepare_corpus, prepare_from_plan
from runtime.prepare import encode, word_cache
from runtime.prepare.encode import is_validation
from runtime.prepare.shards import SplitWriter
from runtime.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent
NIST = REPO / ".." / "shared" / "data" / "corpus" / "nist-sp800-63-3"
TOKENIZER = "mistral-common:v1"


def _documents(count: int, seed: int = 0) -> list[str]:
    """Deterministic documents made of the NIST corpus's own words, 20 to 400 words each."""
    words = " ".join(p.read_text() for p in sorted(NIST.rglob("*.md"))[:8]).split()
    rng = random.Random(seed)
    return [" ".join(rng.choices(words, k=rng.randint(20, 400))) for _ in range(count)]


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


def _prepare(paths, out, **kwargs):
    settings = {
        "data_format": "text",
        "tokenizer": TOKENIZER,
        "seq_len": 128,
        "validation_fraction": 0.1,
        "seed": 7,
        "workers": 1,
    }
    return prepare_corpus([str(p) for p in paths], prepared_dir=str(out), **{**settings, **kwargs})


def _shard_hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.bin"))}


def _tokens(out: Path, split: str) -> np.ndarray:
    manifest = load_manifest(out)
    parts = [np.fromfile(out / s.file, dtype=manifest.dtype) for s in manifest.shards_for(split)]
    return np.concatenate(parts).reshape(-1, manifest.seq_len) if parts else np.zeros((0, manifest.seq_len))


def test_nist_corpus_is_packed_into_seq_len_samples_of_documents_joined_by_eos(tmp_path):
    manifest = _prepare([NIST], tmp_path, seq_len=256, shard_sequences=100)
    tok = load_tokenizer(TOKENIZER)
    streams: dict[str, list[int]] = {"train": [], "validation": []}
    for file in manifest.files:  # corpus order: the manifest lists the files in the order they were read
        raw = Path(file.path).read_bytes()
        split = "validation" if is_validation(hashlib.sha256(raw).digest(), 7, 0.1) else "train"
        streams[split] += tok(raw.decode(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    for split, stream in streams.items():
        stats, packed = manifest.splits[split], _tokens(tmp_path, split)
        assert packed.shape == (stats.sequences, 256)
        assert packed.reshape(-1).tolist() == stream[: stats.sequences * 256]
        assert stats.tokens == len(stream) == stats.packed_tokens + stats.dropped_tokens
        assert stats.dropped_tokens < 256
    assert manifest.dtype == "uint16" and manifest.tokenizer.vocab_size == 32000
    assert manifest.splits["validation"].documents > 0 and manifest.splits["train"].documents > 0
    assert len(manifest.files) == sum(s.documents for s in manifest.splits.values()) == 52
    train = manifest.splits["train"].sequences
    assert [s.file for s in manifest.shards_for("train")] == [f"train-{i:05d}.bin" for i in range(-(-train // 100))]
    assert [s.sequences for s in manifest.shards_for("train")][-1] == train % 100 or train % 100 == 0
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk["corpus"]["tokens"] == manifest.content_tokens and on_disk["corpus"]["words"] == manifest.words
    assert on_disk["files"][0]["sha256"] == hashlib.sha256(Path(on_disk["files"][0]["path"]).read_bytes()).hexdigest()
    assert {s["file"]: s["sha256"] for s in on_disk["shards"]} == _shard_hashes(tmp_path)
    dataset = PackedDataset(tmp_path, split="validation")
    assert len(dataset) == manifest.splits["validation"].sequences
    assert dataset.batch(range(len(dataset))).tolist() == _tokens(tmp_path, "validation").tolist()


def _backend(**changes):
    """The mistral-common:v1 Rust backend, with parts of its tokenizer.json replaced."""
    from tokenizers import Tokenizer

    spec = json.loads(load_tokenizer(TOKENIZER).backend_tokenizer.to_str())
    backend = Tokenizer.from_str(json.dumps({**spec, **changes}))
    backend.encode_special_tokens = True
    return backend


_SP = "\u2581"
_LEGACY_LLAMA = {  # how the Llama and Mistral repositories' tokenizer.json spell the same SentencePiece steps
    "normalizer": {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": _SP}, {"type": "Replace", "pattern": {"String": " "}, "content": _SP}]},
    "pre_tokenizer": None,
}


def _hard_texts() -> list[str]:
    """Spaces in runs, at the ends and next to a literal "▁"; other whitespace; special-token strings; non-ASCII."""
    fixed = ["", " ", "  ", "a", " a", "  a", "a ", "a  ", _SP, _SP + "a", _SP * 2, "a" + _SP + " b", " " + _SP + " x",
             "tab\tand  two  spaces   three", "\n\nnew\n line ", "</s> x </s>", "<s><unk>",
             "caf\u00e9 \u4e2d\u6587 \U0001F600", "x" * 300 + " y", "\u3000ideographic space", "a\u00a0b", "\x00 \x01",
             "\r\n \r\n"]
    rng = random.Random(5)
    alphabet = [" ", " ", _SP, "a", "e", "th", "\n", "\t", "\u00e9", "\u4e2d", "</s>", "1", ".", "\U0001F600"]
    fuzz = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(2000)]
    nist = [p.read_text() for p in sorted(NIST.rglob("*.md"))]
    return fixed + fuzz + nist + [line for text in nist for line in text.split("\n")]


@pytest.mark.parametrize("form", [{}, _LEGACY_LLAMA], ids=["mistral-common", "legacy-llama"])
def test_the_word_cache_gives_exactly_the_backends_ids(form, monkeypatch):
    backend = _backend(**form)
    texts = _hard_texts()
    expected = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    assert [ids.tolist() for ids in word_cache.word_cache_encoder(backend)(texts)] == expected
    monkeypatch.setattr(word_cache, "_CACHE_BYTES", 4000)  # emptied many times
    assert [ids.tolist() for ids in word_cache.word_cache_encoder(backend)(texts)] == expected


def test_the_word_cache_is_refused_where_bpe_could_merge_across_words():
    spec = json.loads(load_tokenizer(TOKENIZER).backend_tokenizer.to_str())
    model = spec["model"]
    crossing = {**model, "vocab": {**model["vocab"], "e" + _SP + "t": len(model["vocab"])},
                "merges": [*model["merges"], ["e", _SP + "t"]]}
    assert word_cache.word_cache_encoder(_backend()) is not None
    assert word_cache.word_cache_encoder(_backend(model=crossing)) is None
    split_words = {"type": "Metaspace", "replacement": _SP, "prepend_scheme": "always", "split": True}
    assert word_cache.word_cache_encoder(_backend(pre_tokenizer=split_words)) is None
    assert word_cache.word_cache_encoder(_backend(model={**model, "dropout": 0.1})) is None


def test_shards_are_identical_with_or_without_the_word_cache_and_for_any_worker_count(tmp_path, monkeypatch):
    texts = _documents(200, seed=6)
    (tmp_path / "docs").mkdir()
    _write_jsonl(tmp_path / "docs" / "a.jsonl", texts[:120])
    (tmp_path / "big.txt").write_text("\n".join(texts[120:]))
    kwargs = {"unit_bytes": 8 << 10, "shard_sequences": 40}
    _prepare([tmp_path / "big.txt"], tmp_path / "text3", workers=3, **kwargs)
    _prepare([tmp_path / "docs"], tmp_path / "jsonl3", workers=3, data_format="jsonl", text_field="text", **kwargs)
    refused = []
    monkeypatch.setattr(encode, "word_cache_encoder", lambda backend: refused.append(backend))  # its encode_batch
    _prepare([tmp_path / "big.txt"], tmp_path / "text1", workers=1, **kwargs)
    _prepare([tmp_path / "docs"], tmp_path / "jsonl1", workers=1, data_format="jsonl", text_field="text", **kwargs)
    assert len(refused) == 2
    for one, three in ((tmp_path / "text1", tmp_path / "text3"), (tmp_path / "jsonl1", tmp_path / "jsonl3")):
        assert _shard_hashes(one) == _shard_hashes(three)
        assert len(_shard_hashes(one)) > 2
        assert (one / "manifest.json").read_bytes() == (three / "manifest.json").read_bytes()


def test_a_file_that_differs_from_the_lock_is_refused_before_any_shard_is_written(tmp_path):
    corpus = _write_jsonl(tmp_path / "docs.jsonl", _documents(50))
    with pytest.raises(PrepareError) as e:
        _prepare([corpus], tmp_path / "out", workers=2, data_format="jsonl", text_field="text",
                 locked_sha256={str(corpus): "ab" * 32})
    sha = hashlib.sha256(corpus.read_bytes()).hexdigest()
    assert str(e.value) == (f"{corpus}: corpus file changed since `dapc render` locked it (sha256 abababababab then, "
                            f"{sha[:12]} now); render again")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".prepare.lock"]


def test_same_input_gives_identical_shards_and_manifest_for_any_worker_count(tmp_path):
    corpus = _write_jsonl(tmp_path / "docs.jsonl", _documents(300))
    kwargs = {"data_format": "jsonl", "text_field": "text", "unit_bytes": 16 << 10, "shard_sequences": 50}
    _prepare([corpus], tmp_path / "one", workers=1, **kwargs)
    _prepare([corpus], tmp_path / "two", workers=2, **kwargs)
    assert _shard_hashes(tmp_path / "one") == _shard_hashes(tmp_path / "two")
    assert len(_shard_hashes(tmp_path / "one")) > 2
    assert (tmp_path / "one" / "manifest.json").read_bytes() == (tmp_path / "two" / "manifest.json").read_bytes()


def test_jsonl_and_parquet_holding_the_same_documents_give_the_same_shards(tmp_path):
    import pyarrow.parquet as pq
    import pyarrow as pa

    texts = _documents(120, seed=1)
    _write_jsonl(tmp_path / "a.jsonl", texts[:70])
    _write_jsonl(tmp_path / "b.jsonl", texts[70:])
    pq.write_table(pa.table({"body": texts}), tmp_path / "all.parquet", row_group_size=25)
    jsonl = _prepare([tmp_path / "*.jsonl"], tmp_path / "j", data_format="jsonl", text_field="text", workers=2)
    parquet = _prepare([tmp_path / "all.parquet"], tmp_path / "p", data_format="parquet", text_field="body", workers=2)
    assert _shard_hashes(tmp_path / "j") == _shard_hashes(tmp_path / "p")
    assert jsonl.splits == parquet.splits


def test_split_follows_document_content_not_order_and_duplicates_stay_together(tmp_path):
    texts = _documents(200, seed=2)
    forward = _prepare(
        [_write_jsonl(tmp_path / "f.jsonl", texts + texts[:20])], tmp_path / "f", data_format="jsonl", text_field="text"
    )
    backward = _prepare(
        [_write_jsonl(tmp_path / "b.jsonl", texts[::-1])], tmp_path / "b", data_format="jsonl", text_field="text"
    )
    validation = {t for t in texts if is_validation(hashlib.sha256(t.encode()).digest(), 7, 0.1)}
    assert backward.splits["validation"].documents == len(validation)
    assert forward.splits["validation"].documents == len(validation) + len(validation & set(texts[:20]))
    assert forward.splits["validation"].words == sum(len(t.split()) for t in validation) + sum(
        len(t.split()) for t in validation & set(texts[:20])
    )


def test_a_literal_eos_string_in_the_text_is_not_an_end_of_document(tmp_path):
    corpus = _write_jsonl(tmp_path / "d.jsonl", ["alpha </s> beta " * 40, "gamma delta " * 40])
    manifest = _prepare(
        [corpus], tmp_path / "o", data_format="jsonl", text_field="text", validation_fraction=0.0, seq_len=16
    )
    assert manifest.splits["train"].documents == 2
    assert int((_tokens(tmp_path / "o", "train") == 2).sum()) <= 2  # only the EOS tokens packing added


def test_a_large_text_file_is_read_in_segments_as_one_document(tmp_path):
    text = "\n".join(_documents(40, seed=3))
    (tmp_path / "big.txt").write_text(text)
    manifest = _prepare([tmp_path / "big.txt"], tmp_path / "o", unit_bytes=4096, validation_fraction=0.0, seq_len=64)
    assert manifest.splits["train"].documents == 1
    assert manifest.splits["train"].words == len(text.split())
    assert int((_tokens(tmp_path / "o", "train") == 2).sum()) <= 1


_KILLED_RUN = """
import sys
from runtime.prepare import prepare_corpus
prepare_corpus([sys.argv[1]], prepared_dir=sys.argv[2], data_format="jsonl", text_field="text",
               tokenizer="mistral-common:v1", seq_len=64, validation_fraction=0.2, seed=3, workers=1,
               shard_sequences=32, unit_bytes=4096)
"""


def test_a_run_killed_after_its_first_shard_resumes_to_identical_shards(tmp_path):
    corpus = _write_jsonl(tmp_path / "docs.jsonl", _documents(500, seed=4))
    settings = {
        "data_format": "jsonl",
        "text_field": "text",
        "seq_len": 64,
        "validation_fraction": 0.2,
        "seed": 3,
        "shard_sequences": 32,
        "unit_bytes": 4096,
    }
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(corpus), str(killed)], cwd=REPO)
    deadline = time.monotonic() + 60
    while not (killed / "train-00000.bin").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (killed / "train-00000.bin").exists() and not (killed / "manifest.json").exists()
    resumed = _prepare([corpus], killed, workers=2, **settings)
    clean = _prepare([corpus], tmp_path / "clean", workers=1, **settings)
    assert _shard_hashes(killed) == _shard_hashes(tmp_path / "clean")
    assert resumed == clean
    assert not (killed / "progress.json").exists()


def test_resume_recovers_a_shard_renamed_after_the_last_progress_record(tmp_path):
    tokens = np.arange(1000, dtype=np.uint32)
    reference = SplitWriter(tmp_path / "ref", "train", 10, "uint16", 4)
    (tmp_path / "ref").mkdir()
    reference.add(tokens)
    reference.finish()
    (tmp_path / "w").mkdir()
    writer = SplitWriter(tmp_path / "w", "train", 10, "uint16", 4)
    writer.add(tokens[:25])  # 2 sequences in the partial shard, 5 tokens carried
    state = writer.state()
    writer.add(tokens[25:57])  # commits shard 0 and starts shard 1; no progress record for it
    writer.close()
    resumed = SplitWriter.resume(tmp_path / "w", "train", 10, "uint16", 4, state)
    resumed.add(tokens[25:])
    resumed.finish()
    assert _shard_hashes(tmp_path / "w") == _shard_hashes(tmp_path / "ref")
    assert [s.sha256 for s in resumed.committed] == [s.sha256 for s in reference.committed]


def test_rerun_returns_the_finished_manifest_and_other_settings_are_refused(tmp_path):
    first = _prepare([NIST], tmp_path)
    assert _prepare([NIST], tmp_path, workers=2) == first
    with pytest.raises(PrepareError, match=r"holds a finished preparation of other inputs or settings") as e:
        _prepare([NIST], tmp_path, seq_len=64)
    assert e.value.location == str(tmp_path)


def test_an_unfinished_preparation_of_other_settings_is_refused(tmp_path):
    (tmp_path / "progress.json").write_text(json.dumps({"fingerprint": "other"}))
    with pytest.raises(PrepareError, match=r"holds an unfinished preparation of other inputs or settings"):
        _prepare([NIST], tmp_path)


def _tiny_plan(tmp_path: Path, *overrides: str):
    from dapc.compile import compile_recipe

    return compile_recipe(REPO / "examples" / "tiny" / "recipe.yaml", overrides, output=str(tmp_path / "run")).plan


def test_prepare_from_plan_reads_the_plans_files_data_settings_and_seed(tmp_path):
    plan = _tiny_plan(tmp_path, f"data.paths={json.dumps([str(NIST)])}", "training.seed=7",
                      f"data.prepared_dir={tmp_path / 'plan'}")
    (manifest,) = prepare_from_plan(plan, workers=1)
    assert [f.path for f in manifest.files] == [f.path for f in plan.corpus.files]
    assert _shard_hashes(tmp_path / "plan") == _shard_hashes(
        Path(_prepare([NIST], tmp_path / "direct", seed=7, validation_fraction=0.1) and tmp_path / "direct")
    )
    assert manifest.seed == 7 and manifest.text_field is None


def test_compiler_and_prepare_agree_on_the_corpus_files(tmp_path):
    # What the plan counts (bytes, tokens, steps) is exactly what prepare reads: hidden folders, hidden
    # files and suffixes outside the format are skipped by both, a file named like a glob is a file, and a
    # folder listed twice counts once.
    corpus = tmp_path / "corpus"
    (corpus / ".cache").mkdir(parents=True)
    (corpus / ".cache" / "hidden.txt").write_text("not corpus " * 50)
    (corpus / "notes.log").write_text("not text format " * 50)
    (corpus / ".hidden.txt").write_text("hidden " * 50)
    (corpus / "a[1].txt").write_text("Zero trust assumes breach. " * 60)
    (corpus / "b.md").write_text("Least privilege limits blast radius. " * 60)
    paths = [str(corpus), str(corpus), str(corpus / "a[1].txt")]
    plan = _tiny_plan(tmp_path, f"data.paths={json.dumps(paths)}", f"data.prepared_dir={tmp_path / 'out'}")
    assert [Path(f.path).name for f in plan.corpus.files] == ["a[1].txt", "b.md"]
    assert plan.cost.corpus_bytes == sum(f.bytes for f in plan.corpus.files) == plan.corpus.total_bytes
    (manifest,) = prepare_from_plan(plan, workers=1, progress=False)
    assert [f.path for f in manifest.files] == [f.path for f in plan.corpus.files]


def test_prepare_refuses_a_corpus_file_that_changed_since_the_plan(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Patch within the window. " * 40)
    plan = _tiny_plan(tmp_path, f"data.paths={json.dumps([str(corpus)])}", f"data.prepared_dir={tmp_path / 'out'}")
    (corpus / "a.txt").write_text("Patch within the window. " * 41)
    with pytest.raises(PrepareError) as e:
        prepare_from_plan(plan, workers=1, progress=False)
    assert str(e.value) == (f"{corpus / 'a.txt'}: corpus file changed since the plan was made (1,000 bytes planned, "
                            "1,025 now); compile the recipe again")


def test_paths_that_match_no_files_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepareError) as e:
        _prepare([tmp_path / "empty"], tmp_path / "o")
    assert str(e.value) == (f"corpus folder {tmp_path / 'empty'} holds no text files (a folder contributes .txt, .md, "
                            ".text, .rst, hidden names skipped)")
    with pytest.raises(PrepareError, match=r"^corpus path .*/\*\.jsonl matches no file$"):
        _prepare([tmp_path / "*.jsonl"], tmp_path / "o", data_format="jsonl", text_field="text")
    with pytest.raises(PrepareError, match=r"^corpus path .*/missing\.txt matches no file$"):
        _prepare([tmp_path / "missing.txt"], tmp_path / "o")


def test_a_bad_jsonl_line_is_located_by_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n{"text": broken}\n')
    with pytest.raises(PrepareError, match=r"^.*/bad\.jsonl:4: invalid JSON: Expecting value \(column 10\)$"):
        _prepare([bad], tmp_path / "o", data_format="jsonl", text_field="text", workers=2)


def test_a_missing_text_field_is_located_and_lists_the_fields(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text", "id": 3}\n')
    with pytest.raises(PrepareError, match=r"^.*/bad\.jsonl:2: no field 'text' \(fields: body, id\)$"):
        _prepare([bad], tmp_path / "o", data_format="jsonl", text_field="text")
    import pyarrow.parquet as pq
    import pyarrow as pa

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(PrepareError, match=r"^.*/t\.parquet: no column 'text' \(columns: body\)$"):
        _prepare([tmp_path / "t.parquet"], tmp_path / "o", data_format="parquet", text_field="text")


def test_text_that_is_not_utf8_is_located(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait")
    with pytest.raises(PrepareError, match=r"^.*/bad\.txt: not valid UTF-8 at byte 3$"):
        _prepare([tmp_path / "bad.txt"], tmp_path / "o")


def test_cli_prints_one_located_line_and_exits_2_on_bad_input(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Rotate keys. " * 100)
    plan = _tiny_plan(tmp_path, f"data.paths={json.dumps([str(corpus)])}")
    path = tmp_path / "plan.json"
    path.write_text(plan.text())
    corpus.unlink()
    result = subprocess.run(
        [sys.executable, "-m", "runtime.prepare", "--plan", str(path)],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "300"},
    )
    assert result.returncode == 2
    assert result.stderr == f"error: {corpus}: corpus file listed in the plan cannot be read: No such file or directory\n"
