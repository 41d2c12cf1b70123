"""Tokenizers: round trips, ESPnet token-list conventions and id parity, save/load, bad input."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ebranchformer.asr.tokenizer import (
    CharTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    TokenListTokenizer,
    load_tokenizer,
    read_token_list,
    write_token_list,
)

SETTINGS = settings(max_examples=60, deadline=None)
BPE_SIZE, UNIGRAM_SIZE = 40, 28  # sentencepiece caps the unigram vocabulary lower on this small corpus
WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "hat", "that", "sees", "seen", "rat"]


def corpus(n: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8))) for _ in range(n)]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpe")
    SentencePieceTokenizer.train(corpus(), d, vocab_size=BPE_SIZE, model_type="bpe")
    return d


@pytest.fixture(scope="module")
def unigram_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("unigram")
    SentencePieceTokenizer.train(corpus(), d, vocab_size=UNIGRAM_SIZE, model_type="unigram")
    return d


sentences = st.lists(st.sampled_from(WORDS), min_size=0, max_size=6).map(" ".join)
char_texts = st.text(alphabet="abct h!é\t", max_size=20)


# ----------------------------------------------------------------------------------------------- char


def test_char_train_orders_by_count_with_espnet_specials():
    # counts over "ab ba" + "abc": a 3, b 3 (a seen first), <space> 1, c 1 (space seen first)
    tok = CharTokenizer.train(["ab ba", "abc"])
    assert tok.tokens == ["<blank>", "<unk>", "a", "b", "<space>", "c", "<sos/eos>"]
    assert (tok.blank_id, tok.unk_id, tok.sos_eos_id, tok.vocab_size) == (0, 1, 6, 7)
    assert CharTokenizer.train(["aaab", "b"], cutoff=2).tokens == ["<blank>", "<unk>", "a", "<sos/eos>"]


@SETTINGS
@given(texts=st.lists(char_texts, min_size=1, max_size=5))
def test_char_train_matches_frequency_rule(texts):
    counts = Counter(c for t in texts for c in t.replace(" ", "\0"))  # \0 stands for the space token
    chars = [c for c, _ in sorted(counts.items(), key=lambda kv: -kv[1])]  # stable: first seen first on ties
    expected = ["<blank>", "<unk>", *("<space>" if c == "\0" else c for c in chars), "<sos/eos>"]
    assert CharTokenizer.train(texts).tokens == expected


@SETTINGS
@given(text=char_texts)
def test_char_round_trip_and_unknowns(text):
    tok = CharTokenizer.train(["abc th"])
    ids = tok.encode(text)
    assert len(ids) == len(text)
    for c, i in zip(text, ids):
        if c in "abct h":
            assert tok.tokens[i] == ("<space>" if c == " " else c)
        else:
            assert i == tok.unk_id
    if set(text) <= set("abct h"):
        assert tok.decode(ids) == text
    assert tok.decode([0, *ids, 0, tok.sos_eos_id]) == tok.decode(ids)  # blank and <sos/eos> dropped


@given(st.text(alphabet="ab ", max_size=12))
def test_transcript_collapses_and_strips_spaces(text):
    tok = CharTokenizer.train(["ab ba"])
    ids = tok.encode(text)
    assert tok.decode(ids) == text  # decode keeps every space, as ESPnet's tokens2text
    assert tok.transcript([0, *ids, 0]) == " ".join(text.split())
    assert not tok.transcript(ids).startswith(" ") and "  " not in tok.transcript(ids)


def test_decode_accepts_tensors_and_arrays():
    tok = CharTokenizer.train(["ab ba"])
    ids = tok.encode("ab a")
    assert tok.decode(torch.tensor(ids)) == tok.decode(np.array(ids)) == "ab a"
    assert tok.ids_to_tokens(ids) == ["a", "b", "<space>", "a"]


@pytest.mark.parity
@SETTINGS
@given(texts=st.lists(char_texts, min_size=1, max_size=4), probe=char_texts)
def test_char_ids_equal_espnet(texts, probe):
    espnet_char = pytest.importorskip("espnet2.text.char_tokenizer")
    espnet_conv = pytest.importorskip("espnet2.text.token_id_converter")
    tok = CharTokenizer.train(texts)
    ref_tok = espnet_char.CharTokenizer(space_symbol="<space>")
    ref_conv = espnet_conv.TokenIDConverter(tok.tokens, unk_symbol="<unk>")
    ids = tok.encode(probe)
    assert ids == ref_conv.tokens2ids(ref_tok.text2tokens(probe))
    assert ref_conv.get_num_vocabulary_size() == tok.vocab_size
    assert tok.decode(ids) == ref_tok.tokens2text(ref_conv.ids2tokens(ids))
    via_list = TokenListTokenizer(tok.tokens, text_kind="char")
    assert via_list.encode(probe) == ids


@pytest.mark.parity
def test_token_list_file_read_like_espnet(tmp_path):
    espnet_conv = pytest.importorskip("espnet2.text.token_id_converter")
    path = tmp_path / "tokens.txt"
    # trailing whitespace is stripped except for the first character of a line
    path.write_text("<blank>\n<unk>  \n\t\nx \t\nab\n<sos/eos>", encoding="utf-8")
    ref = espnet_conv.TokenIDConverter(path)
    assert read_token_list(path) == ref.token_list == ["<blank>", "<unk>", "\t", "x", "ab", "<sos/eos>"]
    tok = TokenListTokenizer(path, text_kind="char")
    assert tok.encode("x\tyx") == ref.tokens2ids(["x", "\t", "y", "x"])


# ----------------------------------------------------------------------------------------------- sentencepiece


@pytest.mark.parametrize("which", ["bpe_dir", "unigram_dir"])
def test_sentencepiece_token_list_follows_asr_sh(which, request):
    import sentencepiece as spm

    d = request.getfixturevalue(which)
    sp = spm.SentencePieceProcessor(model_file=str(d / "bpe.model"))
    vocab = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert vocab[:3] == ["<unk>", "<s>", "</s>"]
    # asr.sh: echo <blank>; echo <unk>; the .vocab without its first three lines; echo <sos/eos>
    expected = ["<blank>", "<unk>", *vocab[3:], "<sos/eos>"]
    tok = load_tokenizer(d)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.tokens == expected == read_token_list(d / "tokens.txt")
    assert tok.vocab_size == sp.get_piece_size() == (BPE_SIZE if which == "bpe_dir" else UNIGRAM_SIZE)


@pytest.mark.parametrize("which", ["bpe_dir", "unigram_dir"])
@SETTINGS
@given(text=sentences)
def test_sentencepiece_round_trip(which, request, text):
    tok = load_tokenizer(request.getfixturevalue(which))
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert tok.blank_id not in ids
    assert tok.decode(ids) == text
    assert tok.decode([0, *ids, tok.sos_eos_id]) == text


@pytest.mark.parity
@pytest.mark.parametrize("which", ["bpe_dir", "unigram_dir"])
@SETTINGS
@given(text=st.one_of(sentences, st.text(alphabet="thecatzq! ", max_size=25)))
def test_sentencepiece_ids_equal_espnet(which, request, text):
    espnet_sp = pytest.importorskip("espnet2.text.sentencepiece_tokenizer")
    espnet_conv = pytest.importorskip("espnet2.text.token_id_converter")
    d = request.getfixturevalue(which)
    ref_tok = espnet_sp.SentencepiecesTokenizer(d / "bpe.model")
    ref_conv = espnet_conv.TokenIDConverter(d / "tokens.txt")
    ids = ref_conv.tokens2ids(ref_tok.text2tokens(text))
    tok = load_tokenizer(d)
    via_list = TokenListTokenizer(d / "tokens.txt", text_kind="bpe", bpemodel=d / "bpe.model")
    assert tok.encode(text) == via_list.encode(text) == ids
    assert tok.decode(ids) == ref_tok.tokens2text(ref_conv.ids2tokens(ids))


def test_sentencepiece_training_is_deterministic(tmp_path, bpe_dir, unigram_dir):
    for model_type, ref, size in (("bpe", bpe_dir, BPE_SIZE), ("unigram", unigram_dir, UNIGRAM_SIZE)):
        again = SentencePieceTokenizer.train(
            corpus(), tmp_path / model_type, vocab_size=size, model_type=model_type
        )
        assert (tmp_path / model_type / "bpe.model").read_bytes() == (ref / "bpe.model").read_bytes()
        assert again.tokens == load_tokenizer(ref).tokens


def test_sentencepiece_from_existing_model_and_user_symbols(tmp_path, bpe_dir):
    tok = SentencePieceTokenizer(bpe_dir / "bpe.model")
    assert tok.tokens == load_tokenizer(bpe_dir).tokens
    tok2 = SentencePieceTokenizer.train(corpus(), tmp_path, vocab_size=40, user_defined_symbols=["<noise>"])
    assert (
        tok2.tokens[2] == "<noise>"
    )  # user symbols follow sp's <unk> <s> </s>, so they come right after <unk>
    ids = tok2.encode("the <noise> cat")
    assert ids.count(2) == 1 and tok2.unk_id not in ids  # never split into pieces
    assert tok2.decode(ids) == "the <noise> cat"


# ----------------------------------------------------------------------------------------------- save / load


def test_save_load_every_kind(tmp_path, bpe_dir):
    char = CharTokenizer.train(["hello world"], space_symbol="|")
    bpe = load_tokenizer(bpe_dir)
    list_char = TokenListTokenizer(char.tokens, text_kind="char", space_symbol="|")
    list_bpe = TokenListTokenizer(bpe.tokens, text_kind="bpe", bpemodel=bpe_dir / "bpe.model")
    for name, tok, text in [
        ("char", char, "hello old world"),
        ("sp", bpe, "the cat sat on that mat"),
        ("list_char", list_char, "low hold"),
        ("list_bpe", list_bpe, "a dog ran to the rat"),
    ]:
        d = tmp_path / name
        tok.save(d)
        back = Tokenizer.load(d)
        assert type(back) is type(tok)
        assert back.tokens == tok.tokens
        assert back.encode(text) == tok.encode(text)
        assert back.decode(tok.encode(text)) == tok.decode(tok.encode(text)) == text
        config = json.loads((d / "tokenizer.json").read_text())
        assert config["kind"] == tok.kind
        assert read_token_list(d / config["tokens"]) == tok.tokens
    assert load_tokenizer(tmp_path / "char").space_symbol == "|"
    assert load_tokenizer(tmp_path / "list_bpe").text_kind == "bpe"


def test_write_read_token_list_round_trip(tmp_path):
    tokens = ["<blank>", "<unk>", " ", "\t", "é", "ab", "<sos/eos>"]
    write_token_list(tmp_path / "t.txt", tokens)
    assert read_token_list(tmp_path / "t.txt") == tokens


# ----------------------------------------------------------------------------------------------- bad input


def test_load_rejects_unknown_kind_and_missing_files(tmp_path, bpe_dir):
    d = tmp_path / "c"
    CharTokenizer.train(["ab"]).save(d)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "nowhere")
    config = json.loads((d / "tokenizer.json").read_text())
    (d / "tokenizer.json").write_text(json.dumps({**config, "kind": "wordpiece"}))
    with pytest.raises(ValueError, match="unknown tokenizer kind 'wordpiece'"):
        load_tokenizer(d)
    (d / "tokenizer.json").write_text(json.dumps({**config, "tokens": "../x.txt"}))
    with pytest.raises(ValueError, match="plain file name"):
        load_tokenizer(d)
    (d / "tokenizer.json").write_text(json.dumps(config))
    (d / "tokens.txt").unlink()
    with pytest.raises(FileNotFoundError, match="tokens"):
        load_tokenizer(d)
    (d / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_tokenizer(d)

    s = tmp_path / "s"
    load_tokenizer(bpe_dir).save(s)
    (s / "bpe.model").unlink()
    with pytest.raises(FileNotFoundError, match="model"):
        load_tokenizer(s)
    load_tokenizer(bpe_dir).save(s)
    write_token_list(s / "tokens.txt", ["<blank>", "<unk>", "x"])
    with pytest.raises(ValueError, match="does not match"):
        load_tokenizer(s)


@pytest.mark.parametrize(
    ("tokens", "match"),
    [
        (["<unk>", "<blank>"], r"tokens\[0\] must be the CTC blank"),
        ([], r"tokens\[0\] must be the CTC blank"),
        (["<blank>", "a"], "must contain the unknown symbol"),
        (["<blank>", "<unk>", "a", "a"], "duplicates"),
        (["<blank>", "<unk>", "a\nb"], "line break"),
        (["<blank>", "<unk>", "ab "], "whitespace"),
        (["<blank>", "<unk>", ""], "empty"),
    ],
)
def test_bad_token_lists_raise(tokens, match):
    with pytest.raises(ValueError, match=match):
        CharTokenizer(tokens)


def test_bad_arguments_raise(tmp_path, bpe_dir):
    tok = CharTokenizer.train(["ab"])
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(b"ab")
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 5\)"):
        tok.decode([2, 5])
    with pytest.raises(TypeError, match="ids must hold ints"):
        tok.decode([1.0])
    with pytest.raises(ValueError, match="ids must be 1-D"):
        tok.decode(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="text_kind"):
        TokenListTokenizer(tok.tokens, text_kind="word")
    with pytest.raises(ValueError, match="bpemodel .* is required"):
        TokenListTokenizer(tok.tokens, text_kind="bpe")
    with pytest.raises(ValueError, match="bpemodel must be None"):
        TokenListTokenizer(tok.tokens, text_kind="char", bpemodel=bpe_dir / "bpe.model")
    with pytest.raises(FileNotFoundError, match="token list file not found"):
        TokenListTokenizer(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="sentencepiece model file not found"):
        SentencePieceTokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a valid sentencepiece model"):
        SentencePieceTokenizer(tmp_path / "junk.model")
    with pytest.raises(ValueError, match="line break"):
        CharTokenizer.train(["a\nb"])
    with pytest.raises(TypeError, match="texts must be an iterable"):
        CharTokenizer.train("abc")
    with pytest.raises(ValueError, match="vocab_size"):
        SentencePieceTokenizer.train(corpus(20), tmp_path / "v", vocab_size=5000)
    with pytest.raises(ValueError, match="duplicates"):  # would clash with the appended <sos/eos>
        SentencePieceTokenizer.train(
            corpus(20), tmp_path / "d", vocab_size=20, user_defined_symbols=["<sos/eos>"]
        )
    with pytest.raises(ValueError, match="model_type"):
        SentencePieceTokenizer.train(corpus(20), tmp_path / "v", vocab_size=20, model_type="word")
