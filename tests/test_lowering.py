"""Export lowerings: exact rewrites of the captured graph for the backends."""

from __future__ import annotations

import torch
from torch import nn

import hyq_fx
from hyq_fx.lowering import fold_tokens_with_pixel_shuffle, unfold_maps_with_pixel_unshuffle

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


class _Unfold(nn.Module):
    """A map [B, C, H, W] into tokens [B·P, N, C], as timm's MobileVitBlock writes it."""

    def __init__(self, s: int, swap: tuple[int, int] = (1, 3)) -> None:
        super().__init__()
        self.s, self.swap = s, swap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        s, nh, nw = self.s, h // self.s, w // self.s
        x = x.reshape(b * c * nh, s, nw, s).transpose(1, 2)
        x = x.reshape(b, c, nh * nw, s * s).transpose(*self.swap)
        return x.reshape(b * s * s, nh * nw, -1) * 2.0


class _Unfold6d(nn.Module):
    """A map [B, C, H, W] into tokens [B, C, P, N], as timm's MobileVitV2Block writes it."""

    def __init__(self, s: int, perm: tuple[int, ...] = (0, 1, 3, 5, 2, 4)) -> None:
        super().__init__()
        self.s, self.perm = s, perm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        s = self.s
        x = x.reshape(b, c, h // s, s, w // s, s).permute(*self.perm)
        return x.reshape(b, c, s * s, -1) + 1.0


def test_unfolds_become_pixel_unshuffle_bit_for_bit(xxs_gm, xxs_input):
    lowered = unfold_maps_with_pixel_unshuffle(xxs_gm, xxs_input[:2])
    assert _count(lowered, aten.pixel_unshuffle.default) == 3  # one per MobileViT block
    assert _count(xxs_gm, aten.pixel_unshuffle.default) == 0  # the input graph is unchanged
    with torch.no_grad():
        assert torch.equal(lowered(xxs_input), xxs_gm(xxs_input))
    image = torch.randn(2, 8, 6, 10)  # C=8, 2x2 patches, h=3, w=5
    cases = [
        (_Unfold(2), 1), (_Unfold(2, swap=(2, 3)), 0),
        (_Unfold6d(2), 1), (_Unfold6d(2, perm=(0, 1, 5, 3, 2, 4)), 0),
    ]  # fmt: skip
    for module, rewritten in cases:
        gm = hyq_fx.capture(module, image)
        lowered = unfold_maps_with_pixel_unshuffle(gm, image)
        assert _count(lowered, aten.pixel_unshuffle.default) == rewritten, module
        with torch.no_grad():
            assert torch.equal(lowered(image), module(image))


class _LinearNorm(nn.Module):
    """LeViT's linear + BatchNorm1d over the flattened tokens, and a conv + BatchNorm2d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn2d = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.linear, self.bn1d = nn.Linear(8, 8), nn.BatchNorm1d(8, affine=False)
        for bn in (self.bn2d, self.bn1d):
            bn.running_mean.normal_(generator=torch.Generator().manual_seed(0))
            bn.running_var.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(1))
        self.bn2d.weight.data.normal_(generator=torch.Generator().manual_seed(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.bn2d(self.conv(x)).flatten(2).transpose(1, 2)  # [B, N, C]
        return self.bn1d(self.linear(t).flatten(0, 1)).reshape_as(t)


def test_batch_norm_becomes_its_affine_map():
    from hyq_fx.lowering import batch_norm_as_affine

    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    before = hyq_fx.capture(_LinearNorm().eval(), x)
    after = batch_norm_as_affine(before, x)
    assert _count(before, aten.batch_norm.default) == 2  # the input graph is not changed
    assert _count(after, aten.batch_norm.default) == 0
    assert _count(after, aten.mul.Tensor) == 2 and _count(after, aten.add.Tensor) == 2
    with torch.no_grad():
        torch.testing.assert_close(after(x), before(x), rtol=0, atol=1e-5)


class _MaskOnDevice(nn.Module):
    """EdgeNeXt's positional encoding makes a mask with ``.to(device, dtype)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(x.shape[0], x.shape[2], x.shape[3]).to(x.device, torch.bool)
        return x + (~mask).float().cumsum(1).unsqueeze(1)


def test_to_device_becomes_to_dtype_bit_for_bit():
    from hyq_fx.lowering import lower_for_export

    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    before = hyq_fx.capture(_MaskOnDevice().eval(), x)
    after = lower_for_export(before, x)
    assert _count(before, aten.to.device) == 1 and _count(after, aten.to.device) == 0
    assert _count(after, aten.to.dtype) == _count(before, aten.to.dtype) + 1
    with torch.no_grad():
        assert torch.equal(after(x), before(x))
