"""Export lowerings: exact rewrites of the captured graph for the backends."""

from __future__ import annotations

import torch
from torch import nn

import hyq_fx
from hyq_fx.lowering import fold_tokens_with_pixel_shuffle

aten = torch.ops.aten


def _count(gm, target) -> int:
    return sum(n.op == "call_function" and n.target is target for n in gm.graph.nodes)


class _Fold(nn.Module):
    """Tokens [B, P, N, C] back to a map, as timm's MobileVitBlock writes it (s x s patches)."""

    def __init__(self, h: int, w: int, s: int, swap: tuple[int, int] = (1, 2)) -> None:
        super().__init__()
        self.h, self.w, self.s, self.swap = h, w, s, swap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, p, n, c = x.shape
        x = x.transpose(1, 3).reshape(b * c * self.h, self.w, self.s, self.s)
        return x.transpose(*self.swap).reshape(b, c, self.h * self.s, self.w * self.s) * 2.0


def test_mobilevit_folds_become_pixel_shuffle_bit_for_bit(xxs_gm, xxs_input):
    before = len(xxs_gm.graph.nodes)
    lowered = fold_tokens_with_pixel_shuffle(xxs_gm, xxs_input[:2])
    assert _count(lowered, aten.pixel_shuffle.default) == 3  # one per MobileViT block
    assert len(xxs_gm.graph.nodes) == before  # the input graph is not changed
    assert _count(xxs_gm, aten.pixel_shuffle.default) == 0
    with torch.no_grad():
        assert torch.equal(lowered(xxs_input), xxs_gm(xxs_input))


def test_fold_rewrite_checks_the_permutation():
    tokens = torch.randn(2, 4, 3 * 5, 8)  # B=2, 2x2 patches, h=3, w=5, C=8
    for swap, rewritten in (((1, 2), 1), ((2, 3), 0)):
        module = _Fold(3, 5, 2, swap)
        gm = hyq_fx.capture(module, tokens)
        lowered = fold_tokens_with_pixel_shuffle(gm, tokens)
        assert _count(lowered, aten.pixel_shuffle.default) == rewritten, swap
        with torch.no_grad():
            assert torch.equal(lowered(tokens), module(tokens))


class _Fold6d(nn.Module):
    """Tokens [B, C, P, N] back to a map, as timm's MobileVitV2Block writes it."""

    def __init__(self, h: int, w: int, s: int, perm: tuple[int, ...] = (0, 1, 4, 2, 5, 3)):
        super().__init__()
        self.h, self.w, self.s, self.perm = h, w, s, perm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        x = x.reshape(b, c, self.s, self.s, self.h, self.w).permute(*self.perm)
        return x.reshape(b, c, self.h * self.s, self.w * self.s) + 1.0


def test_mobilevitv2_fold_becomes_pixel_shuffle_bit_for_bit():
    tokens = torch.randn(2, 8, 2 * 2, 3 * 5)  # B=2, C=8, 2x2 patches, h=3, w=5
    for perm, rewritten in (((0, 1, 4, 2, 5, 3), 1), ((0, 1, 4, 3, 5, 2), 0)):
        module = _Fold6d(3, 5, 2, perm)
        gm = hyq_fx.capture(module, tokens)
        lowered = fold_tokens_with_pixel_shuffle(gm, tokens)
        assert _count(lowered, aten.pixel_shuffle.default) == rewritten, perm
        assert _count(lowered, aten.permute.default) == 1 - rewritten
        with torch.no_grad():
            assert torch.equal(lowered(tokens), module(tokens))
