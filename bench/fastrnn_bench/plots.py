"""The PNG plots of a run: time per call against sequence length, and speed-up heatmaps."""
from __future__ import annotations

import math

from .grid import CELLS
from .report import _impl_label


def plots(report, out):
    """PNG plots: time vs seq_len per batch size (rows: hidden size) for every implementation,
    one figure per cell, mode and dtype; and a heatmap of speed-up vs torch.nn (seq_len × batch)
    per fastrnn backend, mode and dtype (columns: cells, rows: hidden sizes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    written = []
    cases = [c for c in report["cases"]
             if not c["case"]["packed"] and not c["case"].get("stream")]
    impls = report["config"]["impls"]
    styles = {name: dict(color=f"C{i}", marker="os^vDP*Xh"[i % 9]) for i, name in enumerate(impls)}
    keys = sorted({(c["case"]["cell"], c["case"]["mode"], c["case"]["dtype"]) for c in cases})
    for cell, mode, dtype in keys:
        group = [c for c in cases if (c["case"]["cell"], c["case"]["mode"], c["case"]["dtype"])
                 == (cell, mode, dtype)]
        if not any(r.get("status") == "ok" for c in group for r in c["results"].values()):
            continue  # nothing timed (e.g. every case left by --max-minutes): no empty figure
        hiddens = sorted({c["case"]["hidden"] for c in group})
        batches = sorted({c["case"]["batch"] for c in group})
        seq_lens = sorted({c["case"]["seq_len"] for c in group})
        fig, axes = plt.subplots(len(hiddens), len(batches), squeeze=False,
                                 figsize=(max(9.0, 4.2 * len(batches)), 3.3 * len(hiddens) + 1.2))
        handles = {}
        for i, h in enumerate(hiddens):
            for j, b in enumerate(batches):
                ax = axes[i][j]
                sub = sorted((c for c in group if c["case"]["hidden"] == h and c["case"]["batch"] == b),
                             key=lambda c: c["case"]["seq_len"])
                for name in impls:
                    pts = [(c["case"]["seq_len"], c["results"][name]["median_s"] * 1e3) for c in sub
                           if c["results"].get(name, {}).get("status") == "ok"]
                    if pts:
                        line, = ax.plot(*zip(*pts), label=_impl_label(name), **styles[name])
                        handles[name] = line
                ax.set_title(f"H={h}, B={b}", fontsize=10)
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xticks(seq_lens, [str(t) for t in seq_lens])
                ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
                ax.grid(True, which="both", alpha=0.3)
                if not sub:
                    ax.axis("off")
                    ax.text(0.5, 0.5, f"H={h}, B={b}: not in grid", ha="center", va="center",
                            transform=ax.transAxes, color="gray")
                    continue
                ax.set_xlabel("sequence length T (steps)")
                ax.set_ylabel("time per call (ms)")
        fig.suptitle(f"{cell.upper()} {mode}, {dtype}, {report['machine']['device']}: "
                     "median time per call (lower is better)", fontsize=11)
        fig.legend([handles[n] for n in impls if n in handles],
                   [_impl_label(n) for n in impls if n in handles],
                   loc="lower center", ncol=min(3 if len(batches) < 3 else 6, len(handles)),
                   frameon=False)
        bottom = 0.9 / fig.get_figheight()
        fig.tight_layout(rect=(0, bottom, 1, 1 - 0.45 / fig.get_figheight()))
        path = out / f"time_{cell}_{mode}_{dtype}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path.name)
    fast = [n for n in impls if n.startswith("fastrnn-")]
    for name in fast:
        for mode in sorted({c["case"]["mode"] for c in cases}):
            for dtype in sorted({c["case"]["dtype"] for c in cases}):
                group = [c for c in cases if c["case"]["mode"] == mode and c["case"]["dtype"] == dtype]
                cells = [k for k in CELLS if any(c["case"]["cell"] == k for c in group)]
                hiddens = sorted({c["case"]["hidden"] for c in group})
                seq_lens = sorted({c["case"]["seq_len"] for c in group})
                batches = sorted({c["case"]["batch"] for c in group})
                if not group or not any(c["ratios"].get(name, {}).get("torch") for c in group):
                    continue
                fig, axes = plt.subplots(len(hiddens), len(cells), squeeze=False,
                                         figsize=(3.6 * len(cells) + 1, 2.9 * len(hiddens) + 0.6))
                norm = matplotlib.colors.LogNorm(vmin=0.1, vmax=10)
                image = None
                for i, h in enumerate(hiddens):
                    for j, cell in enumerate(cells):
                        ax = axes[i][j]
                        grid = [[math.nan] * len(batches) for _ in seq_lens]
                        for c in group:
                            k = c["case"]
                            if k["cell"] == cell and k["hidden"] == h:
                                r = c["ratios"].get(name, {}).get("torch")
                                if r:
                                    grid[seq_lens.index(k["seq_len"])][batches.index(k["batch"])] = r
                        image = ax.imshow(grid, cmap="RdYlGn", norm=norm, origin="lower",
                                          aspect="auto")
                        for a, row in enumerate(grid):
                            for b, v in enumerate(row):
                                if not math.isnan(v):
                                    ax.text(b, a, f"{v:.2f}", ha="center", va="center", fontsize=9)
                        ax.set_xticks(range(len(batches)), [str(b) for b in batches])
                        ax.set_yticks(range(len(seq_lens)), [str(t) for t in seq_lens])
                        ax.set_xlabel("batch size B")
                        ax.set_ylabel("sequence length T")
                        ax.set_title(f"{cell.upper()}, H={h}", fontsize=10)
                fig.suptitle(f"{name} speed-up over torch.nn, {mode} {dtype} "
                             "(torch.nn time / fastrnn time; >1 = fastrnn faster)", fontsize=10)
                fig.tight_layout(rect=(0, 0, 0.9, 0.93))
                cax = fig.add_axes((0.92, 0.15, 0.02, 0.7))
                fig.colorbar(image, cax=cax, label="speed-up (×, log scale)")
                path = out / f"speedup_{name}_{mode}_{dtype}.png"
                fig.savefig(path, dpi=90)
                plt.close(fig)
                written.append(path.name)
    return written
