"""Data-free calibration images from BatchNorm statistics (ZeroQ, Cai et al., CVPR 2020).

Images start as Gaussian noise and are optimised with Adam so that, at every
``nn.BatchNorm2d`` (timm's ``BatchNormAct2d`` included), the per-channel mean and standard
deviation of the layer's *input* over (N, H, W) match the running statistics stored in the
layer (the "distilled data" of ZeroQ):

    L = Σ_layers ‖μ − running_mean‖₂ + ‖σ − sqrt(running_var + eps)‖₂

The user's model is never touched: the optimisation runs on a deep copy in eval mode.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from tqdm.auto import tqdm

# Pixel statistics of natural images ([0, 1] RGB), the start point of the optimisation.
_NATURAL = (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


class SynthError(ValueError):
    """Synthetic calibration data cannot be made for this model (e.g. it has no BatchNorm2d)."""


def _bn_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d)
        and m.running_mean is not None
        and m.running_var is not None
    ]


class _StatsLoss:
    """Forward pre-hooks on the BN layers of ``model`` accumulating the ZeroQ loss."""

    def __init__(self, model: nn.Module) -> None:
        layers = _bn_layers(model)
        if not layers:
            raise SynthError(
                f"{type(model).__name__} has no nn.BatchNorm2d with running statistics, so "
                f"ZeroQ cannot synthesise calibration images from it; calibrate with real images "
                f"(hyq_fx.data.image_folder) instead."
            )
        self.terms: list[torch.Tensor] = []
        self.handles = []
        for _, bn in layers:
            target_std = torch.sqrt(bn.running_var.detach().float() + bn.eps)
            target_mean = bn.running_mean.detach().float()
            hook = self._hook(target_mean, target_std, float(bn.eps))
            self.handles.append(bn.register_forward_pre_hook(hook))

    def _hook(self, target_mean: torch.Tensor, target_std: torch.Tensor, eps: float):
        def hook(_mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].float()
            mean = x.mean(dim=(0, 2, 3))
            var = x.var(dim=(0, 2, 3), unbiased=False)
            std = torch.sqrt(var + eps)
            self.terms.append(
                torch.linalg.vector_norm(mean - target_mean)
                + torch.linalg.vector_norm(std - target_std)
            )

        return hook

    def __call__(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        self.terms = []
        model(images)
        loss = torch.stack(self.terms).sum()
        self.terms = []
        return loss

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _working_copy(model: nn.Module) -> tuple[nn.Module, torch.device]:
    work = copy.deepcopy(model).eval()
    work.requires_grad_(False)
    device = next((t.device for t in work.parameters()), torch.device("cpu"))
    return work, device


def bn_statistics_loss(model: nn.Module, images: torch.Tensor) -> float:
    """The ZeroQ BN-statistics loss of ``images`` under ``model`` (on a copy, eval mode)."""
    work, device = _working_copy(model)
    loss_fn = _StatsLoss(work)
    try:
        with torch.no_grad():
            return float(loss_fn(work, images.to(device)))
    finally:
        loss_fn.remove()


def _normalization(
    model: nn.Module,
    channels: int,
    normalization: tuple[Sequence[float], Sequence[float]] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's input ``(mean, std)`` as ``(C, 1, 1)`` tensors (timm's defaults if unknown)."""
    if normalization is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        normalization = (
            cfg.get("mean") or IMAGENET_DEFAULT_MEAN,
            cfg.get("std") or IMAGENET_DEFAULT_STD,
        )
    out = []
    for values in normalization:
        t = torch.as_tensor(values, dtype=torch.float32).flatten()
        if t.numel() != channels:
            t = t.mean().expand(channels)
        out.append(t.reshape(channels, 1, 1).clone())
    return out[0], out[1]


def synthesize_from_batchnorm(
    model: nn.Module,
    n_images: int,
    *,
    input_size: Sequence[int] = (3, 128, 128),
    steps: int = 20,
    lr: float = 0.02,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
    normalization: tuple[Sequence[float], Sequence[float]] | None = None,
) -> torch.Tensor:
    """``n_images`` synthetic, already-normalised inputs ``(N, *input_size)`` for calibration.

    ZeroQ distilled data: each batch of ``batch_size`` images starts from ``torch.randn``
    (under ``torch.manual_seed(seed)``) and takes ``steps`` Adam steps (``lr``) on the sum
    over BatchNorm2d layers of ‖μ − running_mean‖₂ + ‖σ − sqrt(running_var + eps)‖₂, where
    μ, σ are the per-channel statistics of the layer input over (N, H, W).

    The images are optimised in pixel space, ``x = (p - mean) / std`` with the model's input
    ``normalization`` (default: ``model.pretrained_cfg`` mean/std, else timm's ImageNet ones),
    and ``p`` starts as ``randn`` scaled to natural-image pixel statistics (ImageNet mean/std).
    For an ImageNet-normalised model the start is exactly ZeroQ's ``randn`` in input space; for
    a model fed raw ``[0, 1]`` pixels (the CIFAR-10 checkpoints) it starts ~5x closer to the BN
    statistics than plain ``randn`` would. ``lr`` is in pixel units.

    The model is deep copied (the caller's weights, buffers and train flag are untouched).
    Deterministic for a given seed on a given device; the global RNG state is restored.
    Raises :class:`SynthError` if the model has no BatchNorm2d. The defaults take about
    40 s for 64 images at 128x128 with mobilevit_xxs on 2 idle CPU cores.
    """
    if n_images <= 0:
        raise SynthError(f"n_images must be positive, got {n_images}.")
    if batch_size <= 0 or steps < 0:
        raise SynthError(f"batch_size must be > 0 and steps >= 0, got {batch_size}, {steps}.")
    size = tuple(int(s) for s in input_size)
    work, device = _working_copy(model)
    mean, std = (t.to(device) for t in _normalization(model, size[0], normalization))
    nat_mean, nat_std = (t.to(device) for t in _normalization(model, size[0], _NATURAL))
    loss_fn = _StatsLoss(work)
    batches = []
    bar = tqdm(total=steps * -(-n_images // batch_size), desc="ZeroQ synth", disable=not progress)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for start in range(0, n_images, batch_size):
                n = min(batch_size, n_images - start)
                noise = torch.randn((n, *size)).to(device)
                pixels = (noise * nat_std + nat_mean).requires_grad_(True)
                opt = torch.optim.Adam([pixels], lr=lr)
                for _ in range(steps):
                    opt.zero_grad(set_to_none=True)
                    loss = loss_fn(work, (pixels - mean) / std)
                    loss.backward()
                    opt.step()
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                batches.append(((pixels - mean) / std).detach())
    finally:
        bar.close()
        loss_fn.remove()
    return torch.cat(batches)
