"""One way to open an ONNX model, with an explicit thread budget.

onnxruntime otherwise sizes its pools to every core; with several models sharing two cores
that oversubscribes the CPU and every model gets slower.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort


def onnx_session(path: Path | str | bytes, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    source = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
