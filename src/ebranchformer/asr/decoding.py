"""CTC decoding: greedy (best path) and prefix beam search (best labelling).

Inputs are CTC log-probabilities ``log_probs`` (B, T, V) (log-softmax over the vocabulary, blank at
``blank_id``, default 0) with ``lengths`` int64 (B,): frames ``t >= lengths[b]`` are padding and ignored.
Both decoders also take a single utterance (T, V) (``lengths`` then None or of shape (1,)). ``lengths=None``
means every frame is real. Results are lists of token-id lists, one per utterance, blanks and repeats
already removed (turn them into text with ``Tokenizer.decode``).

* :func:`ctc_greedy` -- argmax per frame, collapse repeats, drop blanks. Fast, batched.
* :func:`ctc_prefix_beam_search` -- keeps the ``beam`` most probable label prefixes, each scored by the
  total probability of all alignments producing it (blank-ending and non-blank-ending parts kept apart,
  so ``a a`` and ``a - a`` are told apart). Finds labellings that greedy misses when their probability is
  spread over many alignments. :func:`ctc_prefix_beam_search_nbest` returns the n best with scores.

Beam search with ``beam=1`` is *not* greedy decoding in general (it compares summed prefix probabilities,
greedy compares single frames); the two agree when every frame has one token with probability >= 0.75.

Example:
    >>> import torch
    >>> lp = torch.tensor([[0.6, 0.4], [0.6, 0.4]]).log()  # (T=2, V=2): blank, "a"
    >>> ctc_greedy(lp), ctc_prefix_beam_search(lp)  # P("")=0.36 < P("a")=0.64
    ([[]], [[1]])
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["CTCHypothesis", "ctc_greedy", "ctc_prefix_beam_search", "ctc_prefix_beam_search_nbest"]

_NEG_INF = -math.inf


class CTCHypothesis(NamedTuple):
    """One beam search result.

    Attributes:
        tokens: the label sequence (token ids, no blanks).
        log_prob: log P(tokens | x), summed over all alignments the search kept; exact when nothing that
            contributes was pruned, a lower bound otherwise.
        score: ``log_prob + length_bonus * len(tokens)``, what the search ranks by.
    """

    tokens: tuple[int, ...]
    log_prob: float
    score: float


def _check_inputs(
    log_probs: torch.Tensor, lengths: torch.Tensor | None, blank_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate; return log_probs (B, T, V) (its own device) and lengths int64 (B,) on the CPU."""
    if not isinstance(log_probs, torch.Tensor):
        raise TypeError(f"log_probs must be a torch.Tensor, got {type(log_probs).__name__}")
    if log_probs.dim() == 2:
        log_probs = log_probs.unsqueeze(0)  # (T, V) -> (1, T, V)
    if log_probs.dim() != 3:
        raise ValueError(f"log_probs must have shape (B, T, V) or (T, V), got {tuple(log_probs.shape)}")
    if not log_probs.is_floating_point():
        raise TypeError(f"log_probs must be a floating tensor, got {log_probs.dtype}")
    bsz, t_max, vocab = log_probs.shape
    if vocab < 1:
        raise ValueError(
            f"log_probs must have a vocabulary dimension V >= 1, got shape {tuple(log_probs.shape)}"
        )
    if isinstance(blank_id, bool) or not isinstance(blank_id, int) or not 0 <= blank_id < vocab:
        raise ValueError(f"blank_id must be an int in [0, V={vocab}), got {blank_id!r}")
    if lengths is None:
        lengths = torch.full((bsz,), t_max, dtype=torch.int64)
    elif not isinstance(lengths, torch.Tensor):
        raise TypeError(
            f"lengths must be an int64 torch.Tensor of shape (B,) or None, got {type(lengths).__name__}"
        )
    else:
        if lengths.dtype in (torch.bool,) or lengths.is_floating_point() or lengths.is_complex():
            raise TypeError(f"lengths must be an integer tensor, got {lengths.dtype}")
        if lengths.shape != (bsz,):
            raise ValueError(f"lengths must have shape (B,)=({bsz},), got {tuple(lengths.shape)}")
        lengths = lengths.detach().to("cpu", torch.int64)
        if bsz and (int(lengths.min()) < 0 or int(lengths.max()) > t_max):
            raise ValueError(f"lengths must lie in [0, T={t_max}], got {lengths.tolist()}")
    valid = torch.arange(t_max)[None, :] < lengths[:, None]  # (B, T) True on real frames
    if bool((torch.isnan(log_probs.detach()).any(-1).cpu() & valid).any()):
        raise ValueError("log_probs holds NaN on real frames (t < lengths[b])")
    return log_probs, lengths


def ctc_greedy(
    log_probs: torch.Tensor, lengths: torch.Tensor | None = None, blank_id: int = 0
) -> list[list[int]]:
    """Best-path CTC decoding: argmax per frame, collapse repeats, drop blanks.

    Args:
        log_probs: (B, T, V) or (T, V) scores (log-probabilities; any monotone scores work).
        lengths: int64 (B,) real frames per utterance, or None for all T. Frames ``t >= lengths[b]`` are ignored.
        blank_id: the blank index. Default 0.

    Returns:
        B lists of token ids. Ties in the argmax go to the lowest index.

    Example:
        >>> lp = torch.log(torch.tensor([[[.1, .9], [.1, .9], [.9, .1], [.2, .8]]]))  # (1, 4, 2)
        >>> ctc_greedy(lp, torch.tensor([4])), ctc_greedy(lp, torch.tensor([2]))
        ([[1, 1]], [[1]])
    """
    log_probs, lengths = _check_inputs(log_probs, lengths, blank_id)
    bsz, t_max, _ = log_probs.shape
    best = log_probs.detach().argmax(dim=-1).cpu()  # (B, T)
    valid = torch.arange(t_max)[None, :] < lengths[:, None]  # (B, T)
    prev = torch.cat([torch.full((bsz, 1), -1, dtype=best.dtype), best[:, :-1]], dim=1)  # (B, T) frame t-1
    keep = valid & (best != prev) & (best != blank_id)  # (B, T)
    return [best[b][keep[b]].tolist() for b in range(bsz)]


def _beam_search_one(
    lp: np.ndarray,
    beam: int,
    nbest: int,
    blank_id: int,
    length_bonus: float,
    token_prune: int | None,
    token_min_logp: float | None,
) -> list[CTCHypothesis]:
    """Prefix beam search over one utterance's real frames ``lp`` (T, V) float64."""
    t_len, vocab = lp.shape
    non_blank = np.array([v for v in range(vocab) if v != blank_id], dtype=np.int64)  # (V-1,)
    # The beam: prefixes with log P(prefix, alignment ends in blank) and (..., ends in its last token).
    prefixes: list[tuple[int, ...]] = [()]
    pb = np.zeros(1)  # (n,)
    pnb = np.full(1, _NEG_INF)  # (n,)
    col_of = np.full(vocab, -1, dtype=np.int64)  # token -> column among this frame's candidates
    for t in range(t_len):
        row = lp[t]  # (V,)
        # Candidate tokens to extend with: top-k non-blank, above the threshold, in id order.
        cand = non_blank
        if token_prune is not None and token_prune < cand.size:
            cand = cand[np.argpartition(-row[cand], token_prune - 1)[:token_prune]]
        if token_min_logp is not None:
            cand = cand[row[cand] >= token_min_logp]
        cand = np.sort(cand)  # (k,)
        n, k = len(prefixes), cand.size
        last = np.array([p[-1] if p else -1 for p in prefixes], dtype=np.int64)  # (n,)
        plen = np.array([len(p) for p in prefixes], dtype=np.float64)  # (n,)
        tot = np.logaddexp(pb, pnb)  # (n,)
        # Prefix unchanged: a blank frame, or the last token repeated without a blank in between.
        stay_pb = tot + row[blank_id]  # (n,)
        stay_pnb = np.where(last >= 0, pnb + row[np.maximum(last, 0)], _NEG_INF)  # (n,)
        # Prefix + c: after a blank-ending prefix always; after a non-blank one only when c differs.
        ext = (
            np.where(cand[None, :] == last[:, None], pb[:, None], tot[:, None]) + row[cand][None, :]
        )  # (n, k)
        # Extensions that land on a prefix already in the beam merge into its entry.
        col_of[cand] = np.arange(k)
        index = {p: i for i, p in enumerate(prefixes)}
        for i, p in enumerate(prefixes):
            j = index.get(p[:-1]) if p else None
            if j is None:
                continue
            c = p[-1]
            stay_pnb[i] = np.logaddexp(stay_pnb[i], (pb[j] if c == last[j] else tot[j]) + row[c])
            if col_of[c] >= 0:
                ext[j, col_of[c]] = _NEG_INF
        col_of[cand] = -1
        stay_tot = np.logaddexp(stay_pb, stay_pnb)  # (n,)
        rank = np.concatenate(
            [stay_tot + length_bonus * plen, (ext + length_bonus * (plen + 1.0)[:, None]).reshape(n * k)]
        )  # (n + n*k,) stays first, then extensions row-major
        order = np.argsort(-rank, kind="stable")[:beam]
        finite = order[rank[order] > _NEG_INF]
        order = finite if finite.size else order[:1]
        new_prefixes, new_pb, new_pnb = [], np.empty(order.size), np.empty(order.size)
        for m, idx in enumerate(order.tolist()):
            if idx < n:
                new_prefixes.append(prefixes[idx])
                new_pb[m], new_pnb[m] = stay_pb[idx], stay_pnb[idx]
            else:
                j, col = divmod(idx - n, k)
                new_prefixes.append(prefixes[j] + (int(cand[col]),))
                new_pb[m], new_pnb[m] = _NEG_INF, ext[j, col]
        prefixes, pb, pnb = new_prefixes, new_pb, new_pnb
    tot = np.logaddexp(pb, pnb)  # (n,)
    scores = tot + length_bonus * np.array([len(p) for p in prefixes], dtype=np.float64)  # (n,)
    order = np.argsort(-scores, kind="stable")[:nbest]
    return [CTCHypothesis(prefixes[i], float(tot[i]), float(scores[i])) for i in order.tolist()]


def ctc_prefix_beam_search_nbest(
    log_probs: torch.Tensor,
    lengths: torch.Tensor | None = None,
    beam: int = 8,
    nbest: int | None = None,
    blank_id: int = 0,
    length_bonus: float = 0.0,
    token_prune: int | None = 16,
    token_min_logp: float | None = None,
) -> list[list[CTCHypothesis]]:
    """CTC prefix beam search returning the ``nbest`` best hypotheses per utterance, best first.

    Args:
        log_probs: (B, T, V) or (T, V) CTC log-probabilities (log-softmax output).
        lengths: int64 (B,) real frames per utterance, or None for all T. Frames ``t >= lengths[b]`` are ignored.
        beam: prefixes kept after each frame (>= 1). Default 8.
        nbest: hypotheses returned per utterance, 1 <= nbest <= beam; None (default) returns the whole beam.
        blank_id: the blank index. Default 0.
        length_bonus: added to the score once per emitted token (> 0 favours longer outputs). Default 0.0.
        token_prune: per frame, only the ``token_prune`` most probable non-blank tokens may extend a prefix
            (None: all). Default 16.
        token_min_logp: per frame, tokens with log-probability below this may not extend a prefix
            (None: no threshold). Default None.

    Returns:
        B lists of :class:`CTCHypothesis` sorted by ``score``, at most ``nbest`` each (fewer when fewer
        labellings have non-zero probability). An utterance with 0 frames gives the empty labelling,
        log_prob 0.

    Example:
        >>> lp = torch.tensor([[0.6, 0.4], [0.6, 0.4]]).log()  # (T=2, V=2)
        >>> [(h.tokens, round(h.log_prob, 4)) for h in ctc_prefix_beam_search_nbest(lp)[0]]
        [((1,), -0.4463), ((), -1.0217)]
    """
    log_probs, lengths = _check_inputs(log_probs, lengths, blank_id)
    if isinstance(beam, bool) or not isinstance(beam, int) or beam < 1:
        raise ValueError(f"beam must be an int >= 1, got {beam!r}")
    if nbest is None:
        nbest = beam
    if isinstance(nbest, bool) or not isinstance(nbest, int) or not 1 <= nbest <= beam:
        raise ValueError(f"nbest must be an int in [1, beam={beam}] or None, got {nbest!r}")
    if token_prune is not None and (
        isinstance(token_prune, bool) or not isinstance(token_prune, int) or token_prune < 1
    ):
        raise ValueError(f"token_prune must be an int >= 1 or None, got {token_prune!r}")
    length_bonus = float(length_bonus)
    if not math.isfinite(length_bonus):
        raise ValueError(f"length_bonus must be finite, got {length_bonus!r}")
    if token_min_logp is not None:
        token_min_logp = float(token_min_logp)
        if math.isnan(token_min_logp):
            raise ValueError("token_min_logp must be a number or None, got NaN")
    lp_all = log_probs.detach().to("cpu", torch.float64).numpy()  # (B, T, V)
    return [
        _beam_search_one(
            lp_all[b, : int(lengths[b])], beam, nbest, blank_id, length_bonus, token_prune, token_min_logp
        )
        for b in range(lp_all.shape[0])
    ]


def ctc_prefix_beam_search(
    log_probs: torch.Tensor,
    lengths: torch.Tensor | None = None,
    beam: int = 8,
    blank_id: int = 0,
    length_bonus: float = 0.0,
    token_prune: int | None = 16,
    token_min_logp: float | None = None,
) -> list[list[int]]:
    """The best labelling per utterance from CTC prefix beam search (token-id lists, no blanks).

    Arguments as :func:`ctc_prefix_beam_search_nbest` (which also gives scores and the n best).

    Example:
        >>> lp = torch.tensor([[[0.6, 0.4], [0.6, 0.4]], [[0.1, 0.9], [0.9, 0.1]]]).log()  # (B=2, T=2, V=2)
        >>> ctc_prefix_beam_search(lp, torch.tensor([2, 1]), beam=4)
        [[1], [1]]
    """
    hyps = ctc_prefix_beam_search_nbest(
        log_probs,
        lengths,
        beam=beam,
        nbest=1,
        blank_id=blank_id,
        length_bonus=length_bonus,
        token_prune=token_prune,
        token_min_logp=token_min_logp,
    )
    return [list(h[0].tokens) for h in hyps]
