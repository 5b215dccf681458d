"""The inference benchmark (the ``bench`` extra): SensiMix beside the certified baseline and beside what a CPU user
deploys instead, timed in one interleaved run. ``scripts/benchmark.py`` parses, prints and writes; the rest is here.

Modules, top to bottom: :mod:`.run` (one run: build, load, time), :mod:`.rows` (the row table: which models, in
which order, each a :class:`.models.ModelSpec`), :mod:`.results` (per-row figures, the best peer, issue 10's goals),
:mod:`.memory` (weight memory, one fresh process per model), :mod:`.models` (what a row loads, and loading it),
:mod:`.peers` (transformers, PyTorch dynamic int8, ONNX Runtime, length bucketing) and :mod:`.gemm` (per-kernel
GEMM throughput). It sits beside :mod:`sensimix.vv` and builds on it (the V&V run's folders, batches and timing);
V&V never imports it. Importing this package imports nothing heavy.
"""
