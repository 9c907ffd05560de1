"""ZeroQ data-free calibration images (BatchNorm-statistics matching)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hyq_fx.synth import SynthError, bn_statistics_loss, synthesize_from_batchnorm


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )
    # Non-trivial running statistics, as after training.
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.2, 2.0)
            bn.weight.uniform_(0.5, 1.5)
    return model


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_loss_drops_and_user_model_untouched() -> None:
    model = _small_cnn().train()  # a train-mode model would update BN stats if it were used
    before = _snapshot(model)
    grads = [p.requires_grad for p in model.parameters()]

    torch.manual_seed(0)
    noise = torch.randn(8, 3, 16, 16)
    images = synthesize_from_batchnorm(
        model, 8, input_size=(3, 16, 16), steps=30, lr=0.05, batch_size=4, progress=False
    )
    assert images.shape == (8, 3, 16, 16) and not images.requires_grad
    assert bn_statistics_loss(model, images) < 0.6 * bn_statistics_loss(model, noise)

    assert model.training
    assert [p.requires_grad for p in model.parameters()] == grads
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bitwise unchanged
    assert all(p.grad is None for p in model.parameters())


def test_deterministic_and_seeded() -> None:
    model = _small_cnn().eval()
    kw = dict(input_size=(3, 8, 8), steps=3, batch_size=3, progress=False)
    a = synthesize_from_batchnorm(model, 5, seed=1, **kw)
    b = synthesize_from_batchnorm(model, 5, seed=1, **kw)
    c = synthesize_from_batchnorm(model, 5, seed=2, **kw)
    assert a.shape == (5, 3, 8, 8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_global_rng_not_consumed() -> None:
    model = _small_cnn()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    synthesize_from_batchnorm(model, 2, input_size=(3, 8, 8), steps=1, progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_start_point_follows_input_normalization() -> None:
    model = _small_cnn()
    kw = dict(input_size=(3, 32, 32), steps=0, progress=False)
    # ImageNet-normalised (the default for a model without pretrained_cfg): plain randn.
    x = synthesize_from_batchnorm(model, 4, seed=3, **kw)
    torch.manual_seed(3)
    assert torch.allclose(x, torch.randn(4, 3, 32, 32), atol=1e-5)
    # Raw [0, 1] pixels (mean 0, std 1), e.g. the CIFAR-10 checkpoints: natural pixel stats.
    model.pretrained_cfg = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    raw = synthesize_from_batchnorm(model, 4, seed=3, **kw)
    assert raw.mean(dim=(0, 2, 3)).tolist() == pytest.approx([0.485, 0.456, 0.406], abs=0.02)
    assert raw.std().item() == pytest.approx(0.226, abs=0.02)
    same = synthesize_from_batchnorm(model, 4, seed=3, normalization=((0, 0, 0), (1, 1, 1)), **kw)
    assert torch.equal(raw, same)


def test_no_batchnorm_is_an_error() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm([4, 6, 6]))
    with pytest.raises(SynthError, match="no nn.BatchNorm2d"):
        synthesize_from_batchnorm(model, 2, input_size=(3, 8, 8), steps=1, progress=False)


def test_timm_batchnormact_is_hooked() -> None:
    from timm.layers import BatchNormAct2d

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), BatchNormAct2d(4))
    with torch.no_grad():
        model[1].running_mean.fill_(0.3)
    images = synthesize_from_batchnorm(
        model, 4, input_size=(3, 8, 8), steps=40, lr=0.1, progress=False
    )
    torch.manual_seed(0)
    assert bn_statistics_loss(model, images) < bn_statistics_loss(model, torch.randn(4, 3, 8, 8))
