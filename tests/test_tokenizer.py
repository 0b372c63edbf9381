"""runtime.tokenizer: the offline mistral-common tokenizer, and the sanity check that catches empty tokenizers."""

from __future__ import annotations

from pathlib import Path

import pytest


from runtime.tokenizer import TokenizerError, load_tokenizer, resolve_tokenizer_dir, tokenizer_sha256

NIST = Path(__file__).resolve().parent.parent / ".." / "shared" / "data" / "corpus" / "nist-sp800-63-3"


@pytest.fixture(scope="module")
def mistral():
    return load_tokenizer("mistral-common:v1")


def test_mistral_common_v1_has_32000_tokens_and_encodes_zero_trust(mistral):
    assert len(mistral) == 32000
    assert mistral.eos_token_id == 2 and mistral.bos_token_id == 1
    assert mistral("Zero trust architecture", add_special_tokens=False)["input_ids"] == [23697, 4893, 13811]
    # no post-processor: the default call adds no BOS either; packing adds only EOS between documents
    assert mistral("Zero trust architecture")["input_ids"] == [23697, 4893, 13811]


def test_mistral_common_v1_builds_in_a_fresh_cache_and_reloads_from_it(tmp_path, monkeypatch):
    monkeypatch.setenv("DAPC_CACHE_DIR", str(tmp_path))
    folder = resolve_tokenizer_dir("mistral-common:v1")
    assert folder.parent == tmp_path / "tokenizers"
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    assert len(load_tokenizer("mistral-common:v1")) == 32000
    assert tokenizer_sha256("mistral-common:v1") == tokenizer_sha256(str(folder))


def test_mistral_common_v1_encodes_like_sentencepiece_on_the_nist_corpus(mistral):
    import sentencepiece as spm
    processor = spm.SentencePieceProcessor(
        model_file=str(resolve_tokenizer_dir("mistral-common:v1") / "tokenizer.model")
    )
    texts = []
    for path in sorted(NIST.rglob("*.md")):
        text = path.read_text()
        texts += [text, *text.split("\n")[:40]]
    texts += ["  two leading spaces", " one", "trailing ", "tab\there", "émoji 🤖", "</s> is text <s>"]
    ours = mistral(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert ours == [processor.encode(t) for t in texts]


def test_unknown_spec_names_what_would_load(tmp_path):
    with pytest.raises(
        TokenizerError, match=r"^tokenizer '.*nope' is neither a local directory nor one of mistral-common:v1$"
    ):
        load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(TokenizerError, match=r"unknown mistral-common tokenizer 'v9'; known: v1$"):
        load_tokenizer("mistral-common:v9")


def _save_word_level(folder: Path, words: list[str], **special) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    backend.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=words[0], **special).save_pretrained(str(folder))


def test_a_three_token_tokenizer_is_refused(tmp_path):
    _save_word_level(tmp_path, ["<unk>", "<s>", "</s>"], eos_token="</s>")
    with pytest.raises(TokenizerError, match=r"tokenizer has 3 tokens \(expected more than 100\)"):
        load_tokenizer(str(tmp_path))


def test_a_tokenizer_without_eos_is_refused(tmp_path):
    _save_word_level(tmp_path, ["<unk>", *(f"w{i}" for i in range(200))])
    with pytest.raises(TokenizerError, match=r"tokenizer defines no EOS token"):
        load_tokenizer(str(tmp_path))
