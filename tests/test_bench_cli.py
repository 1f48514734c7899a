"""The benchmark CLI (fastrnn_bench, in bench/fastrnn_bench) on a tiny grid, its grids, and the
ONNX Runtime baseline's weight export. Fast (< 60 s): two tiny runs into a tmp folder."""
import dataclasses
import importlib.util
import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

from fastrnn_bench import baselines, cli, grid, timing

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_grids_match_the_issue():
    full = grid.build_grid("full", "cpu")
    dense = [c for c in full if not c.input_kind]
    assert {c.seq_len for c in dense} == {50, 200, 1000}
    assert {c.batch for c in dense} == {1, 8, 64}
    assert {c.hidden for c in dense} == {32, 128, 512}
    assert len(dense) == 3 * 3 * 3 * 3 * 2  # T × B × H × cells × modes
    assert {c.cell for c in full} == {"rnn", "lstm", "gru"}
    assert any(c.packed for c in full)
    quick = grid.build_grid("quick", "cpu")
    assert any(c.hidden == 512 for c in quick) and any(c.packed for c in quick)
    streamed = {(c.cell, c.mode, c.batch, c.hidden) for c in quick if c.stream}
    assert streamed == {(cell, mode, 1, h) for cell in grid.CELLS for mode in grid.MODES
                        for h in (64, 256)}  # the issue's streaming points
    assert len({c.id for c in quick}) == len(quick)


def test_cuda_grids():
    full = [c for c in grid.build_grid("full", "cuda") if not c.input_kind]
    assert {c.seq_len for c in full} == {64, 256, 1024}
    assert {c.batch for c in full} == {1, 8, 32, 128}
    assert {c.hidden for c in full} == {64, 128, 256, 512, 768}
    assert {c.dtype for c in full} == {"float32", "bfloat16"}
    assert len(full) == 3 * 4 * 5 * 2 * 3 * 2
    persistent = grid.build_grid("persistent", "cuda", cells=["lstm"])
    assert {(c.seq_len, c.batch, c.hidden) for c in persistent} == {
        (t, b, h) for t in (64, 256, 1024) for b in (1, 8, 32, 64, 128)
        for h in (256, 512, 768, 1024)}
    assert len(persistent) == 3 * 5 * 4 * 2 * 2
    only = grid.build_grid("quick", "cuda", cells=["lstm"], modes=["training"], dtypes=["bfloat16"])
    assert {(c.cell, c.mode, c.dtype) for c in only} == {("lstm", "training", "bfloat16")}


def _gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "bench" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_scripts_import_and_their_step_tiles_are_valid(monkeypatch):
    """The device check's profile and tile scripts import without a GPU (they run only on one)
    and every tile they sweep is one forced_strategy accepts; the check script parses."""
    from fastrnn.kernels.triton_gpu import configs
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu_profile
    import gpu_tiles
    assert {c[0] for c in gpu_profile.CASES} <= set(gpu_profile.CLASSES)
    assert (configs.STEP_BLOCK_H, configs.STEP_BLOCK_K) in gpu_tiles.TILES
    for block_h, block_k in gpu_tiles.TILES:
        with configs.forced_strategy("step", block_h, block_k):
            pass
    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")]).returncode == 0


def test_gpu_bench_imports_and_its_grid_is_sized():
    gpu_bench = _gpu_bench()
    cases = gpu_bench.cases()
    assert {c.dtype for c in cases} == {"float32", "bfloat16"}
    assert {c.mode for c in cases} == {"inference", "training"}
    assert {c.seq_len for c in cases} == {64, 256, 1024}
    assert any(c.packed for c in cases)
    # < 10 minutes: at most ~2 s per case on average, and a hard stop before 10 minutes
    assert len(cases) <= 400
    args = cli.parser().parse_args(gpu_bench.DEFAULT_ARGS)
    assert args.device == "cuda" and args.grid == "gpu10" and args.max_minutes < 10
    plain = cli._csv(args.backends, [n + g for n in baselines.KERNEL_BACKENDS
                                     for g in ("", cli.GRAPH)], "backends")
    assert plain == ["triton", "native", "triton+graph", "native+graph"]


def test_numba_profile_splits_each_call(tmp_path):
    """bench/numba_profile.py on tiny cases: a row per case and mode, parts that are times."""
    spec = importlib.util.spec_from_file_location("numba_profile",
                                                  ROOT / "bench" / "numba_profile.py")
    profile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile)
    out = tmp_path / "profile.md"
    profile.main(["--cases", "lstm:4:2:8,gru:3:1:4,rnn:2:3:4", "--repeats", "3",
                  "--threads", str(torch.get_num_threads()), "--out", str(out)])
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines()
            if line.startswith("| lstm") or line.startswith("| gru") or line.startswith("| rnn")]
    assert [(r[0].split()[0], r[1].strip()) for r in rows] == [
        (cell, mode) for cell in ("lstm", "gru", "rnn") for mode in ("inference", "training")]
    for row in rows:
        torch_ms, numba_ms, ratio, gemm, rec = (float(v) for v in row[2:7])
        assert torch_ms > 0 and numba_ms > 0 and gemm > 0 and rec > 0
        rounding = ratio * (0.0005 / torch_ms + 0.0005 / numba_ms)  # ms printed to 3 decimals
        assert abs(ratio - torch_ms / numba_ms) <= 0.005 + 1.01 * rounding


def _script(name):
    """The module of ``bench/<name>.py``."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def keep_threads():
    """torch's thread count as it was before the test (the scripts set theirs)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_stream_profile_splits_a_streamed_call(capsys, keep_threads):
    """bench/stream_profile.py on tiny sizes: a row per cell and H, the compiled call (numba's one
    compiled call: streamed calls take it) part of fastrnn's call, ×ORT its ratio."""
    _script("stream_profile").main(["--hidden", "4,8", "--calls", "5", "--rounds", "3"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith(("| lstm", "| gru", "| rnn"))]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [
        (cell, h) for cell in ("lstm", "gru", "rnn") for h in ("4", "8")]
    for row in rows:
        ours, compiled, rest, torch_us = (float(v) for v in row[2:6])
        assert 0 < compiled < ours and torch_us > 0
        assert abs(ours - compiled - rest) <= 0.151  # each printed to one decimal
        if row[6].strip() != "–":  # ONNX Runtime installed
            ratio = float(row[7])  # of the unrounded times: printed ones are within 0.05
            assert abs(ratio - float(row[6]) / ours) <= 0.006 + 0.051 * (1 + ratio) / ours


def test_stream_profile_takes_a_batch(capsys, keep_threads):
    """``--batch``: the streamed calls of B rows (the compiled call timed on B rows too)."""
    _script("stream_profile").main(["--cells", "lstm", "--hidden", "4", "--batch", "3",
                                    "--calls", "5", "--rounds", "3"])
    out = capsys.readouterr().out
    assert "B=3)" in out and out.count("| lstm | 4 |") == 1


def test_cell_profile_times_both_engines(capsys, keep_threads):
    """bench/cell_profile.py on tiny sizes: a row per cell, dtype, B and H; each ratio torch.nn /
    fastrnn of the times printed beside it."""
    _script("cell_profile").main(["--hidden", "3", "--batch", "1,2", "--steps", "3",
                                  "--rounds", "3", "--dtypes", "float64"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith(("| lstm", "| gru", "| rnn"))]
    assert [(r[0].strip(), r[2].strip()) for r in rows] == [
        (cell, b) for cell in ("rnn", "lstm", "gru") for b in ("1", "2")]
    for row in rows:
        for ours, ref, ratio in (row[4:7], row[7:10]):
            ours, ref, ratio = float(ours), float(ref), float(ratio)
            assert ours > 0 and ref > 0
            assert abs(ratio - ref / ours) <= 0.006 + 0.051 * (1 + ratio) / ours


def test_flops_counts_packed_rows():
    dense = grid.Case("lstm", 10, 4, 8, "inference")
    assert dense.flops() == 2 * 10 * 4 * 4 * 8 * 16
    assert grid.Case("lstm", 10, 4, 8, "training").flops() == 3 * dense.flops()
    packed = grid.Case("gru", 40, 5, 8, "inference", packed=True)
    lengths = packed.lengths()
    assert lengths[0] == 40 and (lengths[:-1] >= lengths[1:]).all() and lengths.min() >= 10
    assert packed.flops() == 2 * int(lengths.sum()) * 3 * 8 * 16


needs_ort = pytest.mark.skipif(baselines.onnxruntime_missing() is not None,
                               reason=f"ONNX Runtime baseline: {baselines.onnxruntime_missing()}")


@needs_ort
@pytest.mark.parametrize("kind", ["dense", "packed", "stream"])
@pytest.mark.parametrize("cell", grid.CELLS)
def test_onnx_node_matches_torch(cell, kind):
    case = grid.Case(cell, 12, 5, 16, "inference", packed=kind == "packed", stream=kind == "stream")
    x, _, lengths = baselines._inputs(case, torch.device("cpu"))
    module = baselines._torch_module(case, "cpu")
    run, output, error = baselines.onnx_runner(case, module, x, lengths)  # raises if > 1e-5
    assert error <= baselines.ONNX_TOLERANCE
    assert output().shape == (12, 5, 16)


@needs_ort
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_onnx_check_catches_a_wrong_gate_order(cell, monkeypatch):
    monkeypatch.setitem(baselines.ONNX_GATE_ORDER, cell, list(range(grid.GATES[cell])))  # torch order
    case = grid.Case(cell, 12, 5, 16, "inference")
    x, _, lengths = baselines._inputs(case, torch.device("cpu"))
    with pytest.raises(baselines.OnnxMismatch):
        baselines.onnx_runner(case, baselines._torch_module(case, "cpu"), x, lengths)


def test_background_load_runs_busy_processes_only_inside_its_block():
    from fastrnn_bench import timing
    def states(pids):
        return [Path(f"/proc/{pid}/stat").read_text().split()[2] for pid in pids]

    with timing.background_load(2) as pids:
        assert len(pids) == 2
        deadline = time.monotonic() + 60  # a fresh machine's disk: 10 s were once too few
        seen = states(pids)  # one reading, asserted on: a spinning process may still fault a
        while seen != ["R", "R"] and time.monotonic() < deadline:  # page in (D) a moment later
            time.sleep(0.05)  # still starting Python
            seen = states(pids)
        assert seen == ["R", "R"]  # spinning, both at once
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)


def test_cli_tiny_grid_writes_reports_and_compares(tmp_path, capsys):
    from numba.np.ufunc import parallel
    out = tmp_path / "run"
    common = ["--tiny", "--backends", "native,reference,numba", "--repeats", "3", "--no-progress",
              "--threads", str(torch.get_num_threads()), "--out", str(out)]
    assert not parallel._is_initialized, "some earlier test started Numba's threading layer"
    assert cli.main(common + ["--cells", "lstm,gru"]) == 0
    # Starting Numba's threading layer makes torch's oneDNN LSTM ignore torch.set_num_threads.
    assert not parallel._is_initialized
    report = json.loads((out / "results.json").read_text())
    assert report["machine"]["cpu_count"] and report["machine"]["versions"]["torch"]
    assert report["gemm_peak"]["gflops"] > 0
    assert "comparison" not in report
    ids = {c["id"] for c in report["cases"]}
    assert "gru-T16-B3-H16-training-float32-packed" in ids
    assert "lstm-T8-B1-H16-inference-float32-stream" in ids
    for c in report["cases"]:
        res = c["results"]
        assert res["torch"]["status"] == "ok" and res["torch"]["median_s"] > 0
        assert res["fastrnn-native"]["status"] == "ok", res["fastrnn-native"]
        assert len(res["fastrnn-native"]["times_s"]) == 3
        assert c["ratios"]["fastrnn-native"]["torch"] > 0
        assert res["fastrnn-reference"]["max_abs_err"] < 1e-4
        ort = res["onnxruntime"]
        if c["case"]["mode"] == "training":
            assert ort["status"] == "skipped"
        elif baselines.onnxruntime_missing() is None:
            assert ort["status"] == "ok" and ort["max_abs_err"] <= baselines.ONNX_TOLERANCE
        if c["case"]["packed"]:
            assert res["cell-loop"]["status"] == "skipped"
    md = (out / "results.md").read_text()
    assert "| T | B | H |" in md and "fastrnn-reference ×torch.nn" in md
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "time_lstm_training_float32.png" in pngs
    assert "speedup_fastrnn-reference_inference_float32.png" in pngs
    assert all((out / p).stat().st_size > 10_000 for p in pngs)

    # second run into the same folder: compared case by case with the first
    assert cli.main(common + ["--cells", "gru", "--modes", "inference",
                              "--background-load", "1"]) == 0
    second = json.loads((out / "results.json").read_text())
    assert report["machine"]["background_load"] == 0
    assert second["machine"]["background_load"] == 1
    assert "background load: 1 busy processes" in (out / "results.md").read_text()
    assert (out / "results.previous.json").exists()
    rows = second["comparison"]
    assert {r["impl"] for r in rows} >= {"torch", "fastrnn-native", "fastrnn-reference"}
    assert all(r["case"].startswith("gru-") and r["previous_s"] > 0 for r in rows)
    assert "Change against the previous run" in (out / "results.md").read_text()
    assert "change against the previous run" in capsys.readouterr().err


def test_plots_leave_out_a_group_with_nothing_timed(tmp_path):
    """A cell/mode/dtype whose cases were all left by --max-minutes gets no figure (matplotlib
    refuses a legend with no entries: the H200 run of 2026-12-04 stopped there)."""
    from fastrnn_bench.plots import plots
    report = json.loads((ROOT / "bench/results/cpu-quick-1thread-epyc-zen4/results.json").read_text())
    for c in report["cases"]:
        if c["case"]["cell"] == "rnn":
            for r in c["results"].values():
                r["status"] = "skipped"
            c["ratios"] = {}
    written = plots(report, tmp_path)
    assert "time_lstm_inference_float32.png" in written
    assert not [w for w in written if w.startswith("time_rnn")]


def test_forced_triton_strategies_are_skipped_where_they_cannot_run():
    """``--backends triton-persistent`` (and -fused/-step) time triton with that strategy forced;
    a case it cannot run is a Skip saying why: no persistent grid on a CPU device (there is no
    cooperative launch), no fused kernel beyond its H limit."""
    case = grid.build_grid("tiny", "cpu", cells=["lstm"], modes=["inference"])[0]
    cpu = torch.device("cpu")
    assert "exceeds this device's SMs" in baselines._strategy_refused(case, cpu, "persistent")
    assert "exceeds this device's SMs" in baselines._strategy_refused(case, cpu, "streamed")
    big = dataclasses.replace(case, hidden=4096)
    assert "fused kernels' limit" in baselines._strategy_refused(big, cpu, "fused")
    assert baselines._strategy_refused(case, cpu, "step") is None
    assert set(baselines.FORCED_TRITON) == {"triton-fused", "triton-step", "triton-persistent",
                                            "triton-streamed"}
    assert {f"triton-{s}" for s in baselines._FORCED} == set(baselines.FORCED_TRITON)


def test_graph_backends_replay_on_cuda_and_are_skipped_elsewhere(monkeypatch):
    """``--backends native+graph`` (any backend +graph) is accepted; off CUDA it is a Skip saying
    why; a capture that fails is a Skip with the error; a replay's peak memory is not reported
    as a measurement (a replay allocates nothing)."""
    from fastrnn_bench import graphs
    case = grid.build_grid("tiny", "cpu", cells=["gru"], modes=["inference"])[0]
    impls = baselines.build_impls(case, "cpu", ["native", "native+graph"], ["torch"])
    assert isinstance(impls["fastrnn-native"], baselines.Impl)
    assert "need a CUDA device" in str(impls["fastrnn-native+graph"])

    def refuse(run):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(graphs, "graphed", refuse)
    assert graphs.replayed(None, torch.device("cuda")) == (
        None, "capture failed: RuntimeError: operation not permitted when stream is capturing")
    run = impls["fastrnn-native"].run
    replay = baselines.Impl("x+graph", "fastrnn", run, None, replayed=True)
    result = timing.measure({"x+graph": replay}, torch.device("cpu"),
                            timing.Settings(repeats=3, memory="rss"))["x+graph"]
    assert result["status"] == "ok" and result["peak_mem_bytes"] is None
    assert "CUDA graph" in result["peak_mem_error"]
    args = cli.parser().parse_args(["--backends", "triton-step+graph,numba"])
    assert cli._csv(args.backends, ["triton-step+graph", "numba"], "backends")
