"""Time each pass of the given recipes on the CIFAR-10 MobileViT-XXS (the table in README.md).

    OMP_NUM_THREADS=1 python docs/passes/measure_costs.py minmax repq-log2 hyq-full mixed qhyvit

Captures the model once, then runs every recipe on a copy of the graph with 32 calibration
images (two batches of 16) at W8A8, printing per pass the seconds and the graph's node and
quantizer counts after it.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch

import hyq_fx
from hyq_fx.data import image_folder
from hyq_fx.pass_base import QuantContext, quantizers, run_passes

SHARED = Path(__file__).resolve().parents[3] / "shared"


def main(recipes: list[str]) -> None:
    model, info = hyq_fx.models.load_model(
        f"local-dir:{SHARED / 'checkpoints' / 'mobilevit_xxs.cifar10'}"
    )
    ds = image_folder(SHARED / "data" / "cifar10" / "calib", info, limit=32)
    calib = torch.stack([ds[i][0] for i in range(len(ds))])
    start = time.perf_counter()
    captured = hyq_fx.capture(model, calib[:2])
    print(f"capture: {time.perf_counter() - start:.1f} s, {len(captured.graph.nodes)} nodes")
    for recipe in recipes:
        torch.manual_seed(0)
        ctx = QuantContext([calib[:16], calib[16:]], w_bits=8, a_bits=8, progress=False)
        clock = [time.perf_counter()]

        def on_result(p, result, clock=clock):
            gm = result.graph_module
            print(f"  {p.name:30s} {time.perf_counter() - clock[0]:6.2f} s  "
                  f"{len(gm.graph.nodes)} nodes, {len(quantizers(gm))} quantizers")  # fmt: skip
            clock[0] = time.perf_counter()

        print(recipe)
        run_passes(copy.deepcopy(captured), hyq_fx.get_recipe(recipe).build(ctx), on_result)


if __name__ == "__main__":
    main(sys.argv[1:] or ["minmax"])
