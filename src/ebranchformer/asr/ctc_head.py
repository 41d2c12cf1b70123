"""``CTCHead``: the CTC output layer (dropout, Linear D -> V) and ESPnet's CTC loss.

The loss is ESPnet's ``CTC(ctc_type="builtin")``: ``torch.nn.functional.ctc_loss`` with blank 0 on the
log-softmax (in float32) of the logits, summed over the batch and divided by the batch size, with
``zero_infinity`` (default True) so an utterance too short for its transcript contributes 0 instead of inf.

Example:
    >>> import torch
    >>> head = CTCHead(in_dim=8, vocab_size=5)
    >>> h = torch.randn(2, 10, 8)
    >>> tokens = torch.tensor([[1, 2, 3], [4, 4, -1]])  # (B, U) padded with -1
    >>> loss = head.loss(h, torch.tensor([10, 7]), tokens, torch.tensor([3, 2]))
    >>> loss.shape, bool(loss > 0)
    (torch.Size([]), True)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.linear import Linear

__all__ = ["CTCHead", "check_targets"]


def check_targets(tokens: torch.Tensor, token_lengths: torch.Tensor, batch: int, vocab_size: int) -> None:
    """Validate CTC targets: ``tokens`` int (B, U) padded past ``token_lengths`` int (B,) in [1, U], real
    entries in [1, vocab_size) (0 is the blank). Raises TypeError/ValueError naming the argument."""
    if not isinstance(tokens, torch.Tensor) or tokens.is_floating_point() or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must be an integer tensor (B, U), got {_describe(tokens)}")
    if not isinstance(token_lengths, torch.Tensor) or token_lengths.is_floating_point():
        raise TypeError(f"token_lengths must be an integer tensor (B,), got {_describe(token_lengths)}")
    if tokens.dim() != 2 or tokens.shape[0] != batch:
        raise ValueError(f"tokens must have shape (B={batch}, U), got {tuple(tokens.shape)}")
    if token_lengths.shape != (batch,):
        raise ValueError(f"token_lengths must have shape (B={batch},), got {tuple(token_lengths.shape)}")
    if batch == 0:
        return
    lo, hi = int(token_lengths.min()), int(token_lengths.max())
    if lo < 1 or hi > tokens.shape[1]:
        raise ValueError(f"token_lengths must lie in [1, U={tokens.shape[1]}], got {token_lengths.tolist()}")
    real = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < token_lengths[:, None].to(
        tokens.device
    )
    ids = tokens[real]  # (sum(token_lengths),)
    if int(ids.min()) < 1 or int(ids.max()) >= vocab_size:
        raise ValueError(
            f"tokens must lie in [1, vocab_size={vocab_size}) within token_lengths (0 is the CTC blank), "
            f"got values in [{int(ids.min())}, {int(ids.max())}]"
        )


def _describe(x: object) -> str:
    return f"tensor of dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__


class CTCHead(nn.Module):
    """Dropout (training only) then ``Linear(in_dim, vocab_size)``.

    Args:
        in_dim: encoder output dim D.
        vocab_size: V, blank at id 0.
        dropout: dropout rate on the input (ESPnet's CTC ``dropout_rate``). Default 0.0.
        zero_infinity: passed to ``ctc_loss``. Default True.

    ``head(h)`` gives logits (B, T, V); ``head.linear`` alone is what interCTC self-conditioning uses (as
    ESPnet's ``ctc.softmax``, no dropout).
    """

    def __init__(
        self, in_dim: int, vocab_size: int, dropout: float = 0.0, zero_infinity: bool = True
    ) -> None:
        super().__init__()
        self.vocab_size = int(vocab_size)
        self.zero_infinity = bool(zero_infinity)
        self.dropout = nn.Dropout(dropout)
        self.linear = Linear(in_dim, vocab_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) of encoder output ``h`` (B, T, D)."""
        return self.linear(self.dropout(h))

    def log_probs(self, h: torch.Tensor) -> torch.Tensor:
        """float32 log-softmax over V, (B, T, V) (no dropout: meant for decoding). The projection runs in float32
        also under autocast: it is cheap, and bf16 logits would flip the argmax of close frames."""
        with torch.autocast(h.device.type, enabled=False):
            bias = None if self.linear.bias is None else self.linear.bias.float()
            return F.linear(h.float(), self.linear.weight.float(), bias).log_softmax(dim=-1)

    def loss(
        self, h: torch.Tensor, lengths: torch.Tensor, tokens: torch.Tensor, token_lengths: torch.Tensor
    ) -> torch.Tensor:
        """Batch-mean CTC loss (sum over utterances / B), a float32 scalar.

        Args:
            h: encoder output (B, T, D); frames ``t >= lengths[b]`` are ignored.
            lengths: int64 (B,).
            tokens: int (B, U), entries past ``token_lengths`` are padding (any value, e.g. -1).
            token_lengths: int (B,).
        """
        log_probs = self(h).float().log_softmax(dim=-1).transpose(0, 1)  # (B, T, V) -> (T, B, V)
        real = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < token_lengths[:, None]  # (B, U)
        targets = tokens[real].long()  # (sum(token_lengths),) concatenated, as ESPnet passes them
        per_utt = F.ctc_loss(
            log_probs,
            targets,
            lengths.long(),
            token_lengths.long(),
            blank=0,
            reduction="none",
            zero_infinity=self.zero_infinity,
        )  # (B,)
        return per_utt.sum() / h.shape[0]
