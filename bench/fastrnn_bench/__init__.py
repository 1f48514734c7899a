"""fastrnn_bench: the benchmark engine behind ``fastrnn-bench`` (``python -m fastrnn_bench``),
``bench/gpu_bench.py`` and the pytest-benchmark suite ``bench/test_bench.py``; installed beside
``fastrnn`` but no part of the runtime package. Method and outputs: ``bench/README.md``.

* :mod:`.grid`: the cases (:class:`~.grid.Case`) and the named grids;
* :mod:`.baselines`: the implementations timed (fastrnn backends, torch.nn, a loop of nn cells,
  an ONNX Runtime node);
* :mod:`.graphs`: ``+graph`` backends, the call replayed from a CUDA graph;
* :mod:`.timing`: the interleaved median method, peak memory, the output check, machine info;
* :mod:`.report`: ratios, comparison with a previous run, ``results.md``, the printed summary;
* :mod:`.plots`: the PNG plots;
* :mod:`.cli`: argument parsing, :func:`~.cli.run_benchmark` and ``main``.
"""
