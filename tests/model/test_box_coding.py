"""Box format conversions and the variance box coder."""

from __future__ import annotations

import math

import torch

from model.box_coding import BoxCoder, cxcywh_to_xyxy, xyxy_to_cxcywh


def random_cxcywh(*shape: int, generator: torch.Generator) -> torch.Tensor:
    cxcy = torch.rand(*shape, 2, generator=generator)
    wh = torch.rand(*shape, 2, generator=generator) * 0.9 + 0.01
    return torch.cat([cxcy, wh], dim=-1)


def test_format_conversions_known_values_and_round_trip() -> None:
    xyxy = torch.tensor([[0.1, 0.2, 0.5, 0.8]])
    cxcywh = xyxy_to_cxcywh(xyxy)
    torch.testing.assert_close(cxcywh, torch.tensor([[0.3, 0.5, 0.4, 0.6]]))
    torch.testing.assert_close(cxcywh_to_xyxy(cxcywh), xyxy)


def test_encode_known_values() -> None:
    coder = BoxCoder((0.1, 0.2))
    prior = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    torch.testing.assert_close(coder.encode(prior, prior), torch.zeros(1, 4))
    # shift by 0.1 * w in x, 0.1 * h in y, double the width, halve the height
    box = torch.tensor([[0.52, 0.54, 0.4, 0.2]])
    expected = torch.tensor([[1.0, 1.0, math.log(2) / 0.2, -math.log(2) / 0.2]])
    torch.testing.assert_close(coder.encode(box, prior), expected)


def test_decode_inverts_encode() -> None:
    g = torch.Generator().manual_seed(0)
    coder = BoxCoder((0.1, 0.2))
    boxes, priors = random_cxcywh(1000, generator=g), random_cxcywh(1000, generator=g)
    torch.testing.assert_close(coder.decode(coder.encode(boxes, priors), priors), boxes, rtol=0, atol=1e-5)
    deltas = torch.randn(1000, 4, generator=g)
    torch.testing.assert_close(coder.encode(coder.decode(deltas, priors), priors), deltas, rtol=0, atol=1e-4)


def test_priors_broadcast_over_the_batch() -> None:
    g = torch.Generator().manual_seed(1)
    coder = BoxCoder((0.1, 0.2))
    priors = random_cxcywh(50, generator=g)  # [A, 4]
    deltas = torch.randn(3, 50, 4, generator=g)  # [B, A, 4]
    batched = coder.decode(deltas, priors)
    assert batched.shape == (3, 50, 4)
    torch.testing.assert_close(batched[2], coder.decode(deltas[2], priors))


def test_variances_are_used() -> None:
    prior = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    box = torch.tensor([[0.6, 0.5, 0.4, 0.2]])
    a = BoxCoder((0.1, 0.2)).encode(box, prior)
    b = BoxCoder((1.0, 1.0)).encode(box, prior)
    torch.testing.assert_close(a, b / torch.tensor([0.1, 0.1, 0.2, 0.2]))
