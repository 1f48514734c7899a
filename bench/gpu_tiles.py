"""The triton step strategy's tiles on this GPU: one layer's call replayed from a CUDA graph (no
launch cost: the kernels' own speed) for each (BLOCK_H, BLOCK_K) step tile, beside cuDNN, so the
shipped tiles (configs.STEP_BLOCK_H/K) can be chosen from measurements.

    python bench/gpu_tiles.py [--tiles 16x32,32x32,...] [--out FILE.json]
"""
import argparse
import json

import torch

from fastrnn.kernels.triton_gpu import configs
from fastrnn_bench.graphs import graphed
from gpu_profile import _median_ms, models

CASES = [("lstm", 256, 32, 512, torch.bfloat16), ("lstm", 256, 128, 512, torch.bfloat16),
         ("lstm", 256, 32, 128, torch.float32), ("gru", 256, 32, 768, torch.bfloat16)]
TILES = [(16, 16), (16, 32), (16, 64), (32, 16), (32, 32), (32, 64), (32, 128), (64, 16), (64, 32)]


def time_case(cell, T, B, H, dtype, mode, tiles):
    ref, fast, run = models(cell, T, B, H, dtype)
    row = {"cudnn": _median_ms(graphed(lambda: run(ref, mode)))}
    for bh, bk in tiles:
        try:
            with configs.forced_strategy("step", bh, bk):
                row[f"{bh}x{bk}"] = _median_ms(graphed(lambda: run(fast, mode)))
        except Exception as e:  # noqa: BLE001 - a tile that does not compile or fit: recorded
            row[f"{bh}x{bk}"] = f"{type(e).__name__}: {str(e)[:80]}"
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiles", default=",".join(f"{h}x{k}" for h, k in TILES))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    tiles = [tuple(int(v) for v in t.split("x")) for t in args.tiles.split(",")]
    print(torch.cuda.get_device_name(0), "torch", torch.__version__, "shipped step tiles",
          f"{configs.STEP_BLOCK_H}x{configs.STEP_BLOCK_K}; graph-replayed ms per call")
    names = ["cudnn"] + [f"{h}x{k}" for h, k in tiles]
    print("| case | mode | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    out = []
    for cell, T, B, H, dtype in CASES:
        for mode in ("inference", "training"):
            row = time_case(cell, T, B, H, dtype, mode, tiles)
            cells = [f"{row[n]:.3f}" if isinstance(row[n], float) else row[n] for n in names]
            print(f"| {cell} T={T} B={B} H={H} {str(dtype)[6:]} | {mode} | " + " | ".join(cells) + " |")
            out.append({"cell": cell, "T": T, "B": B, "H": H, "dtype": str(dtype), "mode": mode, **row})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
