"""Closed-vocabulary decoding: a CTC beam search that only spells words of a lexicon, and a word corrector.

When every sentence is made of known words (the demo's corpus draws its words from
:data:`~ebranchformer.asr.synth_text.VOCABULARY`), the recognizer can be told so:

* :func:`ctc_lexicon_beam_search` -- CTC prefix beam search (as :mod:`~ebranchformer.asr.decoding`, with the
  blank-ending / non-blank-ending split) over a token trie of the words: a hypothesis may only extend its current
  word along the trie, and may only start a new word (the word separator, e.g. ``<space>``, or a
  sentencepiece ``▁`` piece) where its current word is complete. The result is the most probable *word
  sequence* in the beam, scored by the summed probability of its CTC alignments (no language model; the words
  are equally likely). It works with any tokenizer whose text splits into words at spaces
  (``CharTokenizer``, sentencepiece) and needs no extra data beyond the word list.
* :func:`correct_to_lexicon` -- the cheap alternative on any decoded text: each word is replaced by the
  lexicon word at the smallest edit distance (ties: the earlier word of the list).

Both are opt-in decoding options (``ebranchformer transcribe/evaluate --lexicon WORDS.txt``; the demo reports
its WER with and without them).

Example:
    >>> from ebranchformer.asr.tokenizer import CharTokenizer
    >>> tok = CharTokenizer(["<blank>", "<unk>", "a", "b", "c", "<space>", "<sos/eos>"])
    >>> lex = Lexicon(["ab", "cab"], tok)
    >>> import torch
    >>> ids = [2, 3, 5, 4, 2, 3]  # "ab cab", one frame per token
    >>> lp = torch.full((6, 7), -8.0); lp[torch.arange(6), ids] = -0.01
    >>> ctc_lexicon_beam_search(lp, lex)
    ['ab', 'cab']
    >>> correct_to_lexicon("ac cob", ["ab", "cab"])
    'ab cab'
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ebranchformer.asr.tokenizer import Tokenizer

__all__ = ["Lexicon", "correct_to_lexicon", "ctc_lexicon_beam_search", "edit_distance", "read_word_list"]

_NEG_INF = -math.inf


def read_word_list(path: str | os.PathLike) -> list[str]:
    """Words of a text file, one per line (blank lines and ``#`` comments ignored; duplicates dropped)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the word list {str(path)!r}: {e}") from e
    words: list[str] = []
    for line in text.splitlines():
        w = line.split("#", 1)[0].strip()
        if w and w not in words:
            if any(ch.isspace() for ch in w):
                raise ValueError(f"word list {str(path)!r}: {w!r} is not a single word")
            words.append(w)
    if not words:
        raise ValueError(f"word list {str(path)!r} holds no words")
    return words


class Lexicon:
    """Token tries of a word list for :func:`ctc_lexicon_beam_search`.

    Args:
        words: the allowed words (no whitespace inside; duplicates are ignored).
        tokenizer: the model's tokenizer. Each word must tokenize without ``<unk>``, and the tokenization of
            ``"w1 w2"`` must be that of ``w1`` followed by a separator-plus-``w2`` part (true for characters and
            sentencepiece, which both split at spaces).

    Attributes:
        words: the words, in the given order.
        first: token ids of each word at the start of a sentence; ``next``: after another word (with the
            separator, e.g. ``<space>`` + letters for characters).
    """

    def __init__(self, words: Iterable[str], tokenizer: Tokenizer) -> None:
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer must be a Tokenizer, got {type(tokenizer).__name__}")
        if isinstance(words, str):
            raise TypeError("words must be a sequence of words, not one string")
        uniq: list[str] = []
        for w in words:
            if not isinstance(w, str) or not w or any(ch.isspace() for ch in w):
                raise ValueError(f"lexicon words must be non-empty strings without spaces, got {w!r}")
            if w not in uniq:
                uniq.append(w)
        if not uniq:
            raise ValueError("the lexicon needs at least one word")
        self.words = uniq
        self.tokenizer = tokenizer
        self.first: list[tuple[int, ...]] = []
        self.next: list[tuple[int, ...]] = []
        for w in uniq:
            alone = tokenizer.encode(w)
            pair = tokenizer.encode(f"{w} {w}")
            if tokenizer.unk_id in alone:
                raise ValueError(f"lexicon word {w!r} has characters the tokenizer does not know (<unk>)")
            if not alone or pair[: len(alone)] != alone or len(pair) == len(alone):
                raise ValueError(
                    f"the tokenizer does not split {w!r} at spaces (encode({w + ' ' + w!r}) does not start "
                    "with encode(word)); the lexicon search needs a word-separable tokenizer"
                )
            self.first.append(tuple(alone))
            self.next.append(tuple(pair[len(alone) :]))
        # One node table for both tries: node 0 is the sentence-start root, node 1 the after-a-word root.
        self.children: list[dict[int, int]] = [{}, {}]
        self.token: list[int] = [-1, -1]  # the token that leads into each node
        self.word_at: list[int] = [-1, -1]  # the word a node completes, or -1
        for root, seqs in ((0, self.first), (1, self.next)):
            for wi, seq in enumerate(seqs):
                node = root
                for t in seq:
                    nxt = self.children[node].get(t)
                    if nxt is None:
                        nxt = len(self.token)
                        self.children[node][t] = nxt
                        self.children.append({})
                        self.token.append(t)
                        self.word_at.append(-1)
                    node = nxt
                if self.word_at[node] < 0:  # a word spelled like an earlier one is that word
                    self.word_at[node] = wi

    @classmethod
    def from_file(cls, path: str | os.PathLike, tokenizer: Tokenizer) -> Lexicon:
        """A lexicon from a word-list file (:func:`read_word_list`)."""
        return cls(read_word_list(path), tokenizer)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the word list (one word per line); :meth:`from_file` reads it back."""
        path = Path(path)
        path.write_text("".join(w + "\n" for w in self.words), encoding="utf-8")
        return path

    def __len__(self) -> int:
        return len(self.words)

    def __repr__(self) -> str:
        return f"Lexicon({len(self.words)} words, {len(self.token)} trie nodes)"


def _lae(a: float, b: float) -> float:
    """log(exp(a) + exp(b))."""
    if a == _NEG_INF:
        return b
    if b == _NEG_INF:
        return a
    if a < b:
        a, b = b, a
    return a + math.log1p(math.exp(b - a))


def _accumulate(table: dict, key: tuple, pb: float, pnb: float) -> None:
    """Add a path's blank-ending and non-blank-ending probabilities to ``table[key]`` (log space)."""
    cur = table.get(key)
    if cur is None:
        table[key] = [pb, pnb]
    else:
        cur[0], cur[1] = _lae(cur[0], pb), _lae(cur[1], pnb)


def ctc_lexicon_beam_search(
    log_probs: torch.Tensor,
    lexicon: Lexicon,
    beam: int = 8,
    word_bonus: float = 0.0,
    token_prune: int | None = 8,
    token_min_logp: float | None = -12.0,
) -> list[str]:
    """The most probable word sequence of one utterance's CTC log-probabilities, spelling lexicon words only.

    Args:
        log_probs: (T, V) CTC log-probabilities (real frames only), blank at ``lexicon.tokenizer.blank_id``.
        lexicon: the :class:`Lexicon` (built with the model's tokenizer).
        beam: hypotheses kept after each frame (>= 1). Default 8.
        word_bonus: added to the score per word (> 0 favours more words). Default 0.
        token_prune: per frame, only the ``token_prune`` most probable non-blank tokens may extend a
            hypothesis (None: all). Default 8.
        token_min_logp: per frame, tokens below this log-probability may not extend (None: no threshold).
            Default -12.

    Returns:
        The words (strings). Hypotheses that end inside a word are only used when no complete one survived
        (their last, incomplete word is dropped).
    """
    if not isinstance(lexicon, Lexicon):
        raise TypeError(f"lexicon must be a Lexicon, got {type(lexicon).__name__}")
    if not isinstance(log_probs, torch.Tensor) or log_probs.dim() != 2:
        raise ValueError(f"log_probs must be a (T, V) tensor, got {getattr(log_probs, 'shape', log_probs)!r}")
    vocab = lexicon.tokenizer.vocab_size
    if log_probs.shape[1] != vocab:
        raise ValueError(f"log_probs has V={log_probs.shape[1]}, the lexicon's tokenizer {vocab}")
    if isinstance(beam, bool) or not isinstance(beam, int) or beam < 1:
        raise ValueError(f"beam must be an int >= 1, got {beam!r}")
    if token_prune is not None and (isinstance(token_prune, bool) or not isinstance(token_prune, int)
                                    or token_prune < 1):
        raise ValueError(f"token_prune must be an int >= 1 or None, got {token_prune!r}")
    blank = lexicon.tokenizer.blank_id
    lp = log_probs.detach().to("cpu", torch.float64).numpy()  # (T, V)
    children, token_of, word_at = lexicon.children, lexicon.token, lexicon.word_at
    non_blank = np.array([v for v in range(vocab) if v != blank], dtype=np.int64)
    # hypothesis key (words, node) -> [log P(ends in blank), log P(ends in its last token)]
    hyps: dict[tuple[tuple[int, ...], int], list[float]] = {((), 0): [0.0, _NEG_INF]}
    for t in range(lp.shape[0]):
        row = lp[t]
        cand = non_blank
        if token_prune is not None and token_prune < cand.size:
            cand = cand[np.argpartition(-row[cand], token_prune - 1)[:token_prune]]
        if token_min_logp is not None:
            cand = cand[row[cand] >= token_min_logp]
        allowed = {int(c): float(row[c]) for c in cand}
        p_blank = float(row[blank])
        new: dict[tuple[tuple[int, ...], int], list[float]] = {}
        for (words, node), (pb, pnb) in hyps.items():
            tot = _lae(pb, pnb)
            last = token_of[node]
            # stay: a blank, or the last token repeated without a blank in between
            _accumulate(new, (words, node), tot + p_blank, pnb + float(row[last]) if last >= 0 else _NEG_INF)
            # extend the current word along the trie
            for c, child in children[node].items():
                lpc = allowed.get(c)
                if lpc is not None:
                    _accumulate(new, (words, child), _NEG_INF, (pb if c == last else tot) + lpc)
            # or, where a word is complete, start the next one
            w = word_at[node]
            if w >= 0:
                for c, child in children[1].items():
                    lpc = allowed.get(c)
                    if lpc is not None:
                        _accumulate(new, (words + (w,), child), _NEG_INF, (pb if c == last else tot) + lpc)

        def score(item):
            (words, node), (pb, pnb) = item
            return _lae(pb, pnb) + word_bonus * (len(words) + (word_at[node] >= 0))

        ranked = sorted(new.items(), key=score, reverse=True)[:beam]
        hyps = dict(ranked)

    def final(item):
        (words, node), (pb, pnb) = item
        return _lae(pb, pnb) + word_bonus * (len(words) + (word_at[node] >= 0))

    done = [item for item in hyps.items() if item[0][1] == 0 or word_at[item[0][1]] >= 0]
    (words, node), _ = max(done or list(hyps.items()), key=final)
    ids = list(words) + ([word_at[node]] if word_at[node] >= 0 else [])
    return [lexicon.words[i] for i in ids]


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def correct_to_lexicon(text: str, words: Sequence[str]) -> str:
    """Replace each word of ``text`` by the nearest word of ``words`` (edit distance; ties: earlier word)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    vocab = tuple(words)
    if not vocab:
        raise ValueError("words must not be empty")
    return " ".join(_nearest(w, vocab) for w in text.split())


@lru_cache(maxsize=65536)
def _nearest(word: str, vocab: tuple[str, ...]) -> str:
    if word in vocab:
        return word
    return min(vocab, key=lambda v: edit_distance(word, v))
