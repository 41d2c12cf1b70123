"""Validation of a :class:`~ebranchformer.asr.ctc_model.CTCModel` on batches: loss, greedy WER and CER.

The loss is the training loss (interCTC included) averaged over utterances; WER and CER are jiwer's
corpus-level rates (total edits / total reference words resp. characters) of the greedy (or beam) transcripts
against the batches' ``texts``. Batches are those of :func:`~ebranchformer.asr.data.collate_audio` (None
batches skipped).

Example:
    >>> result = evaluate(model, loader)  # doctest: +SKIP
    >>> result["loss"], result["wer"], result["cer"], result["utterances"]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch

from ebranchformer.asr.ctc_model import CTCModel

__all__ = ["error_rates", "evaluate"]


def error_rates(refs: list[str], hyps: list[str]) -> tuple[float, float]:
    """Corpus WER and CER with jiwer; pairs with a blank reference are left out. (nan, nan) if none."""
    import jiwer

    pairs = [(r, h) for r, h in zip(refs, hyps, strict=True) if r.strip()]
    if not pairs:
        return float("nan"), float("nan")
    r, h = [p[0] for p in pairs], [p[1] for p in pairs]
    return float(jiwer.wer(r, h)), float(jiwer.cer(r, h))


@torch.no_grad()
def evaluate(
    model: CTCModel,
    batches: Iterable[dict[str, Any] | None],
    *,
    beam: int = 1,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Loss, WER and CER of ``model`` (put in eval mode, restored afterwards) over ``batches``.

    Args:
        model: the model, with a tokenizer.
        batches: dicts with ``wav``, ``wav_lengths``, ``tokens``, ``token_lengths``, ``texts`` (or None).
        beam: 1 for greedy decoding, more for prefix beam search.
        autocast_dtype: run under autocast with this dtype on the model's device (None: no autocast).

    Returns:
        ``{"loss", "loss_ctc", ..., "wer", "cer", "utterances"}`` (losses averaged over utterances).
    """
    if model.tokenizer is None:
        raise ValueError("evaluate needs a model with a tokenizer (for the transcripts)")
    device = model.device
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    refs: list[str] = []
    hyps: list[str] = []
    n = 0
    try:
        for batch in batches:
            if batch is None:
                continue
            ctx = (
                torch.autocast(device.type, dtype=autocast_dtype)
                if autocast_dtype is not None
                else contextlib.nullcontext()
            )
            with ctx:
                feats, feat_lengths = model.features(batch["wav"].to(device), batch["wav_lengths"].to(device))
                collected: dict[str, torch.Tensor] | None = {} if model.config.interctc_weight > 0 else None
                h, h_lengths = model.encode_features(feats, feat_lengths, collected_outputs=collected)
                _, stats = model.ctc_losses(h, h_lengths, batch["tokens"], batch["token_lengths"], collected)
                log_probs = model.ctc.log_probs(h)  # (B, T', V) float32
            b = len(batch["texts"])
            for k, v in stats.items():
                if k.startswith("loss"):
                    sums[k] = sums.get(k, 0.0) + v * b
            n += b
            refs.extend(batch["texts"])
            hyps.extend(model.tokenizer.transcript(ids) for ids in model.decode(log_probs, h_lengths, beam))
    finally:
        model.train(was_training)
    out = {k: v / max(n, 1) for k, v in sums.items()}
    out["wer"], out["cer"] = error_rates(refs, hyps)
    out["utterances"] = float(n)
    return out
