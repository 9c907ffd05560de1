"""fold_batchnorm: fold an inference BatchNorm into the conv / linear that feeds it.

Per output channel ``c``, with ``σ_c = sqrt(var_c + ε)``::

    BN(conv(x, W, b)) = conv(x, W', b')
    W'_c = W_c · γ_c / σ_c
    b'_c = (b_c − μ_c) · γ_c / σ_c + β_c

(Jacob et al., CVPR 2018, "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", §3.2). Folding happens before weight quantization so the
quantized weights are the ones that deploy. A BN folds only if the conv/linear output feeds
nothing else, and (for linear) the BN channel axis is the linear's output features (2-D).
Invariant checked by the test: outputs equal the unfolded graph within 1e-5, no BN is left
behind a conv.
"""

from __future__ import annotations

import torch
from torch import fx

from hyq_fx.pass_base import (
    HyqPass,
    PassResult,
    add_constant,
    get_tensor,
    prune_unused_attributes,
    register_pass,
)
from hyq_fx.patterns import is_const, is_none, is_op, match_all, wildcard

aten = torch.ops.aten

_OPTIONAL_CONST = is_const() | is_none()
PRODUCER = (
    is_op(aten.conv2d.default, aten.linear.default)
    .only_used_once()(wildcard(), is_const(), ...)
    .named("producer")
)
PATTERN = is_op(aten.batch_norm.default)(
    PRODUCER, _OPTIONAL_CONST.named("gamma"), _OPTIONAL_CONST.named("beta"),
    is_const().named("mean"), is_const().named("var"), ...
).named("bn")  # fmt: skip


def _folded(gm, m) -> tuple[torch.Tensor, torch.Tensor] | None:
    bn, producer = m["bn"], m["producer"]
    training = bn.args[5] if len(bn.args) > 5 else bn.kwargs.get("training", False)
    eps = bn.args[7] if len(bn.args) > 7 else bn.kwargs.get("eps", 1e-5)
    if training:
        return None
    weight = get_tensor(gm, producer.args[1]).detach()
    if producer.target is aten.linear.default and producer.meta["val"].dim() != 2:
        return None  # BN would normalise the token axis, not the linear's output features
    bias_node = producer.args[2] if len(producer.args) > 2 else None
    out_ch = weight.shape[0]
    bias = get_tensor(gm, bias_node).detach() if bias_node is not None else weight.new_zeros(out_ch)
    mean, var = get_tensor(gm, m["mean"]).detach(), get_tensor(gm, m["var"]).detach()
    gamma = get_tensor(gm, m["gamma"]).detach() if m["gamma"] is not None else torch.ones_like(mean)
    beta = get_tensor(gm, m["beta"]).detach() if m["beta"] is not None else torch.zeros_like(mean)
    factor = gamma / torch.sqrt(var + eps)
    new_weight = weight * factor.reshape(-1, *([1] * (weight.dim() - 1)))
    new_bias = (bias - mean) * factor + beta
    return new_weight, new_bias


@register_pass
class FoldBatchNorm(HyqPass):
    """Fold inference BatchNorm into the preceding conv2d / linear (exact)."""

    name = "fold_batchnorm"

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for m in match_all(gm, PATTERN):
            folded = _folded(gm, m)
            if folded is None:
                continue
            bn, producer = m["bn"], m["producer"]
            hint = producer.args[1].target.replace(".", "_")
            w = add_constant(gm, f"{hint}_folded", folded[0], producer)
            b = add_constant(gm, f"{hint.removesuffix('_weight')}_bias_folded", folded[1], producer)
            args = list(producer.args) + [None] * max(0, 3 - len(producer.args))
            args[1], args[2] = w, b
            producer.args = tuple(args)
            producer.meta["hyq_folded_bn"] = bn.meta.get("hyq_module_path", bn.name)
            bn.replace_all_uses_with(producer)
            gm.graph.erase_node(bn)
            modified = True
        if modified:
            prune_unused_attributes(gm)
        return PassResult(gm, modified)
