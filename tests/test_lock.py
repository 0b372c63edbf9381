"""The lock of what ran: versions and tokenizer in the plan, corpus hashes at render, the runtime's checks."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dapc.compile import compile_recipe
from dapc.lock import PACKAGES, installed_versions, tokenizer_identity, version_differences
from dapc.plan_schema import load_plan
from dapc.render import render_artifacts, write_artifacts
from runtime.lock_check import check_corpus_since_prepare, environment_warnings
from runtime.prepare import PrepareError, prepare_from_plan
from runtime.tokenizer import tokenizer_sha256
from tests.conftest import REPO
from tests.train_support import run_env

TINY = REPO / "examples" / "tiny" / "recipe.yaml"


@pytest.fixture
def rendered(tmp_path: Path):
    """Renders the tiny example over a copy of its corpus; returns (plan.json path, corpus folder)."""
    corpus = tmp_path / "corpus"
    shutil.copytree(REPO / "examples" / "tiny" / "corpus", corpus)
    compiled = compile_recipe(TINY, (f"data.paths={json.dumps([str(corpus)])}",
                                     f"data.prepared_dir={tmp_path / 'prepared'}"), output=str(tmp_path / "run"))
    out = tmp_path / "run"
    write_artifacts(render_artifacts(compiled.plan, out), out)
    return out / "plan.json", corpus


def test_installed_versions_match_the_distributions_metadata():
    versions = installed_versions()
    assert set(versions) == set(PACKAGES)
    for name, version in versions.items():
        try:
            expected = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            expected = None
        assert version == expected, name


def test_plan_locks_versions_and_tokenizer_and_render_locks_the_corpus(rendered):
    plan_path, corpus = rendered
    compiled = compile_recipe(TINY, (f"data.paths={json.dumps([str(corpus)])}",))
    assert compiled.plan.provenance.lock.corpus_sha256 is None  # `dapc plan` does not read the corpus
    lock = load_plan(plan_path).provenance.lock
    assert lock.packages == installed_versions() and lock.packages["torch"] is not None
    assert lock.python == f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    files = sorted(str(p) for p in corpus.rglob("*") if p.is_file())
    assert lock.corpus_sha256 == {f: hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files}
    import mistral_common

    packaged = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    assert lock.tokenizer_sha256 == hashlib.sha256(packaged.read_bytes()).hexdigest()


def test_a_local_tokenizer_has_the_identity_the_prepare_manifest_records(tmp_path):
    from runtime.tokenizer import resolve_tokenizer_dir

    folder = resolve_tokenizer_dir("mistral-common:v1")
    assert tokenizer_identity(str(folder)) == tokenizer_sha256(str(folder))
    assert tokenizer_identity(str(tmp_path / "absent")) is None


def test_version_differences_name_both_and_skip_what_the_plan_did_not_record():
    locked = {"torch": "2.13.0", "peft": None, "deepspeed": "0.19.8"}
    assert version_differences(locked, {"torch": "2.12.1", "peft": "0.21", "deepspeed": "0.19.8"}) == [
        "torch 2.13.0 when the plan was made, 2.12.1 here"]
    assert version_differences(locked, {"torch": "2.13.0"}) == [
        "deepspeed 0.19.8 when the plan was made, not installed here"]


def _edit_lock(plan_path: Path, **changes) -> None:
    plan = json.loads(plan_path.read_text())
    for key, value in changes.items():
        if key == "packages":
            plan["provenance"]["lock"]["packages"].update(value)
        else:
            plan["provenance"]["lock"][key] = value
    plan_path.write_text(json.dumps(plan))  # provenance is outside plan_sha256: still loads


def test_the_trainer_warns_naming_both_versions(rendered):
    plan_path, _ = rendered
    _edit_lock(plan_path, packages={"torch": "0.0.1"}, tokenizer_sha256="0" * 64)
    assert len(environment_warnings(load_plan(plan_path))) == 2
    done = subprocess.run([sys.executable, "-m", "runtime.train", "--plan", str(plan_path)], capture_output=True,
                          text=True, env=run_env(plan_path), timeout=300)
    here = importlib.metadata.version("torch")
    assert f"warning: environment differs from the plan's lock: torch 0.0.1 when the plan was made, {here} here" \
        in done.stderr
    assert "tokenizer mistral-common:v1 changed since the plan was made (sha256 000000000000 then" in done.stderr
    assert done.returncode == 2 and "Traceback" not in done.stderr  # then: nothing prepared yet, one line


def test_prepare_refuses_a_corpus_changed_since_render(rendered):
    plan_path, corpus = rendered
    first = sorted(p for p in corpus.rglob("*") if p.is_file())[0]
    data = first.read_bytes()
    first.write_bytes(data[:-1] + (b"X" if data[-1:] != b"X" else b"Y"))  # same size: only the hash tells
    with pytest.raises(PrepareError, match="changed since `dapc render` locked it"):
        prepare_from_plan(load_plan(plan_path), workers=1, progress=False)


def test_training_refuses_a_corpus_changed_since_prepare_and_reads_it_only_when_its_stat_moved(rendered,
                                                                                             monkeypatch):
    plan_path, corpus = rendered
    plan = load_plan(plan_path)
    prepare_from_plan(plan, workers=1, progress=False)
    import runtime.prepare.manifest as manifest_module

    calls = []
    real = manifest_module.corpus_changes
    monkeypatch.setattr(manifest_module, "corpus_changes", lambda expected: calls.append(dict(expected)) or
                        real(expected))
    check_corpus_since_prepare(plan, rank=0)
    assert calls == [{}]  # sizes and mtimes as prepare saw them: nothing read

    files = sorted(p for p in corpus.rglob("*") if p.is_file())
    files[0].touch()  # same bytes, new mtime: read again, and accepted
    check_corpus_since_prepare(plan, rank=0)
    assert list(calls[-1]) == [str(files[0])]

    data = files[1].read_bytes()
    files[1].write_bytes(data[:-1] + (b"X" if data[-1:] != b"X" else b"Y"))
    with pytest.raises(PrepareError, match="corpus file changed since prepare wrote"):
        check_corpus_since_prepare(plan, rank=0)
