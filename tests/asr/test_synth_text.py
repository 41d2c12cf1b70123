"""Vocabulary and random sentences of the synthetic corpus."""

import re

import numpy as np
import pytest

from ebranchformer.asr.synth_text import VOCABULARY, normalize_text, sample_sentences, sentence_capacity


def test_vocabulary_is_large_distinct_and_lowercase_letters():
    assert len(VOCABULARY) >= 150
    assert len(set(VOCABULARY)) == len(VOCABULARY)
    assert all(re.fullmatch(r"[a-z]+", w) for w in VOCABULARY)
    numbers = ["zero", "seven", "twenty", "thirty", "ninety", "hundred"]
    assert set(numbers) <= set(VOCABULARY)


def test_sentences_are_distinct_in_range_and_reproducible():
    sentences = sample_sentences(np.random.default_rng(3), 500, min_words=3, max_words=8)
    assert len(set(sentences)) == 500
    lengths = [len(s.split()) for s in sentences]
    assert min(lengths) == 3 and max(lengths) == 8
    assert all(normalize_text(s) == s and set(s.split()) <= set(VOCABULARY) for s in sentences)
    assert sample_sentences(np.random.default_rng(3), 500, 3, 8) == sentences
    assert sample_sentences(np.random.default_rng(4), 500, 3, 8) != sentences


def test_excluded_sentences_never_come_back():
    one_word = sample_sentences(np.random.default_rng(0), len(VOCABULARY) - 5, 1, 1)
    rest = sample_sentences(np.random.default_rng(1), 5, 1, 1, exclude=set(one_word))
    assert sorted(one_word + rest) == sorted(VOCABULARY)
    with pytest.raises(ValueError, match="more than"):
        sample_sentences(np.random.default_rng(1), 6, 1, 1, exclude=set(one_word))
    assert sentence_capacity(1, 2) == len(VOCABULARY) + len(VOCABULARY) ** 2


def test_normalize_text():
    assert normalize_text("  Seven,  RED cats!\n") == "seven red cats"
    assert normalize_text("it's 42") == "it s"
    with pytest.raises(TypeError):
        normalize_text(None)


@pytest.mark.parametrize("count, lo, hi", [(-1, 3, 8), (2, 0, 3), (2, 5, 4), (True, 3, 8)])
def test_bad_sampling_arguments_raise(count, lo, hi):
    with pytest.raises(ValueError):
        sample_sentences(np.random.default_rng(0), count, lo, hi)
