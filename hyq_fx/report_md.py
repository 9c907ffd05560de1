"""``report.md`` with PNG plots next to it: the human-readable side of ``report.json``.

:func:`write_report_md` draws, from a quantized GraphModule and its ``report.json`` dict:

* ``sqnr.png``: the per-layer output SQNR (see :mod:`hyq_fx.report`) as bars in graph order, the
  ``worst`` lowest marked in red and named;
* ``act_ranges.png``: per-channel min/max of the float input activation of the few worst layers,
  with the activation quantizer's clipping range when it is per-tensor; one wide channel next to
  narrow ones is what a per-tensor 8-bit grid cannot represent;
* ``confusion.png`` (when predictions are given): FP32 prediction vs quantized prediction, a
  ``C x C`` count matrix whose off-diagonal mass is where quantization changed the answer;

and writes a table of every quantized op's bits, granularity and scheme. Matplotlib runs on the
Agg backend; nothing is shown.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import fx  # noqa: E402

from .pass_base import record_node_outputs  # noqa: E402
from .vocabulary import quantizers_mode  # noqa: E402

SQNR_PNG, RANGES_PNG, CONFUSION_PNG = "sqnr.png", "act_ranges.png", "confusion.png"


def worst_layers(layers: Sequence[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """The ``k`` layers with the lowest finite SQNR, worst first."""
    finite = [row for row in layers if math.isfinite(row["sqnr_db"])]
    return sorted(finite, key=lambda row: row["sqnr_db"])[:k]


def label(row: dict[str, Any]) -> str:
    """A layer's display name; the node name is added because two matmuls of one attention
    module share a module path."""
    return f"{row['name']} [{row['node']}]" if "node" in row else row["name"]


def _input_quantizers(gm: fx.GraphModule, node_name: str) -> list[tuple[fx.Node, Any]]:
    """``(quantizer call, quantizer)`` for each activation input of op ``node_name``."""
    op = next((n for n in gm.graph.nodes if n.name == node_name), None)
    names = op.meta["hyq_quant"]["inputs"] if op is not None else []
    calls = {n.target: n for n in gm.graph.nodes if n.op == "call_module" and n.target in names}
    return [(calls[name], gm.get_submodule(name)) for name in names if name in calls]


def channel_ranges(
    gm: fx.GraphModule, batch: torch.Tensor, layers: Sequence[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per-channel min and max of each activation input of each layer, in float, on ``batch``.

    An input is what one of the layer's activation quantizers sees in the float graph (all
    quantizers off). Channels are axis 1 for a convolution's 4-D input, the last axis otherwise.
    Keys are ``"<layer label> input <i>"``; values hold ``min``/``max`` arrays, the ``axis`` and
    the quantizer's ``clip`` range (None when the quantizer is per-channel or uncalibrated).
    """
    sites = {
        f"{label(row)} input {i}": (row, call, fq)
        for row in layers
        for i, (call, fq) in enumerate(_input_quantizers(gm, row["node"]))
    }
    with quantizers_mode(gm, "off"):
        values = record_node_outputs(
            gm, batch, {call.args[0].name for _, call, _ in sites.values()}
        )
    out: dict[str, dict[str, Any]] = {}
    for key, (row, call, fq) in sites.items():
        x = values[call.args[0].name].float()
        axis = 1 if row["op"].startswith("conv") and x.dim() == 4 else x.dim() - 1
        flat = x.movedim(axis, 0).reshape(x.shape[axis], -1)
        clip = None
        if fq.calibrated and fq.scale.numel() == 1:
            s, z = float(fq.scale), float(fq.zero_point)
            clip = ((fq.spec.qmin - z) * s, (fq.spec.qmax - z) * s)
        out[key] = {
            "min": flat.min(dim=1).values.numpy(),
            "max": flat.max(dim=1).values.numpy(),
            "axis": axis,
            "shape": tuple(x.shape),
            "clip": clip,
        }
    return out


def prediction_confusion(
    fp_predictions: Sequence[int], q_predictions: Sequence[int], num_classes: int
) -> np.ndarray:
    """``m[i, j]``: images FP32 predicted as class ``i`` and the quantized model as ``j``."""
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(fp_predictions), np.asarray(q_predictions)), 1)
    return m


def plot_sqnr(
    layers: Sequence[dict[str, Any]], worst: Sequence[dict[str, Any]], path: Path
) -> Path:
    """Bar plot of the per-layer SQNR in graph order; the ``worst`` layers red, numbered by rank
    above their bars and named in a box."""
    values = np.array([r["sqnr_db"] if math.isfinite(r["sqnr_db"]) else np.nan for r in layers])
    cap = np.nanmax(values) if np.isfinite(values).any() else 0.0
    values = np.where(np.isnan(values), cap, values)  # an exact op (infinite SQNR) at the top
    rank = {label(r): k for k, r in enumerate(worst, 1)}
    colors = ["tab:red" if label(r) in rank else "tab:blue" for r in layers]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    ax.bar(range(len(values)), values, color=colors, width=0.8)
    for i, row in enumerate(layers):
        if label(row) in rank:
            ax.annotate(str(rank[label(row)]), (i, values[i]), ha="center", fontsize=8,
                        color="tab:red", xytext=(0, 2), textcoords="offset points")  # fmt: skip
    names = "\n".join(f"{k}. {label(r)}: {r['sqnr_db']:.1f} dB" for k, r in enumerate(worst, 1))
    ax.text(0.01, 0.97, names, transform=ax.transAxes, va="top", fontsize=7, family="monospace",
            bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "tab:red"})  # fmt: skip
    ax.set_xlabel("quantized op (graph order)")
    ax.set_ylabel("output SQNR (dB)")
    ax.set_title(f"Per-layer output SQNR vs the float graph; the worst {len(worst)} in red")
    ax.set_xlim(-1, len(values))
    ax.set_ylim(min(0.0, float(values.min())), max(0.0, float(values.max())) * 1.45 + 1)
    return _save(fig, path)


def plot_channel_ranges(ranges: dict[str, dict[str, Any]], path: Path) -> Path:
    """One panel per layer input: a min–max bar per channel, the quantizer's clip range dashed."""
    fig, axes = plt.subplots(
        len(ranges), 1, figsize=(12, 2.4 * len(ranges)), squeeze=False, layout="constrained"
    )
    for ax, (name, r) in zip(axes[:, 0], ranges.items(), strict=True):
        channels = np.arange(len(r["min"]))
        ax.bar(channels, r["max"] - r["min"], bottom=r["min"], width=0.8, color="tab:blue")
        if r["clip"] is not None:
            for bound in r["clip"]:
                ax.axhline(bound, color="tab:red", ls="--", lw=0.8)
        spread = r["max"] - r["min"]
        ratio = spread.max() / max(float(np.median(spread)), 1e-12)
        ax.set_title(
            f"{name}: shape {r['shape']}, channels on axis {r['axis']}; widest channel range "
            f"{ratio:.1f}x the median",
            fontsize=9,
        )
        ax.set_xlim(-1, len(channels))
        ax.set_ylabel("value")
    axes[-1, 0].set_xlabel("channel (red dashed: the activation quantizer's clip range)")
    return _save(fig, path)


def plot_confusion(m: np.ndarray, labels: Sequence[str], path: Path) -> Path:
    """The FP32-vs-quantized prediction matrix as an image with the counts written in."""
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(np.log1p(m), cmap="Blues")
    for (i, j), count in np.ndenumerate(m):
        if count:
            ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                    color="white" if i == j else "black")  # fmt: skip
    ticks = np.arange(len(labels))
    ax.set_xticks(ticks, labels, rotation=60, fontsize=8)
    ax.set_yticks(ticks, labels, fontsize=8)
    ax.set_xlabel("quantized prediction")
    ax.set_ylabel("FP32 prediction")
    agree = np.trace(m) / max(m.sum(), 1) * 100
    ax.set_title(f"FP32 vs quantized predictions ({agree:.1f}% agree)")
    fig.colorbar(im, ax=ax, label="log(1 + count)")
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _layer_table(layers: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "| # | layer | op | W bits | W granularity / scheme | A bits | A granularity / scheme "
        "| SQNR (dB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(layers):
        g, s = r["granularity"], r["scheme"]
        w = f"{g['weight']} {s['weight']}" if r["w_bits"] else "–"
        a = f"{g['activation']} {s['activation']}" if r["a_bits"] else "–"
        lines.append(
            f"| {i} | `{label(r)}` | {r['op']} | {r['w_bits'] or '–'} | {w} | "
            f"{r['a_bits'] or '–'} | {a} | {r['sqnr_db']:.2f} |"
        )
    return lines


def _accuracy_section(report: dict[str, Any]) -> list[str]:
    if report.get("fp32_top1") is None:
        return ["No evaluation set was given (`--eval`): top-1 not measured.", ""]
    return [
        "| | FP32 | quantized | drop | FP32/quantized agreement | images |",
        "|---|---|---|---|---|---|",
        f"| top-1 (%) | {report['fp32_top1']} | {report['quant_top1']} | {report.get('drop')} "
        f"| {report.get('agreement')} | {report['n_eval']} |",
        "",
    ]


def write_report_md(
    out_dir: str | Path,
    report: dict[str, Any],
    gm: fx.GraphModule,
    batch: torch.Tensor,
    fp_predictions: Sequence[int] | None = None,
    q_predictions: Sequence[int] | None = None,
    labels: Sequence[str] | None = None,
    worst: int = 5,
    ranges_of: int = 3,
) -> Path:
    """Write ``out_dir/report.md`` and its PNGs; returns the Markdown path.

    ``report`` is the ``report.json`` dict (``layers`` from :func:`hyq_fx.report.layer_report`),
    ``batch`` the images the activation ranges are measured on, the predictions (both given or
    neither) the two models' top-1 classes on the same evaluation images in the same order.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = report["layers"]
    bad = worst_layers(layers, worst)
    title = f"{report.get('architecture') or report.get('model')}, recipe `{report.get('recipe')}`"
    md = [
        f"# Quantization report: {title}, W{report.get('w_bits')}A{report.get('a_bits')}",
        "",
        f"Model `{report.get('model')}`, {report.get('n_calib')} calibration images, "
        f"calibration {report.get('calib_seconds')} s, {len(layers)} quantized ops.",
        "",
        "## Accuracy",
        "",
        *_accuracy_section(report),
    ]
    if fp_predictions is not None and q_predictions is not None:
        n_cls = len(labels) if labels else max(max(fp_predictions), max(q_predictions)) + 1
        m = prediction_confusion(fp_predictions, q_predictions, n_cls)
        plot_confusion(m, labels or [str(i) for i in range(n_cls)], out / CONFUSION_PNG)
        md += [
            "Rows: the FP32 model's prediction; columns: the quantized model's, on the same "
            "images. Off-diagonal cells are the images whose answer quantization changed.",
            "",
            f"![FP32 vs quantized predictions]({CONFUSION_PNG})",
            "",
        ]
    plot_sqnr(layers, bad, out / SQNR_PNG)
    md += [
        "## Per-layer SQNR",
        "",
        "Output SQNR of each quantized op against the float graph on the same "
        f"{len(batch)} calibration images (upstream error included, so it tends to fall with "
        "depth).",
        "",
        f"![per-layer SQNR]({SQNR_PNG})",
        "",
        "| worst layers | op | SQNR (dB) |",
        "|---|---|---|",
        *(f"| `{label(r)}` | {r['op']} | {r['sqnr_db']:.2f} |" for r in bad),
        "",
    ]
    ranges = channel_ranges(gm, batch, bad[:ranges_of])
    if ranges:
        plot_channel_ranges(ranges, out / RANGES_PNG)
        md += [
            "## Input activation ranges of the worst layers",
            "",
            f"Each activation input of the {len(bad[:ranges_of])} worst layers: per channel, "
            "the min–max of the float tensor its quantizer sees; red dashed lines are the range "
            "that quantizer represents (per-tensor quantizers only).",
            "",
            f"![per-channel activation ranges]({RANGES_PNG})",
            "",
        ]
    md += ["## Bits, granularity and scheme per layer", "", *_layer_table(layers), ""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path
