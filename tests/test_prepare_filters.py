"""runtime.prepare filters: decontamination against benchmark items, exact and near dedup, determinism, resume."""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path

import pytest
from rich.console import Console

from runtime.prepare import (
    BenchmarkItem,
    DecontaminationSettings,
    DedupSettings,
    PrepareError,
    benchmark_items,
    load_manifest,
    prepare_corpus,
)
from runtime.prepare import pipeline

REPO = Path(__file__).resolve().parent.parent
NIST = REPO.parent / "shared" / "data" / "corpus" / "nist-sp800-63-3"
BENCHMARKS = REPO.parent / "shared" / "data" / "benchmarks"
CTI = BENCHMARKS / "cti-mcq" / "cti-mcq.tsv"
SECEVAL = BENCHMARKS / "seceval" / "questions.json"
TOKENIZER = "mistral-common:v1"
JSONL = {"data_format": "jsonl", "text_field": "text"}


def _documents(count: int, seed: int = 0, words: int = 200) -> list[str]:
    """Distinct documents of `words` words drawn from the NIST corpus's own words."""
    vocabulary = " ".join(p.read_text() for p in sorted(NIST.rglob("*.md"))[:8]).split()
    rng = random.Random(seed)
    return [" ".join(rng.choices(vocabulary, k=words)) for _ in range(count)]


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _line_starts(path: Path) -> list[int]:
    """Byte offset of each line, 0-based list for 1-based line numbers."""
    starts, pos = [], 0
    for line in path.read_bytes().splitlines(keepends=True):
        starts.append(pos)
        pos += len(line)
    return starts


def _at(path: Path, line: int) -> dict:
    return {"path": str(path), "line": line, "byte": _line_starts(path)[line - 1]}


def _prepare(paths, out, **kwargs):
    settings = {"data_format": "text", "tokenizer": TOKENIZER, "seq_len": 64, "validation_fraction": 0.2, "seed": 3,
                "workers": 1, "progress": False}
    return prepare_corpus([str(p) for p in paths], prepared_dir=str(out), **{**settings, **kwargs})


def _shard_hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.bin"))}


def _with_words_changed(text: str, positions: tuple[int, ...]) -> str:
    words = text.split()
    for i in positions:
        words[i] = "CHANGED" + words[i]
    return " ".join(words)


def test_exact_and_near_duplicates_drop_the_later_copies_and_list_them(tmp_path):
    docs = _documents(30, seed=1)
    a = docs[:20]
    a[12] = "  " + docs[2].upper().replace(" ", " \n\t ", 5) + "  "  # case and whitespace differ: exact
    a[15] = _with_words_changed(docs[7], (40, 140))  # 2 words of 200: near
    b = [docs[5], *docs[20:], docs[9]]  # an exact copy, then a copy of a document from the file before
    first, second = _write_jsonl(tmp_path / "a.jsonl", a), _write_jsonl(tmp_path / "b.jsonl", b)
    manifest = _prepare([first, second], tmp_path / "out", dedup=DedupSettings(near=True), unit_bytes=4096, **JSONL)
    f = manifest.filters
    assert (f.documents_seen, f.documents_kept, f.exact_duplicates, f.near_duplicates, f.contaminated) == (32, 28, 3,
                                                                                                          1, 0)
    dropped = [dict(d) for d in f.dropped]
    assert 0.8 <= dropped[1].pop("jaccard") < 1.0
    assert dropped == [
        {"where": _at(first, 13), "reason": "exact_duplicates", "original": _at(first, 3)},
        {"where": _at(first, 16), "reason": "near_duplicates", "original": _at(first, 8)},
        {"where": _at(second, 1), "reason": "exact_duplicates", "original": _at(first, 6)},
        {"where": _at(second, 12), "reason": "exact_duplicates", "original": _at(first, 10)},
    ]
    kept = [t for i, t in enumerate(a) if i not in (12, 15)] + b[1:-1]
    reference = _prepare([_write_jsonl(tmp_path / "kept.jsonl", kept)], tmp_path / "ref", **JSONL)
    assert _shard_hashes(tmp_path / "out") == _shard_hashes(tmp_path / "ref")
    assert manifest.splits == reference.splits
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["filters"]["dropped"][2] == f.dropped[2]
    assert load_manifest(tmp_path / "out") == manifest


def test_a_text_file_read_in_segments_is_filtered_by_segment_and_keeps_its_eos(tmp_path):
    small = " ".join(_documents(1, seed=2, words=60))
    (tmp_path / "a.txt").write_text(small)
    head = " ".join(_documents(1, seed=3, words=400)) + "\n"  # longer than unit_bytes: the big file's first segment
    (tmp_path / "b.txt").write_text(head + small)
    (tmp_path / "head.txt").write_text(head)
    settings = {"unit_bytes": 1024, "validation_fraction": 0.0}
    manifest = _prepare([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "out", dedup=DedupSettings(), **settings)
    assert manifest.filters.dropped == [{"where": {"path": str(tmp_path / "b.txt"), "byte": len(head.encode())},
                                         "reason": "exact_duplicates",
                                         "original": {"path": str(tmp_path / "a.txt"), "byte": 0}}]
    reference = _prepare([tmp_path / "a.txt", tmp_path / "head.txt"], tmp_path / "ref", **settings)
    assert _shard_hashes(tmp_path / "out") == _shard_hashes(tmp_path / "ref")
    assert manifest.splits == reference.splits and manifest.splits["train"].documents == 2


_SHORT_ITEM = BenchmarkItem("synthetic", "synthetic.tsv:2", "Which port does SSH listen on?\n22\n23\n25\n80")
_LONG_ITEM = BenchmarkItem("synthetic", "synthetic.tsv:3", "When rotating a compromised signing key, which step "
                           "must come before revoking the old certificate?\nPublish the new key\nDelete logs\n"
                           "Reboot\nNotify users")


def test_documents_holding_benchmark_questions_are_dropped_with_the_item_they_match(tmp_path):
    items = benchmark_items({"cti-mcq": CTI, "seceval": SECEVAL}) + (_SHORT_ITEM, _LONG_ITEM)
    real = {n: items[n].text.split("\n")[0] for n in (10, 200, 2600)}  # CTI-MCQ rows 12 and 202, SecEval [100]
    docs = _documents(16, seed=4)

    def pasted(doc: str, text: str) -> str:
        words = doc.split()
        return " ".join([*words[:90], text, *words[90:]])

    planted = {
        2: pasted(docs[2], real[10]),
        5: pasted(docs[5], real[200].upper()),
        8: pasted(docs[8], real[2600]),
        11: pasted(docs[11], "which port does SSH listen on 22 23 25 80"),
        13: pasted(docs[13], _LONG_ITEM.text.split("\n")[0]),
    }
    short_phrases = {  # fewer words in a row than n, or a short item without its options: clean
        3: pasted(docs[3], " ".join(real[10].split()[:10])),
        7: pasted(docs[7], "Which port does SSH listen on?"),
    }
    texts = [planted.get(i, short_phrases.get(i, d)) for i, d in enumerate(docs)]
    corpus = _write_jsonl(tmp_path / "docs.jsonl", texts)
    manifest = _prepare([corpus], tmp_path / "out", decontamination=DecontaminationSettings(items), **JSONL)
    assert manifest.filters.dropped == [
        {"where": _at(corpus, 3), "reason": "contaminated", "benchmark": "cti-mcq", "row": f"{CTI}:12",
         "matching_ngrams": 23 - 12},
        {"where": _at(corpus, 6), "reason": "contaminated", "benchmark": "cti-mcq", "row": f"{CTI}:202",
         "matching_ngrams": 18 - 12},
        {"where": _at(corpus, 9), "reason": "contaminated", "benchmark": "seceval", "row": f"{SECEVAL}:[100]",
         "matching_ngrams": 49 - 12},
        {"where": _at(corpus, 12), "reason": "contaminated", "benchmark": "synthetic", "row": "synthetic.tsv:2",
         "matching_ngrams": 1},
        {"where": _at(corpus, 14), "reason": "contaminated", "benchmark": "synthetic", "row": "synthetic.tsv:3",
         "matching_ngrams": 15 - 12},
    ]
    assert manifest.filters.contaminated == 5 and manifest.filters.documents_kept == 11
    assert manifest.filters.settings["decontamination"]["items"] == {"cti-mcq": 2500, "seceval": 2189, "synthetic": 2}
    assert sum(s.documents for s in manifest.splits.values()) == 11
    assert sum(s.words for s in manifest.splits.values()) == sum(
        len(t.split()) for i, t in enumerate(texts) if i not in planted
    )


def test_min_matches_counts_distinct_ngrams_of_one_item(tmp_path):
    doc = " ".join(_documents(1, seed=5)[0].split()[:50]) + " " + _LONG_ITEM.text.split("\n")[0]
    corpus = _write_jsonl(tmp_path / "d.jsonl", [doc])
    for needed, dropped in ((3, 1), (4, 0)):  # the question's 15 words hold 3 13-grams
        settings = DecontaminationSettings((_SHORT_ITEM, _LONG_ITEM), min_matches=needed)
        manifest = _prepare([corpus], tmp_path / f"m{needed}", decontamination=settings, **JSONL)
        assert manifest.filters.contaminated == dropped


def _filtered_corpus(tmp_path: Path) -> tuple[Path, dict]:
    """200 documents in ~30 units: copies of early ones planted all through, and two benchmark items pasted in."""
    docs = _documents(200, seed=6, words=100)
    rng = random.Random(7)
    for i in range(40, 200, 9):
        docs[i] = rng.choice(docs[:30])
    for i in range(45, 200, 31):
        docs[i] = _with_words_changed(rng.choice(docs[:30]), (50,))
    docs[150] = docs[150] + " " + _LONG_ITEM.text
    docs[190] = "which port does ssh listen on 22 23 25 80 " + docs[190]
    settings = {**JSONL, "dedup": DedupSettings(near=True),
                "decontamination": DecontaminationSettings((_SHORT_ITEM, _LONG_ITEM)),
                "unit_bytes": 4096, "shard_sequences": 16}
    return _write_jsonl(tmp_path / "docs.jsonl", docs), settings


def test_filtered_output_is_the_same_for_any_worker_count(tmp_path):
    corpus, settings = _filtered_corpus(tmp_path)
    one = _prepare([corpus], tmp_path / "one", workers=1, **settings)
    two = _prepare([corpus], tmp_path / "two", workers=2, **settings)
    assert one.filters.exact_duplicates > 10 and one.filters.near_duplicates > 2 and one.filters.contaminated == 2
    assert _shard_hashes(tmp_path / "one") == _shard_hashes(tmp_path / "two")
    assert (tmp_path / "one" / "manifest.json").read_bytes() == (tmp_path / "two" / "manifest.json").read_bytes()
    assert two == one


class _Stopped(Exception):
    pass


def test_a_filtered_run_stopped_midway_resumes_to_identical_shards_and_manifest(tmp_path, monkeypatch):
    corpus, settings = _filtered_corpus(tmp_path)
    add, added = pipeline._Run.add, []

    def add_then_stop(run, result):  # as a kill after 12 units: those after the last progress record are redone
        if len(added) == 12:
            raise _Stopped
        added.append(result.index)
        add(run, result)

    monkeypatch.setattr(pipeline._Run, "add", add_then_stop)
    with pytest.raises(_Stopped):
        _prepare([corpus], tmp_path / "stopped", **settings)
    monkeypatch.setattr(pipeline._Run, "add", add)
    done = json.loads((tmp_path / "stopped" / "progress.json").read_text())
    assert 0 < done["next_unit"] <= 12 and done["filters"]["exact_duplicates"] > 0
    said = io.StringIO()
    resumed = _prepare([corpus], tmp_path / "stopped", workers=2, console=Console(file=said, width=300), **settings)
    assert f"rebuilding the filters' state from the {done['next_unit']} work units done" in said.getvalue()
    assert "starting over" not in said.getvalue()
    clean = _prepare([corpus], tmp_path / "clean", **settings)
    assert _shard_hashes(tmp_path / "stopped") == _shard_hashes(tmp_path / "clean")
    assert (tmp_path / "stopped" / "manifest.json").read_bytes() == (tmp_path / "clean" / "manifest.json").read_bytes()
    assert resumed == clean and clean.filters.exact_duplicates > done["filters"]["exact_duplicates"]


def test_without_filters_output_and_fingerprint_are_unchanged_and_filter_settings_change_the_fingerprint(tmp_path):
    corpus = _write_jsonl(tmp_path / "d.jsonl", _documents(40, seed=8))
    plain = _prepare([corpus], tmp_path / "plain", **JSONL)
    explicit = _prepare([corpus], tmp_path / "none", dedup=None, decontamination=None, **JSONL)
    assert _shard_hashes(tmp_path / "plain") == _shard_hashes(tmp_path / "none")
    assert (tmp_path / "plain" / "manifest.json").read_bytes() == (tmp_path / "none" / "manifest.json").read_bytes()
    on_disk = json.loads((tmp_path / "plain" / "manifest.json").read_text())
    assert "filters" not in on_disk and plain.filters is None and explicit == plain
    before = {k: v for k, v in on_disk.items() if k not in ("corpus", "splits", "shards")} | {"fingerprint": ""}
    assert plain.fingerprint == hashlib.sha256(json.dumps(before, sort_keys=True, separators=(",", ":")).encode()
                                               ).hexdigest()  # the formula from before filters existed
    nothing_dropped = _prepare([corpus], tmp_path / "dedup", dedup=DedupSettings(near=True), **JSONL)
    assert _shard_hashes(tmp_path / "dedup") == _shard_hashes(tmp_path / "plain")
    assert nothing_dropped.fingerprint != plain.fingerprint and nothing_dropped.filters.dropped == []
    with pytest.raises(PrepareError, match=r"holds a finished preparation of other inputs or settings"):
        _prepare([corpus], tmp_path / "dedup", dedup=DedupSettings(near=True, near_threshold=0.9), **JSONL)


def test_filter_settings_out_of_range_are_refused():
    with pytest.raises(PrepareError, match=r"^dedup near_threshold 1\.5 must be in \(0, 1\]$"):
        DedupSettings(near_threshold=1.5)
    with pytest.raises(PrepareError, match=r"^decontamination has no benchmark items$"):
        DecontaminationSettings(())
