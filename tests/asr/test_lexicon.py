"""Closed-vocabulary decoding: the lexicon tries, the lexicon-constrained CTC beam search (exact word sequences
from clean posteriors, words outside the lexicon never come out, repeated letters, sentencepiece tokens) and the
nearest-word corrector."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ebranchformer.asr.lexicon import (
    Lexicon,
    correct_to_lexicon,
    ctc_lexicon_beam_search,
    edit_distance,
    read_word_list,
)
from ebranchformer.asr.synth_text import VOCABULARY
from ebranchformer.asr.tokenizer import CharTokenizer, SentencePieceTokenizer


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer.train([" ".join(VOCABULARY)])


def _posteriors(tok, text: str, frames_per_token: int = 2, noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    """(T, V) log-probs spelling ``text``: each token for some frames, a blank between tokens."""
    rng = np.random.default_rng(seed)
    ids = tok.encode(text)
    seq: list[int] = [0]
    for i in ids:
        seq += [i] * frames_per_token + [0]
    logits = np.full((len(seq), tok.vocab_size), -6.0) + noise * rng.standard_normal((len(seq), tok.vocab_size))
    logits[np.arange(len(seq)), seq] = 4.0
    return torch.log_softmax(torch.tensor(logits), dim=-1)


def test_clean_posteriors_give_the_sentence(tok):
    lex = Lexicon(VOCABULARY, tok)
    for text in ("the cat sat", "seven green apple tree", "hello book"):
        words = [w for w in text.split() if w in VOCABULARY]
        lp = _posteriors(tok, " ".join(words))
        assert ctc_lexicon_beam_search(lp, lex) == words


def test_repeated_letters_need_their_blank(tok):
    lex = Lexicon(["book", "bok", "apple"], tok)
    assert ctc_lexicon_beam_search(_posteriors(tok, "book apple"), lex) == ["book", "apple"]


def test_misspelled_posteriors_snap_to_lexicon_words(tok):
    lex = Lexicon(VOCABULARY, tok)
    lp = _posteriors(tok, "the cat", noise=0.0)
    # make the "a" of cat ambiguous with "u": "cut" is not a word, so "cat" must win
    a, u = tok.encode("a")[0], tok.encode("u")[0]
    frames = (lp.argmax(-1) == a).nonzero().flatten()
    lp = lp.clone()
    lp[frames, u] = lp[frames, a] + 0.5
    lp = torch.log_softmax(lp, -1)
    assert ctc_lexicon_beam_search(lp, lex) == ["the", "cat"]
    from ebranchformer.asr.decoding import ctc_greedy

    assert tok.decode(ctc_greedy(lp)[0]) == "the cut"


def test_only_lexicon_words_come_out_of_noise(tok):
    lex = Lexicon(["red", "blue", "green"], tok)
    torch.manual_seed(0)
    lp = torch.log_softmax(torch.randn(60, tok.vocab_size) * 3, -1)
    words = ctc_lexicon_beam_search(lp, lex, beam=4)
    assert set(words) <= {"red", "blue", "green"}


def test_sentencepiece_tokenizer(tmp_path):
    texts = [" ".join(np.random.default_rng(i).choice(VOCABULARY, 6)) for i in range(300)]
    sp = SentencePieceTokenizer.train(texts, tmp_path, vocab_size=120)
    lex = Lexicon(VOCABULARY, sp)
    assert all(seq and sp.tokens[seq[0]].startswith("▁") for seq in lex.first)
    lp = _posteriors(sp, "green apple and seven")
    assert ctc_lexicon_beam_search(lp, lex) == ["green", "apple", "and", "seven"]


def test_bad_input(tok):
    lex = Lexicon(["ab"], tok)
    with pytest.raises(ValueError, match="without spaces"):
        Lexicon(["a b"], tok)
    with pytest.raises(ValueError, match="<unk>"):
        Lexicon(["naïve"], tok)
    with pytest.raises(TypeError, match="sequence of words"):
        Lexicon("ab", tok)
    with pytest.raises(ValueError, match="at least one"):
        Lexicon([], tok)
    with pytest.raises(ValueError, match=r"\(T, V\)"):
        ctc_lexicon_beam_search(torch.zeros(2, 3, tok.vocab_size), lex)
    with pytest.raises(ValueError, match="V="):
        ctc_lexicon_beam_search(torch.zeros(3, tok.vocab_size + 1), lex)
    with pytest.raises(ValueError, match="beam"):
        ctc_lexicon_beam_search(torch.zeros(3, tok.vocab_size), lex, beam=0)


def test_empty_and_silent_input(tok):
    lex = Lexicon(["ab"], tok)
    assert ctc_lexicon_beam_search(torch.zeros(0, tok.vocab_size), lex) == []
    silent = torch.full((5, tok.vocab_size), -20.0)
    silent[:, 0] = 0.0
    assert ctc_lexicon_beam_search(silent, lex) == []


def test_word_list_round_trip(tok, tmp_path):
    lex = Lexicon(["red", "blue", "red"], tok)
    assert lex.words == ["red", "blue"] and len(lex) == 2
    path = lex.save(tmp_path / "words.txt")
    assert read_word_list(path) == ["red", "blue"]
    (tmp_path / "bad.txt").write_text("two words\n")
    with pytest.raises(ValueError, match="single word"):
        read_word_list(tmp_path / "bad.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="no words"):
        read_word_list(tmp_path / "empty.txt")


def test_corrector():
    assert edit_distance("kitten", "sitting") == 3
    assert correct_to_lexicon("the katt sat", ["the", "cat", "sat"]) == "the cat sat"
    assert correct_to_lexicon("", ["a"]) == ""
    with pytest.raises(ValueError):
        correct_to_lexicon("x", [])
