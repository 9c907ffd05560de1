"""Mobile-Former (Chen et al., CVPR 2022, "Mobile-Former: Bridging MobileNet and Transformer",
arXiv:2108.05895), registered in timm as ``mobile_former_{26,52,96,151,214,294,508}m``.

Two streams run in parallel and talk through a two-way bridge in every block:

* **Mobile**: MobileNetV3-style inverted bottlenecks on the feature map ``X`` (N, C, H, W), with
  Dynamic-ReLU whose slopes come from the first global token ``z_0``
  (``y = max(a1·x, a2·x)``, ``[a1, a2] = [2σ_h(θ1), 2σ_h(θ2) − 1]``, ``θ = MLP(z_0)``);
* **Former**: a few learned global tokens ``Z`` (N, M, d), M ≤ 6, through a lightweight
  post-norm transformer (MHA with ``K = V = Z`` + FFN with expansion 2);
* **Mobile→Former** (lightweight cross attention, no projection on the map side)::

      Z ← LN(Z + W_O · [Attn(Z W_Q, X, X)·α(Z)]_h),   Attn(q, k, v) = softmax(q kᵀ/√(C/h)) v

  where ``X`` is the map flattened to HW tokens of C channels, split in h heads, and
  ``α(Z) = 2σ_h(W_α Z)`` a token-dependent channel gate;
* **Former→Mobile** (the map attends to the tokens, no projection on the map side)::

      X ← X + [Attn(X, Z W_K, Z W_V)]_h.

A block runs Mobile→Former, Former, Mobile (Dynamic-ReLU from the updated ``z_0``),
Former→Mobile. Stride-2 blocks replace the Mobile sub-block's 1x1 expansion by a 3x3 depthwise
conv that expands (dw → pw → dw → pw). The stem is a 3x3 conv plus a lite bottleneck
(MicroNet: expanding depthwise conv → pointwise conv); the head pools the map (after a 1x1 conv
to 6·C), concatenates ``z_0`` and applies two FC layers with h-swish in between.

The seven configurations follow the paper's appendix tables (stem width, per-block #exp/#out,
M x d tokens, head FC width; 26M uses 4-group pointwise convs with channel shuffle). At 224x224
and 1000 classes they reproduce the paper's parameters to 1% and its MAdds to 3.1% (conv,
linear and attention matmul multiply-adds plus Dynamic-ReLU's two multiplies per element, which
the paper's family counts; without the latter 26M/52M come out 9%/5% under). The model has
no data-dependent control flow and works at any input size (the attention sees the map's H·W
whatever it is), so it captures with ``torch.export`` under a dynamic batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

__all__ = ["CONFIGS", "MobileFormer", "MobileFormerConfig"]

DOWN_EXPANSION = 4  # second expansion (of #out) in the dw → pw → dw → pw stride-2 Mobile block


@dataclass(frozen=True)
class MobileFormerConfig:
    """One row of the paper's specification tables.

    ``lite`` is the lite bottleneck ``(expansion, out, stride)``; each of ``blocks`` is a
    Mobile-Former block ``(expansion, out, stride)`` where expansion multiplies the block's
    input channels (the depthwise conv's channel multiplier in a stride-2 block).
    """

    stem: int
    lite: tuple[int, int, int]
    blocks: tuple[tuple[int, int, int], ...]
    tokens: int
    token_dim: int
    head_dim: int
    groups: int = 1
    head_expansion: int = 6


def _stages(*stages: tuple[tuple[int, int, int], ...]) -> tuple[tuple[int, int, int], ...]:
    return tuple(b for stage in stages for b in stage)


# (expansion, out, stride); the first block of every stage after the stem has stride 2
CONFIGS: dict[str, MobileFormerConfig] = {
    "mobile_former_508m": MobileFormerConfig(
        stem=24,
        lite=(2, 24, 1),
        blocks=_stages(
            ((6, 40, 2), (3, 40, 1)),
            ((6, 72, 2), (3, 72, 1)),
            ((6, 128, 2), (4, 128, 1), (6, 176, 1), (6, 176, 1)),
            ((6, 240, 2), (6, 240, 1), (6, 240, 1)),
        ),
        tokens=6,
        token_dim=192,
        head_dim=1920,
    ),
    "mobile_former_294m": MobileFormerConfig(
        stem=16,
        lite=(2, 16, 1),
        blocks=_stages(
            ((6, 24, 2), (4, 24, 1)),
            ((6, 48, 2), (4, 48, 1)),
            ((6, 96, 2), (4, 96, 1), (6, 128, 1), (6, 128, 1)),
            ((6, 192, 2), (6, 192, 1), (6, 192, 1)),
        ),
        tokens=6,
        token_dim=192,
        head_dim=1920,
    ),
    "mobile_former_214m": MobileFormerConfig(
        stem=12,
        lite=(2, 12, 1),
        blocks=_stages(
            ((6, 20, 2), (3, 20, 1)),
            ((6, 40, 2), (4, 40, 1)),
            ((6, 80, 2), (4, 80, 1), (6, 112, 1), (6, 112, 1)),
            ((6, 160, 2), (6, 160, 1), (6, 160, 1)),
        ),
        tokens=6,
        token_dim=192,
        head_dim=1600,
    ),
    "mobile_former_151m": MobileFormerConfig(
        stem=12,
        lite=(2, 12, 1),
        blocks=_stages(
            ((6, 16, 2), (3, 16, 1)),
            ((6, 32, 2), (3, 32, 1)),
            ((6, 64, 2), (4, 64, 1), (6, 88, 1), (6, 88, 1)),
            ((6, 128, 2), (6, 128, 1), (6, 128, 1)),
        ),
        tokens=6,
        token_dim=192,
        head_dim=1280,
    ),
    "mobile_former_96m": MobileFormerConfig(
        stem=12,
        lite=(2, 12, 1),
        blocks=_stages(
            ((6, 16, 2),),
            ((6, 32, 2), (3, 32, 1)),
            ((6, 64, 2), (4, 64, 1), (6, 88, 1)),
            ((6, 128, 2), (6, 128, 1)),
        ),
        tokens=4,
        token_dim=128,
        head_dim=1280,
    ),
    "mobile_former_52m": MobileFormerConfig(
        stem=8,
        lite=(3, 12, 2),
        blocks=_stages(
            ((3, 12, 1),),
            ((6, 24, 2), (3, 24, 1)),
            ((6, 48, 2), (4, 48, 1), (6, 64, 1)),
            ((6, 96, 2), (6, 96, 1)),
        ),
        tokens=3,
        token_dim=128,
        head_dim=1024,
    ),
    "mobile_former_26m": MobileFormerConfig(
        stem=8,
        lite=(3, 12, 2),
        blocks=_stages(
            ((3, 12, 1),),
            ((6, 24, 2), (3, 24, 1)),
            ((6, 48, 2), (4, 48, 1), (6, 64, 1)),
            ((6, 96, 2), (6, 96, 1)),
        ),
        tokens=3,
        token_dim=128,
        head_dim=1024,
        groups=4,
    ),
}


# ------------------------------------------------------------------------------------------
# building blocks
# ------------------------------------------------------------------------------------------


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet channel shuffle: (N, g·c, H, W) → interleave the g groups. One
    ``aten.channel_shuffle`` node, which graph analyses see as a same-shape layout op (a
    reshape/transpose/reshape chain would look like a map → token crossing)."""
    return F.channel_shuffle(x, groups) if groups > 1 else x


class ConvBN(nn.Sequential):
    """conv (no bias) → BatchNorm2d."""

    def __init__(
        self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        )


class DynamicReLU(nn.Module):
    """Dynamic ReLU (Chen et al., ECCV 2020), two linear pieces per channel, no offsets, its
    slopes generated from a token: ``y = max(a1·x, a2·x)`` with ``a1 = 2σ_h(θ1)`` ∈ [0, 2],
    ``a2 = 2σ_h(θ2) − 1`` ∈ [−1, 1], ``θ = W2 relu(W1 z_0)`` (reduction 4)."""

    def __init__(self, channels: int, token_dim: int, reduction: int = 4) -> None:
        super().__init__()
        self.channels = channels
        self.fc1 = nn.Linear(token_dim, token_dim // reduction)
        self.fc2 = nn.Linear(token_dim // reduction, 2 * channels)

    def forward(self, x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        theta = 2.0 * F.hardsigmoid(self.fc2(F.relu(self.fc1(token))))  # (N, 2C)
        a1, a2 = theta.unflatten(1, (2, self.channels, 1, 1)).unbind(1)  # (N, C, 1, 1) each
        return torch.maximum(x * a1, x * (a2 - 1.0))


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(N, L, C) → (N, h, L, C/h)."""
    return t.unflatten(2, (heads, -1)).transpose(1, 2)


class MobileToFormer(nn.Module):
    """Tokens attend to the map, no projection on the map side (keys = values = pixels):
    ``Z ← LN(Z + W_O [softmax(Z W_Q Xᵀ/√(C/h)) X · α(Z)])``, ``α(Z) = 2σ_h(W_α Z)``."""

    def __init__(self, channels: int, token_dim: int, heads: int = 2, dynamic: bool = True):
        super().__init__()
        if channels % heads:
            raise ValueError(f"MobileToFormer: {channels} channels do not split in {heads} heads")
        self.heads = heads
        self.scale = (channels // heads) ** -0.5
        self.q = nn.Linear(token_dim, channels)
        self.alpha = nn.Linear(token_dim, channels) if dynamic else None
        self.proj = nn.Linear(channels, token_dim)
        self.norm = nn.LayerNorm(token_dim)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        q = _split_heads(self.q(z), self.heads) * self.scale  # (N, h, M, C/h)
        k = x.flatten(2).unflatten(1, (self.heads, -1))  # (N, h, C/h, HW)
        attn = torch.softmax(q @ k, dim=-1)  # (N, h, M, HW)
        out = (attn @ k.transpose(-2, -1)).transpose(1, 2).flatten(2)  # (N, M, C)
        if self.alpha is not None:
            out = out * (2.0 * F.hardsigmoid(self.alpha(z)))
        return self.norm(z + self.proj(out))


class FormerToMobile(nn.Module):
    """The map attends to the tokens, no projection on the map side (queries = pixels):
    ``X ← X + softmax(X (Z W_K)ᵀ/√(C/h)) Z W_V``."""

    def __init__(self, channels: int, token_dim: int, heads: int = 2) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"FormerToMobile: {channels} channels do not split in {heads} heads")
        self.heads = heads
        self.scale = (channels // heads) ** -0.5
        self.k = nn.Linear(token_dim, channels)
        self.v = nn.Linear(token_dim, channels)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        q = x.flatten(2).unflatten(1, (self.heads, -1)).transpose(-2, -1)  # (N, h, HW, C/h)
        k = _split_heads(self.k(z), self.heads).transpose(-2, -1) * self.scale  # (N, h, C/h, M)
        v = _split_heads(self.v(z), self.heads)  # (N, h, M, C/h)
        attn = torch.softmax(q @ k, dim=-1)  # (N, h, HW, M)
        out = (attn @ v).transpose(-2, -1).flatten(1, 2)  # (N, C, HW)
        return x + out.unflatten(2, x.shape[-2:])


class Former(nn.Module):
    """Post-norm transformer block on the M tokens: ``Z ← LN(Z + W_O MHA(Z W_Q, Z, Z))``,
    ``Z ← LN(Z + FFN(Z))`` (FFN expansion 2, GELU; keys and values are the tokens)."""

    def __init__(self, token_dim: int, heads: int = 4, ffn_ratio: int = 2) -> None:
        super().__init__()
        if token_dim % heads:
            raise ValueError(f"Former: token dim {token_dim} does not split in {heads} heads")
        self.heads = heads
        self.scale = (token_dim // heads) ** -0.5
        self.q = nn.Linear(token_dim, token_dim)
        self.proj = nn.Linear(token_dim, token_dim)
        self.norm1 = nn.LayerNorm(token_dim)
        self.fc1 = nn.Linear(token_dim, token_dim * ffn_ratio)
        self.fc2 = nn.Linear(token_dim * ffn_ratio, token_dim)
        self.norm2 = nn.LayerNorm(token_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        q = _split_heads(self.q(z), self.heads) * self.scale  # (N, h, M, d/h)
        kv = _split_heads(z, self.heads)  # (N, h, M, d/h)
        attn = torch.softmax(q @ kv.transpose(-2, -1), dim=-1)  # (N, h, M, M)
        out = (attn @ kv).transpose(1, 2).flatten(2)  # (N, M, d)
        z = self.norm1(z + self.proj(out))
        return self.norm2(z + self.fc2(F.gelu(self.fc1(z))))


class LiteBottleneck(nn.Module):
    """MicroNet's lite bottleneck: 3x3 depthwise conv expanding each channel ``expansion``
    times (ReLU6), then a pointwise projection; residual when shapes allow."""

    def __init__(self, cin: int, cout: int, expansion: int, stride: int, groups: int = 1):
        super().__init__()
        self.shuffle = cin if groups > 1 else 1
        self.dw = ConvBN(cin, cin * expansion, 3, stride, groups=cin)
        self.pw = ConvBN(cin * expansion, cout, groups=groups)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pw(channel_shuffle(F.relu6(self.dw(x)), self.shuffle))
        return x + out if self.residual else out


class MobileFormerBlock(nn.Module):
    """Mobile→Former, Former, Mobile (Dynamic-ReLU from ``z_0``), Former→Mobile.

    Mobile sub-block: stride 1 ``pw(e·Cin) → dw → pw(Cout)`` with a residual when Cin = Cout;
    stride 2 ``dw(e·Cin, /2) → pw(Cout) → dw(4·Cout) → pw(Cout)`` with a residual around the
    last pair. Pointwise convs may be grouped (with channel shuffle).
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        expansion: int,
        stride: int,
        *,
        token_dim: int,
        bridge_heads: int = 2,
        former_heads: int = 4,
        groups: int = 1,
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"MobileFormerBlock: stride must be 1 or 2, got {stride}")
        self.stride = stride
        self.groups = groups
        # stride 2: the shuffles after the expanding depthwise convs interleave their copies
        self.shuffle_in, self.shuffle_out = (cin, cout) if groups > 1 else (1, 1)
        self.mobile_to_former = MobileToFormer(cin, token_dim, bridge_heads)
        self.former = Former(token_dim, former_heads)
        hidden = cin * expansion
        if stride == 1:
            self.conv1 = ConvBN(cin, hidden, 1, groups=groups)
            self.act1 = DynamicReLU(hidden, token_dim)
            self.conv2 = ConvBN(hidden, hidden, 3, 1, groups=hidden)
            self.act2 = DynamicReLU(hidden, token_dim)
            self.conv3 = ConvBN(hidden, cout, 1, groups=groups)
            self.residual = cin == cout
        else:
            hidden2 = cout * DOWN_EXPANSION
            self.conv1 = ConvBN(cin, hidden, 3, 2, groups=cin)
            self.act1 = DynamicReLU(hidden, token_dim)
            self.conv2 = ConvBN(hidden, cout, 1, groups=groups)
            self.conv3 = ConvBN(cout, hidden2, 3, 1, groups=cout)
            self.act2 = DynamicReLU(hidden2, token_dim)
            self.conv4 = ConvBN(hidden2, cout, 1, groups=groups)
            self.residual = False
        self.former_to_mobile = FormerToMobile(cout, token_dim, bridge_heads)

    def _mobile(self, x: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
        g = self.groups
        if self.stride == 1:
            out = channel_shuffle(self.conv1(x), g)
            out = self.act2(self.conv2(self.act1(out, z0)), z0)
            out = channel_shuffle(self.conv3(out), g)
            return x + out if self.residual else out
        out = self.conv2(channel_shuffle(self.act1(self.conv1(x), z0), self.shuffle_in))
        mid = channel_shuffle(self.conv3(out), self.shuffle_out)
        return out + self.conv4(self.act2(mid, z0))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.former(self.mobile_to_former(x, z))
        x = self._mobile(x, z[:, 0])
        return self.former_to_mobile(x, z), z


class MobileFormerHead(nn.Module):
    """1x1 conv to ``head_expansion``·C (ReLU6) → global pool → h-swish; concat the first token;
    FC → BatchNorm1d → h-swish → dropout → FC."""

    def __init__(
        self,
        cin: int,
        token_dim: int,
        hidden: int,
        num_classes: int,
        expansion: int = 6,
        groups: int = 1,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.groups = groups
        self.conv = ConvBN(cin, cin * expansion, 1, groups=groups)
        self.fc1 = nn.Linear(cin * expansion + token_dim, hidden)
        self.norm = nn.BatchNorm1d(hidden)
        self.drop = nn.Dropout(drop_rate)
        self.fc2 = nn.Linear(hidden, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, z: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = F.relu6(self.conv(channel_shuffle(x, self.groups)))
        x = F.hardswish(F.adaptive_avg_pool2d(x, 1).flatten(1))
        x = F.hardswish(self.norm(self.fc1(torch.cat([x, z[:, 0]], dim=1))))
        x = self.drop(x)
        return x if pre_logits else self.fc2(x)


# ------------------------------------------------------------------------------------------
# the network
# ------------------------------------------------------------------------------------------


class MobileFormer(nn.Module):
    """Mobile-Former network (timm-style: ``forward_features`` → (map, tokens),
    ``forward_head``, ``reset_classifier``)."""

    def __init__(
        self,
        cfg: MobileFormerConfig,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        bridge_heads: int = 2,
        former_heads: int = 4,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        kwargs.pop("pretrained_cfg", None)
        kwargs.pop("pretrained_cfg_overlay", None)
        if kwargs:
            raise TypeError(f"MobileFormer got unknown arguments {sorted(kwargs)}")
        self.cfg = cfg
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.tokens = nn.Parameter(torch.randn(cfg.tokens, cfg.token_dim))
        self.stem = nn.Sequential()
        self.stem.add_module("conv", nn.Conv2d(in_chans, cfg.stem, 3, 2, 1, bias=False))
        self.stem.add_module("bn", nn.BatchNorm2d(cfg.stem))
        self.stem.add_module("act", nn.ReLU6())
        exp, cout, stride = cfg.lite
        self.lite = LiteBottleneck(cfg.stem, cout, exp, stride, cfg.groups)
        cin = cout
        blocks = []
        reduction = 2 * stride
        self.feature_info = []
        for i, (exp, cout, stride) in enumerate(cfg.blocks):
            blocks.append(
                MobileFormerBlock(
                    cin,
                    cout,
                    exp,
                    stride,
                    token_dim=cfg.token_dim,
                    bridge_heads=bridge_heads,
                    former_heads=former_heads,
                    groups=cfg.groups,
                )
            )
            reduction *= stride
            self.feature_info.append(
                {"num_chs": cout, "reduction": reduction, "module": f"blocks.{i}"}
            )
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.final_bridge = MobileToFormer(cin, cfg.token_dim, bridge_heads)
        self.num_features = self.head_hidden_size = cfg.head_dim
        self.head = MobileFormerHead(
            cin, cfg.token_dim, cfg.head_dim, num_classes, cfg.head_expansion, cfg.groups, drop_rate
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc2

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "avg"):
            raise ValueError(f"MobileFormer pools with 'avg' only, got global_pool={global_pool!r}")
        self.num_classes = num_classes
        hidden = self.head.fc1.out_features
        self.head.fc2 = nn.Linear(hidden, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) → final map (N, C, H/32, W/32) and tokens (N, M, d)."""
        z = self.tokens.unsqueeze(0).expand(x.shape[0], -1, -1)
        x = self.lite(self.stem(x))
        for block in self.blocks:
            x, z = block(x, z)
        return x, self.final_bridge(x, z)

    def forward_head(
        self, features: tuple[torch.Tensor, torch.Tensor], pre_logits: bool = False
    ) -> torch.Tensor:
        x, z = features
        return self.head(x, z, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ------------------------------------------------------------------------------------------
# timm registration
# ------------------------------------------------------------------------------------------


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv",
        "classifier": "head.fc2",
        "paper_ids": "arXiv:2108.05895",
        "paper_name": "Mobile-Former: Bridging MobileNet and Transformer",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({name: _cfg() for name in CONFIGS})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> MobileFormer:
    if kwargs.pop("features_only", False):
        raise ValueError(
            f"{variant}: features_only is not supported; call model.forward_features(x), which "
            "returns the final map and the tokens"
        )
    return build_model_with_cfg(MobileFormer, variant, pretrained, cfg=CONFIGS[variant], **kwargs)


@register_model
def mobile_former_26m(pretrained: bool = False, **kwargs: Any) -> MobileFormer:
    """Mobile-Former-26M: 3x128 tokens, 4-group pointwise convs (paper: 26M MAdds, 3.2M)."""
    return _create("mobile_former_26m", pretrained, **kwargs)


@register_model
def mobile_former_52m(pretrained: bool = False, **kwargs: Any) -> MobileFormer:
    """Mobile-Former-52M: 3x128 tokens (paper: 52M MAdds, 3.5M params)."""
    return _create("mobile_former_52m", pretrained, **kwargs)


@register_model
def mobile_former_96m(pretrained: bool = False, **kwargs: Any) -> MobileFormer:
    """Mobile-Former-96M: 4x128 tokens (paper: 96M MAdds, 4.6M params)."""
    return _create("mobile_former_96m", pretrained, **kwargs)


@register_model
def mobile_former_151m(pretrained: bool = False, **kwargs: Any) -> MobileFormer:
    """Mobile-Former-151M: 6x192 tokens (paper: 151M MAdds, 7.6M params)."""
    return _create("mobile_former_151m", pretrained, **kwargs)


@register_model
def mobile_former_214m(pretrained: bool = False, **kwargs: Any) -> MobileFormer:
    """Mobile-Former-214M: 6x192 tokens (paper: 214M MAdds, 9.4M params)."""
    return _create("mobile_former_214m", pretrained, **kwargs)


@register_model
def mobile_former_294m(pretrained: bool = False, **kwargs: Any) -> MobileFormer:
    """Mobile-Former-294M: 6x192 tokens (paper: 294M MAdds, 11.4M params)."""
    return _create("mobile_former_294m", pretrained, **kwargs)


@register_model
def mobile_former_508m(pretrained: bool = False, **kwargs: Any) -> MobileFormer:
    """Mobile-Former-508M: 6x192 tokens (paper: 508M MAdds, 14.0M params)."""
    return _create("mobile_former_508m", pretrained, **kwargs)
