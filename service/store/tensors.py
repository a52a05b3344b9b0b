"""The tensor names a stored model's graphs are written with (by the export) and run by (by the service).

The classifier graph (``model.onnx``) takes ``images``, UINT8 ``[batch, H, W, C]``, and gives
``logits`` and ``probabilities``, FP32 ``[batch, classes]``, and where the export fitted a
typicality check into it, ``distance``, FP32 ``[batch]``. The explanation graph
(``explain.onnx``) takes the same ``images`` and ``classes`` (int64 ``[batch]``; a negative
entry means the image's top-1) and gives ``probabilities`` and ``gradcam`` first, then any
feature maps. The KServe v2 front end names its tensors the same, as Triton does.
"""

from __future__ import annotations

INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "probabilities")
DISTANCE_NAME = "distance"

CLASSES_NAME = "classes"
GRADCAM_NAME = "gradcam"
EXPLANATION_OUTPUT_NAMES = ("probabilities", GRADCAM_NAME)
