"""The service on a GPU, in one command: ``python -m benchmarks.gpu`` (a CPU dry run: ``--providers cpu``).

    python -m benchmarks.gpu                      # one H100/H200, 16 cores: 7-8 minutes estimated, 540 s budget
    python -m benchmarks.gpu --providers cpu      # the dry run CI makes: about a minute on two cores

A copy of the tree without its ``.git`` (a GPU machine lent for a run) records the commit from ``BENCH_COMMIT``
(``BENCH_COMMIT=$(git rev-parse HEAD)`` where the copy was made), else as ``unknown``.

Stages, in order, each against a time budget (``cli.py``): export what the store lacks (ResNet-50 and LeNet-5 with
random weights, ResNet-50's FP16 variant on CUDA); the CPU's JPEG decode rate per core; ONNX Runtime in-process at
each batch size, numpy and IOBinding (``inprocess.py``); PyTorch FP16 as the anchor; then the real service per
model and ``WORKERS`` count under a multi-process pure-Python load (``served.py``, ``loadgen.py``), HTTP JPEG and
gRPC uint8, with the GPU's % busy from NVML (``nvml.py``), and the every-batch-size run. ``OUT/gpu.json`` and
``OUT/gpu.md`` hold the figures, the machine (GPU and CPU named) and the issue's targets judged (``report.py``).
"""
