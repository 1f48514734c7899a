"""CUDA graphs in the benchmark: a backend name with the suffix :data:`GRAPH` (``triton+graph``,
``triton-step+graph``, ``native+graph``) times the same call replayed from a CUDA graph, the
call without its launch cost (CUDA only)."""
from __future__ import annotations

import torch

GRAPH = "+graph"


def graphed(run):
    """``run`` captured in a CUDA graph after two warm-up calls on a side stream (the capture
    recipe of torch.cuda.graphs); returns the graph's replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph.replay


def replayed(run, device):
    """``(replay, None)``: ``run`` replayed from a CUDA graph, or ``(None, why not)``: off CUDA,
    or the capture failed (the error). A replay's peak memory is not measured: it allocates
    nothing (the graph's pool holds what it uses)."""
    if device.type != "cuda":
        return None, "CUDA graphs need a CUDA device"
    try:
        return graphed(run), None
    except Exception as e:  # noqa: BLE001 - a call that cannot be captured is reported
        return None, f"capture failed: {type(e).__name__}: {e}"[:300]
