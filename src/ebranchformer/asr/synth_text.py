"""The text side of the synthetic demo corpus: a built-in English vocabulary and random sentences.

Every word is lowercase ASCII letters only and has one unambiguous pronunciation (no ``read``,
``live``, ``wind``...), so a character tokenizer covers all texts and the audio matches the text.

Example:
    >>> import numpy as np
    >>> from ebranchformer.asr.synth_text import sample_sentences
    >>> sentences = sample_sentences(np.random.default_rng(0), 3, min_words=3, max_words=8)
    >>> len(set(sentences)), all(3 <= len(s.split()) <= 8 for s in sentences)
    (3, True)
"""

from __future__ import annotations

import re

import numpy as np

__all__ = ["VOCABULARY", "normalize_text", "sample_sentences", "sentence_capacity"]

_WORDS = """
zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen
sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand
red blue green yellow black white brown orange purple pink gray golden silver
cat dog horse cow sheep goat pig bird fish mouse rabbit fox wolf bear lion tiger zebra monkey snake
frog duck chicken eagle owl whale shark turtle spider bee camel
run jump walk swim fly eat drink sleep sing dance play see find take give make open carry push pull
throw catch climb build paint cook wash buy sell watch help call bring hold like want need know think write
house car tree book door window table chair apple bread water milk cheese river mountain garden city
street school ship boat train road bridge phone ball box cup hat shoe key clock lamp bed ring stone
flower forest beach island cloud rain snow sun moon star morning night
big small happy sad fast slow hot cold old new good bad tall short loud quiet soft hard dark bright
clean dirty heavy empty full
man woman boy girl teacher doctor farmer king queen friend mother father sister brother baby
the a and on in under over with to from near my your his her our their this that every some many
no very today tomorrow yesterday here there not
"""

VOCABULARY: tuple[str, ...] = tuple(_WORDS.split())
"""The built-in word list (numbers, colours, animals, verbs, nouns, adjectives, people, function words)."""

_NON_LETTERS = re.compile(r"[^a-z]+")


def normalize_text(text: str) -> str:
    """Lowercase ``text`` and keep only words of letters a-z, separated by single spaces."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return " ".join(_NON_LETTERS.split(text.lower())).strip()


def sentence_capacity(min_words: int, max_words: int) -> int:
    """How many distinct sentences of ``min_words``..``max_words`` words the vocabulary allows."""
    return sum(len(VOCABULARY) ** n for n in range(min_words, max_words + 1))


def sample_sentences(rng: np.random.Generator, count: int, min_words: int = 3, max_words: int = 8,
                     exclude: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """``count`` distinct random sentences of ``min_words``..``max_words`` words, none in ``exclude``.

    Words are drawn uniformly from :data:`VOCABULARY`; the result depends only on ``rng``'s state.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be an int >= 0, got {count!r}")
    if not (isinstance(min_words, int) and isinstance(max_words, int) and 1 <= min_words <= max_words):
        raise ValueError(f"need 1 <= min_words <= max_words, got min_words={min_words!r}, "
                         f"max_words={max_words!r}")
    if count + len(exclude) > sentence_capacity(min_words, max_words):
        raise ValueError(f"count={count} is more than the {min_words}-{max_words} word sentences available")
    seen = set(exclude)
    out: list[str] = []
    while len(out) < count:
        n = int(rng.integers(min_words, max_words + 1))
        sentence = " ".join(VOCABULARY[i] for i in rng.integers(0, len(VOCABULARY), size=n))
        if sentence not in seen:
            seen.add(sentence)
            out.append(sentence)
    return out
