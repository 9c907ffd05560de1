"""``ConvertChannelsLast`` (``hyq_fx.backends.tvm_layout``): NHWC convs, an exact rewrite.

* after it every conv2d of an integerized CNN is NHWC / OHWI, no ``clip`` is left, and the only
  permutes are the image's (NCHW → NHWC) and the head's: the quantizers' clips and the
  zero-point pads in between no longer send the layout back to NCHW;
* the converted module computes the same logits as the NCHW one (1e-5; exact in practice);
* ``build_tvm`` converts CPU builds only when asked (``channels_last``, the default) and the
  library matches the NCHW library.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import hyq_fx

tvm = pytest.importorskip("tvm")
tvm_relax = pytest.importorskip("hyq_fx.backends.tvm_relax")
tvm_layout = pytest.importorskip("hyq_fx.backends.tvm_layout")

FAST_LLVM = {"kind": "llvm", "opt-level": 0}


class TinyCnn(nn.Module):
    """Stem (padded), an inverted residual (expand, padded depthwise, project), pool, head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.expand = nn.Conv2d(8, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.project = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.silu(self.stem(x))
        y = nn.functional.silu(self.dw(nn.functional.silu(self.expand(x))))
        x = x + self.project(y)
        return self.head(x.mean((2, 3)))


@pytest.fixture(scope="module")
def qgm() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    calib = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return hyq_fx.quantize(TinyCnn().eval(), calib, "minmax", progress=False)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _ops(mod, name: str) -> list:
    from tvm import relax

    found = []

    def visit(expr) -> None:
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", None) == name:
            found.append(expr)

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


def _integer_module(qgm, images):
    lowered, _ = tvm_relax.lower_quantizers(qgm)
    mod = tvm_relax.import_relax(lowered, images, dynamic_batch=False)
    return tvm_relax.IntegerizeQDQ()(mod)


def test_convs_become_nhwc_and_only_the_borders_permute(qgm, images):
    mod = _integer_module(qgm, images)
    assert _ops(mod, "relax.clip") and _ops(mod, "relax.nn.pad")
    nhwc = tvm_layout.ConvertChannelsLast()(mod)
    convs = _ops(nhwc, "relax.nn.conv2d")
    assert len(convs) == 4
    layouts = {(str(c.attrs.data_layout), str(c.attrs.kernel_layout)) for c in convs}
    assert layouts == {("NHWC", "OHWI")}
    assert not _ops(nhwc, "relax.clip")
    assert len(_ops(nhwc, "relax.nn.pad")) == len(_ops(mod, "relax.nn.pad"))
    # the input image, and the pooled features before the head
    assert len(_ops(nhwc, "relax.permute_dims")) <= 2
    assert len(_ops(mod, "relax.nn.conv2d")) == 4  # the input module is unchanged


def test_converted_module_computes_the_same_logits(qgm, images):
    from tvm import relax

    mod = _integer_module(qgm, images)
    outs = []
    for m in (mod, tvm_layout.ConvertChannelsLast()(mod)):
        vm = relax.VirtualMachine(tvm.compile(m, tvm.target.Target(FAST_LLVM)), tvm.cpu())
        out = vm["main"](tvm.runtime.tensor(images.numpy()))
        outs.append((out[0] if isinstance(out, tvm.ir.Array) else out).numpy())
    np.testing.assert_allclose(outs[1], outs[0], rtol=0, atol=1e-5)


def test_build_tvm_runs_nhwc_by_default_and_matches_nchw(qgm, images, tmp_path):
    runs = {}
    for channels_last in (True, False):
        path = tvm_relax.build_tvm(
            qgm, images, FAST_LLVM, tmp_path / f"m{channels_last}.so", vnni=False,
            channels_last=channels_last,
        )  # fmt: skip
        assert json.loads(path.with_suffix(".json").read_text())["channels_last"] is channels_last
        runs[channels_last] = tvm_relax.TvmRunner(path)(images)
    torch.testing.assert_close(runs[True], runs[False], atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(runs[True], qgm(images), atol=1e-4, rtol=0)
