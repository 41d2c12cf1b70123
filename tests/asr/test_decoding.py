"""CTC greedy and prefix beam search, checked against brute-force sums over all alignments."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ebranchformer.asr.decoding import (
    CTCHypothesis,
    ctc_greedy,
    ctc_prefix_beam_search,
    ctc_prefix_beam_search_nbest,
)

SETTINGS = settings(max_examples=60, deadline=None)


def random_log_probs(seed: int, shape: tuple[int, ...], scale: float = 2.0) -> torch.Tensor:
    """Log-softmax of scaled Gaussian logits, float64, shape ``shape`` (..., V)."""
    rng = np.random.default_rng(seed)
    return torch.log_softmax(torch.from_numpy(rng.normal(size=shape) * scale), dim=-1)


def brute_force_labellings(log_probs: torch.Tensor, blank: int = 0) -> dict[tuple[int, ...], float]:
    """log P(labelling) for every labelling, by enumerating all V**T alignments (T, V) one by one."""
    lp = log_probs.double().tolist()
    t_len, vocab = len(lp), (len(lp[0]) if lp else 0)
    paths: dict[tuple[int, ...], list[float]] = {}
    for path in itertools.product(range(vocab), repeat=t_len):
        labels = tuple(k for k, _ in itertools.groupby(path) if k != blank)  # collapse, drop blanks
        paths.setdefault(labels, []).append(sum(lp[t][v] for t, v in enumerate(path)))
    return {lab: float(np.logaddexp.reduce(np.array(v))) for lab, v in paths.items()}


def peaky_log_probs(seed: int, t_len: int, vocab: int, peak: float) -> torch.Tensor:
    """(T, V) log-probs where every frame's best token has probability >= ``peak``."""
    rng = np.random.default_rng(seed)
    probs = np.empty((t_len, vocab))
    for t in range(t_len):
        top = rng.integers(vocab)
        p_top = rng.uniform(peak, 0.999)
        rest = rng.dirichlet(np.ones(vocab - 1)) * (1.0 - p_top)
        probs[t] = np.insert(rest, top, p_top)
    return torch.from_numpy(probs).log()


# ----------------------------------------------------------------------------------------------- greedy


@SETTINGS
@given(path=st.lists(st.integers(0, 4), min_size=0, max_size=12), seed=st.integers(0, 2**31 - 1))
def test_greedy_collapses_repeats_then_drops_blanks(path, seed):
    rng = np.random.default_rng(seed)
    logits = rng.uniform(-1.0, 0.0, size=(len(path), 5))  # (T, V)
    logits[np.arange(len(path)), path] = 1.0  # the path is the argmax
    lp = torch.log_softmax(torch.from_numpy(logits), dim=-1)
    expected = [k for k, _ in itertools.groupby(path) if k != 0]
    assert ctc_greedy(lp) == [expected]
    assert ctc_greedy(lp[None], torch.tensor([len(path)])) == [expected]


def test_greedy_respects_blank_id():
    # path a a <blank=2> a b  ->  [a, a, b] when 2 is blank; with 0 as blank, 2 is a token.
    path = [1, 1, 2, 1, 3]
    lp = torch.full((5, 4), -5.0)
    lp[torch.arange(5), torch.tensor(path)] = -0.01
    assert ctc_greedy(lp, blank_id=2) == [[1, 1, 3]]
    assert ctc_greedy(lp, blank_id=0) == [[1, 2, 1, 3]]


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), bsz=st.integers(1, 4), t_max=st.integers(1, 9))
def test_greedy_ignores_padding_and_matches_single(seed, bsz, t_max):
    rng = np.random.default_rng(seed)
    lp = random_log_probs(seed, (bsz, t_max, 4))
    lengths = torch.from_numpy(rng.integers(0, t_max + 1, size=bsz)).long()
    padded = lp.clone()
    for b in range(bsz):
        padded[b, lengths[b] :] = torch.from_numpy(rng.normal(size=(t_max - int(lengths[b]), 4)) * 50)
    out = ctc_greedy(padded, lengths)
    assert out == [ctc_greedy(lp[b, : lengths[b]])[0] for b in range(bsz)]


# ----------------------------------------------------------------------------------------------- beam search


def test_beam_search_finds_labelling_greedy_misses():
    # Each frame: blank 0.6, "a" 0.4. Greedy takes the all-blank path, P("") = 0.6**3 = 0.216, while "a"
    # collects every alignment with one contiguous a-block: 3 * .4 * .36 + 2 * .16 * .6 + .064 = 0.688.
    lp = torch.tensor([[0.6, 0.4, 0.0]] * 3, dtype=torch.float64).log()  # (T=3, V=3)
    truth = brute_force_labellings(lp)
    best = max(truth, key=truth.get)
    assert ctc_greedy(lp) == [[]]
    assert ctc_prefix_beam_search(lp, beam=4) == [list(best)]
    assert best == (1,) and truth[(1,)] > truth[()]
    assert math.isclose(math.exp(truth[(1,)]), 0.688, rel_tol=1e-9)


def test_beam_one_differs_from_greedy_and_is_more_probable_here():
    # Frame 1: blank .4, a .6; frame 2: blank .3, a .3, b .4. Greedy: a b (P = .24); P(a) = .18+.18+.12 = .48.
    lp = torch.tensor([[0.4, 0.6, 0.0], [0.3, 0.3, 0.4]], dtype=torch.float64).log()  # (T=2, V=3)
    truth = brute_force_labellings(lp)
    assert ctc_greedy(lp) == [[1, 2]]
    assert ctc_prefix_beam_search(lp, beam=1) == [[1]]
    assert truth[(1,)] > truth[(1, 2)]
    assert math.isclose(math.exp(truth[(1,)]), 0.48, rel_tol=1e-9)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), t_len=st.integers(0, 30), vocab=st.integers(2, 7))
def test_beam_one_equals_greedy_on_peaky_frames(seed, t_len, vocab):
    # When every frame's best token has probability >= 0.8, beam 1 keeps the greedy prefix at every step.
    lp = peaky_log_probs(seed, t_len, vocab, peak=0.8)
    assert ctc_prefix_beam_search(lp, beam=1, token_prune=None) == ctc_greedy(lp)
    assert ctc_prefix_beam_search(lp, beam=1, token_prune=1) == ctc_greedy(lp)


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    t_len=st.integers(0, 5),
    vocab=st.integers(2, 3),
    length_bonus=st.sampled_from([0.0, -1.5, 0.7, 2.0]),
    blank_id=st.integers(0, 2),
)
def test_exhaustive_beam_scores_equal_brute_force(seed, t_len, vocab, length_bonus, blank_id):
    blank_id %= vocab
    lp = random_log_probs(seed, (t_len, vocab), scale=1.5)
    truth = brute_force_labellings(lp, blank=blank_id)
    n_prefixes = sum((vocab - 1) ** n for n in range(t_len + 1))  # every labelling fits: the search is exact
    hyps = ctc_prefix_beam_search_nbest(
        lp, beam=n_prefixes, blank_id=blank_id, length_bonus=length_bonus, token_prune=None
    )[0]
    assert len(hyps) == len(truth)
    assert {h.tokens for h in hyps} == set(truth)
    for h in hyps:
        assert isinstance(h, CTCHypothesis)
        assert h.log_prob == pytest.approx(truth[h.tokens], abs=1e-9)
        assert h.score == pytest.approx(h.log_prob + length_bonus * len(h.tokens), abs=1e-12)
    assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
    best_score = max(v + length_bonus * len(k) for k, v in truth.items())
    assert hyps[0].score == pytest.approx(best_score, abs=1e-9)
    assert ctc_prefix_beam_search(
        lp, beam=n_prefixes, blank_id=blank_id, length_bonus=length_bonus, token_prune=None
    ) == [list(hyps[0].tokens)]


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    t_len=st.integers(1, 6),
    beam=st.integers(1, 4),
    token_prune=st.sampled_from([None, 1, 2]),
)
def test_pruned_scores_are_lower_bounds(seed, t_len, beam, token_prune):
    lp = random_log_probs(seed, (t_len, 4))
    truth = brute_force_labellings(lp)
    hyps = ctc_prefix_beam_search_nbest(lp, beam=beam, token_prune=token_prune)[0]
    assert 1 <= len(hyps) <= beam
    assert len({h.tokens for h in hyps}) == len(hyps)
    for h in hyps:
        assert h.log_prob <= truth[h.tokens] + 1e-9


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1), bsz=st.integers(1, 4), t_max=st.integers(1, 12), beam=st.integers(1, 6)
)
def test_batched_equals_single_and_padding_is_ignored(seed, bsz, t_max, beam):
    rng = np.random.default_rng(seed)
    lp = random_log_probs(seed, (bsz, t_max, 5))
    lengths = torch.from_numpy(rng.integers(0, t_max + 1, size=bsz)).long()
    padded = lp.clone()
    for b in range(bsz):  # garbage, even NaN, past the end
        pad = rng.normal(size=(t_max - int(lengths[b]), 5)) * 100
        pad[:, 0] = np.nan
        padded[b, lengths[b] :] = torch.from_numpy(pad)
    batched = ctc_prefix_beam_search_nbest(padded, lengths, beam=beam, token_prune=3)
    single = [
        ctc_prefix_beam_search_nbest(lp[b, : lengths[b]], beam=beam, token_prune=3)[0] for b in range(bsz)
    ]
    assert batched == single
    assert ctc_prefix_beam_search(padded, lengths, beam=beam, token_prune=3) == [
        list(h[0].tokens) for h in single
    ]


def test_zero_length_utterance_gives_empty_labelling():
    lp = random_log_probs(0, (2, 3, 4))
    hyps = ctc_prefix_beam_search_nbest(lp, torch.tensor([0, 3]), beam=3)
    assert hyps[0] == [CTCHypothesis((), 0.0, 0.0)]
    assert ctc_greedy(lp, torch.tensor([0, 3]))[0] == []


def test_token_min_logp_blocks_unlikely_tokens():
    lp = random_log_probs(3, (4, 5))
    top_non_blank = float(lp[:, 1:].max())
    hyps = ctc_prefix_beam_search_nbest(lp, beam=4, token_min_logp=top_non_blank + 1e-6)[0]
    assert [h.tokens for h in hyps] == [()]
    assert hyps[0].log_prob == pytest.approx(float(lp[:, 0].sum()), abs=1e-9)  # only the all-blank path


def test_large_positive_length_bonus_prefers_longer_output():
    lp = torch.tensor([[0.6, 0.4]] * 3, dtype=torch.float64).log()  # (T=3, V=2)
    truth = brute_force_labellings(lp)
    hyps = ctc_prefix_beam_search_nbest(lp, beam=8, length_bonus=5.0, token_prune=None)[0]
    assert hyps[0].tokens == (1, 1)
    assert hyps[0].log_prob == pytest.approx(truth[(1, 1)], abs=1e-12)


def test_accepts_float32_and_requires_grad():
    lp = random_log_probs(1, (2, 6, 5)).float().requires_grad_()
    assert ctc_prefix_beam_search(lp, torch.tensor([6, 4])) == ctc_prefix_beam_search(
        lp.detach().double(), torch.tensor([6, 4])
    )


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"log_probs": torch.zeros(5)}, ValueError, "log_probs must have shape"),
        ({"log_probs": torch.zeros(1, 2, 3, 4)}, ValueError, "log_probs must have shape"),
        ({"log_probs": np.zeros((2, 3))}, TypeError, "log_probs must be a torch.Tensor"),
        ({"log_probs": torch.zeros(2, 3, dtype=torch.long)}, TypeError, "floating"),
        ({"lengths": torch.tensor([4])}, ValueError, "lengths must lie in"),
        ({"lengths": torch.tensor([-1])}, ValueError, "lengths must lie in"),
        ({"lengths": torch.tensor([1, 2])}, ValueError, r"lengths must have shape \(B,\)"),
        ({"lengths": torch.tensor([2.0])}, TypeError, "lengths must be an integer tensor"),
        ({"lengths": [2]}, TypeError, "lengths must be"),
        ({"blank_id": 4}, ValueError, "blank_id"),
        ({"blank_id": -1}, ValueError, "blank_id"),
        ({"log_probs": torch.full((1, 3, 4), float("nan"))}, ValueError, "NaN"),
    ],
)
def test_bad_input_raises_for_both_decoders(kwargs, exc, match):
    args = {"log_probs": torch.zeros(1, 3, 4), "lengths": None, "blank_id": 0, **kwargs}
    with pytest.raises(exc, match=match):
        ctc_greedy(**args)
    with pytest.raises(exc, match=match):
        ctc_prefix_beam_search(**args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beam": 0}, "beam"),
        ({"beam": -2}, "beam"),
        ({"beam": True}, "beam"),
        ({"beam": 2.0}, "beam"),
        ({"beam": 2, "nbest": 3}, "nbest"),
        ({"nbest": 0}, "nbest"),
        ({"token_prune": 0}, "token_prune"),
        ({"length_bonus": float("inf")}, "length_bonus"),
        ({"token_min_logp": float("nan")}, "token_min_logp"),
    ],
)
def test_bad_search_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ctc_prefix_beam_search_nbest(torch.zeros(3, 4), **kwargs)
