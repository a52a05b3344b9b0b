"""How ONNX Runtime runs a stored model's graph: the session options the service serves it with and the
export times its INT8 recipes with, so that the recipe the export keeps as the fastest is timed as it is
served. The service passes its settings' values (``service.runtime.session``); the export, the defaults.
"""

from __future__ import annotations

import onnxruntime as ort


def session_options(
    intra_op_threads: int, inter_op_threads: int = 1, *, spinning: bool = False, cpu_arena: bool = True
) -> ort.SessionOptions:
    """Every graph optimisation, sequential execution, these thread counts; errors only in the log."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    spin = "1" if spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    options.enable_cpu_mem_arena = cpu_arena
    options.log_severity_level = 3  # errors only: the CUDA provider's probing is noisy
    return options
