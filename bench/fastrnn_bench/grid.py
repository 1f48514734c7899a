"""The benchmark cases: :class:`Case` (cell × T × B × H × mode × dtype, dense or packed)
and the named grids of ``fastrnn-bench`` (``tiny``, ``quick``, ``full``; ``gpu10`` on CUDA).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

CELLS = ("rnn", "lstm", "gru")
MODES = ("inference", "training")
GATES = {"rnn": 1, "lstm": 4, "gru": 3}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


@dataclass(frozen=True)
class Case:
    """One benchmark case: a single-layer unidirectional ``cell`` over input (T, B, I=H)."""

    cell: str          # "rnn" (tanh) | "lstm" | "gru"
    seq_len: int       # T
    batch: int         # B
    hidden: int        # H (input_size I = H)
    mode: str          # "inference" (no_grad forward) | "training" (forward + backward of sum)
    dtype: str = "float32"
    packed: bool = False  # ragged lengths in [T/4, T] as a PackedSequence
    stream: bool = False  # T calls of one step each, the state carried (training: each call's
    #                       forward + backward, the state detached between calls)

    @property
    def input_size(self):
        return self.hidden

    @property
    def id(self):
        s = f"{self.cell}-T{self.seq_len}-B{self.batch}-H{self.hidden}-{self.mode}-{self.dtype}"
        return s + ("-packed" if self.packed else "") + ("-stream" if self.stream else "")

    @property
    def input_kind(self):
        """How the input arrives: "packed", "streamed" (T=1 per call) or "" (one dense call)."""
        return "packed" if self.packed else "streamed" if self.stream else ""

    def label(self):
        s = f"{self.cell} T={self.seq_len} B={self.batch} H={self.hidden} {self.mode}"
        if self.dtype != "float32":
            s += f" {self.dtype}"
        return s + (f" {self.input_kind}" if self.input_kind else "")

    def lengths(self):
        """Sequence lengths of the packed case (non-increasing, first = T), else None."""
        if not self.packed:
            return None
        g = torch.Generator().manual_seed(1234 + self.seq_len * 7 + self.batch)
        lengths = torch.randint(max(1, self.seq_len // 4), self.seq_len + 1, (self.batch,),
                                generator=g)
        lengths[0] = self.seq_len
        return torch.sort(lengths, descending=True).values

    def flops(self):
        """GEMM floating-point operations of one call (elementwise work left out).

        forward: 2·N·G·H·(I + H) with N = Σ lengths (T·B dense); training: 3× forward."""
        lengths = self.lengths()
        rows = int(lengths.sum()) if lengths is not None else self.seq_len * self.batch
        forward = 2 * rows * GATES[self.cell] * self.hidden * (self.input_size + self.hidden)
        return forward * (3 if self.mode == "training" else 1)


# Named grids: seq_lens, batches, hiddens, dtypes, extra points (T, B, H), packed points and
# streamed points (T, B, H: T calls of one step; CPU only, where per-call cost decides).
GRIDS = {
    "cpu": {
        "tiny": dict(T=(8, 16), B=(2,), H=(16,), dtypes=("float32",), extra=(),
                     packed=((16, 3, 16),), stream=((8, 1, 16),)),
        "quick": dict(T=(50, 200), B=(1, 8, 64), H=(32, 128), dtypes=("float32",),
                      extra=((50, 8, 512),), packed=((200, 8, 128),),
                      stream=((50, 1, 64), (50, 1, 256))),
        "full": dict(T=(50, 200, 1000), B=(1, 8, 64), H=(32, 128, 512), dtypes=("float32",),
                     extra=(), packed=((200, 64, 128), (1000, 64, 128)),
                     stream=((50, 1, 64), (50, 1, 256), (35, 8, 128))),
    },
    "cuda": {
        "tiny": dict(T=(8, 16), B=(2,), H=(16,), dtypes=("float32", "bfloat16"), extra=(),
                     packed=((16, 3, 16),)),
        "quick": dict(T=(64, 256), B=(8, 128), H=(128, 512), dtypes=("float32", "bfloat16"),
                      extra=(), packed=((256, 128, 256),)),
        # sized for bench/gpu_bench.py: < 10 minutes on one GPU with the loop baselines capped
        "gpu10": dict(T=(64, 256, 1024), B=(1, 32, 128), H=(128, 512, 768),
                      dtypes=("float32", "bfloat16"), extra=(), packed=((1024, 128, 512),)),
        # the persistent strategy's range (bench/gpu_check.sh runs it for lstm, persistent vs
        # step vs cuDNN vs a cell loop)
        "persistent": dict(T=(64, 256, 1024), B=(1, 8, 32, 64, 128), H=(256, 512, 768, 1024),
                           dtypes=("float32", "bfloat16"), extra=(), packed=()),
        "full": dict(T=(64, 256, 1024), B=(1, 8, 32, 128), H=(64, 128, 256, 512, 768),
                     dtypes=("float32", "bfloat16"), extra=(),
                     packed=((256, 128, 256), (1024, 128, 512))),
    },
}


def build_grid(name, device="cpu", cells=CELLS, modes=MODES, dtypes=None):
    """The list of :class:`Case` of grid ``name`` ("tiny", "quick", "full"; "gpu10" on cuda)."""
    spec = GRIDS["cuda" if str(device).startswith("cuda") else "cpu"][name]
    dtypes = dtypes or spec["dtypes"]
    cases = []
    for cell in cells:
        for dtype in dtypes:
            shapes = [(t, b, h) for h in spec["H"] for b in spec["B"] for t in spec["T"]]
            shapes += [s for s in spec["extra"] if s not in shapes]
            for mode in modes:
                cases += [Case(cell, t, b, h, mode, dtype) for t, b, h in shapes]
                cases += [Case(cell, t, b, h, mode, dtype, packed=True)
                          for t, b, h in spec["packed"]]
                cases += [Case(cell, t, b, h, mode, dtype, stream=True)
                          for t, b, h in spec.get("stream", ())]
    return cases
