"""Gradient parity helpers for the training-step tests against ESPnet and RETURNN."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ebranchformer.nn.masking import lengths_to_valid


def backward_one_loss(y: torch.Tensor, ref: torch.Tensor, ref_lengths: torch.Tensor, gen: torch.Generator) -> None:
    """Ours ``y`` and the reference's ``ref`` (B, T', D) equal on the valid frames (``ref_lengths``, atol 1e-4);
    then the same loss, a random weighting of the valid frames (drawn from ``gen``), backward through each."""
    valid = lengths_to_valid(ref_lengths, ref.shape[1])[..., None]  # (B, T', 1)
    w = torch.randn(ref.shape, generator=gen) * valid
    (ref * w).sum().backward()
    (y * w).sum().backward()
    torch.testing.assert_close(y * valid, ref * valid, atol=1e-4, rtol=0)


def exported_grads(module: nn.Module, export: Callable[[nn.Module], dict[str, torch.Tensor]]) -> dict:
    """``module``'s parameter gradients under the reference's names: a copy of the module holding the gradients
    as its parameters, through ``export`` (the same mapping its weights go through)."""
    grads = copy.deepcopy(module)
    with torch.no_grad():
        for p, q in zip(grads.parameters(), module.parameters()):
            p.copy_(q.grad)
    return export(grads)


def assert_grads_close(
    ours: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor], tol: Callable[[str], float] = lambda _: 1e-4
) -> None:
    """Every reference gradient equals ours within ``tol(name)`` of its largest entry, floored at 1e-2 of the
    largest entry of all (for gradients that are zero up to rounding, e.g. the attention key bias's: softmax
    ignores a constant added to every score of a query)."""
    assert ref.keys() <= ours.keys() and all(g is not None for g in ref.values())
    floor = 1e-2 * max(g.abs().max().item() for g in ref.values())
    for name, ref_g in ref.items():
        scale = max(ref_g.abs().max().item(), floor)
        torch.testing.assert_close(ours[name] / scale, ref_g / scale, atol=tol(name), rtol=0, msg=name)
