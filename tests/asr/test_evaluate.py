"""Validation: corpus WER/CER with jiwer, and evaluate() over batches equals per-utterance results."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ebranchformer.asr.ctc_model import CTCModel
from ebranchformer.asr.data import collate_audio
from ebranchformer.asr.evaluate import error_rates, evaluate
from ebranchformer.asr.model_config import ModelConfig
from ebranchformer.asr.tokenizer import CharTokenizer
from tests.asr.ctc_corpus import single_thread, tiny_model_config, tone_wave


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


def test_error_rates_are_corpus_level():
    wer, cer = error_rates(["a b c", "d e"], ["a x c", "d e"])
    assert wer == pytest.approx(1 / 5) and cer == pytest.approx(1 / 8)
    wer, cer = error_rates(["ab", "  "], ["", "zz"])  # blank references are left out
    assert (wer, cer) == (1.0, 1.0)
    assert all(math.isnan(v) for v in error_rates([" "], ["x"]))


def test_evaluate_matches_manual_computation():
    tok = CharTokenizer.train(["abcd"])
    cfg = ModelConfig.from_dict({**tiny_model_config(), "vocab_size": tok.vocab_size})
    model = CTCModel(cfg, tokenizer=tok)
    with torch.no_grad():
        model.ctc.linear.weight.normal_()
    rng = np.random.default_rng(0)
    texts = ["abc", "dd", "cab", "a"]
    items = [
        {
            "id": str(i),
            "wav": torch.from_numpy(tone_wave(t, rng)),
            "text": t,
            "tokens": torch.tensor(tok.encode(t)),
        }
        for i, t in enumerate(texts)
    ]
    batches = [collate_audio(items[:3]), None, collate_audio(items[3:])]
    model.train()
    result = evaluate(model, batches)
    assert model.training  # restored
    model.eval()
    losses, hyps = [], []
    for it in items:
        loss, _ = model(
            it["wav"][None],
            torch.tensor([len(it["wav"])]),
            it["tokens"][None],
            torch.tensor([len(it["tokens"])]),
        )
        losses.append(loss.item())
        hyps.append(model.transcribe([it["wav"].numpy()])[0])
    assert result["utterances"] == 4.0
    assert result["loss"] == pytest.approx(np.mean(losses), rel=1e-4)
    assert (result["wer"], result["cer"]) == pytest.approx(error_rates(texts, hyps))
    with pytest.raises(ValueError, match="tokenizer"):
        evaluate(CTCModel(cfg), batches)
