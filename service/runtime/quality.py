"""What every answer already knows about itself: how sure the model was, and whether to trust it.

The softmax is computed for every image anyway; from it, per image, the **top-1
probability** and the **normalised entropy** (the prediction's entropy over ``log(classes)``:
0 when one class has everything, 1 when every class is as likely). Both go to histograms per
model and version (``cnn_prediction_confidence``, ``cnn_prediction_entropy``), counted once
per image served whatever the front end. An image is **confident** when its top-1
probability reaches the model's abstain threshold (``abstain.threshold`` in its metadata,
derived by the export from held-out data) or the client's ``min_confidence``.
"""

from __future__ import annotations

import numpy as np

# top-1 probability: finer where a trained classifier's answers gather (near 1)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)
ENTROPY_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def confidence_and_entropy(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``probabilities`` (N x classes): the top-1 probability and the normalised entropy."""
    top1 = probabilities.max(axis=1)
    classes = probabilities.shape[1]
    if classes < 2:
        return top1, np.zeros_like(top1)
    p = np.clip(probabilities, 1e-12, 1.0)
    entropy = -(probabilities * np.log(p)).sum(axis=1) / np.log(classes)
    return top1, np.clip(entropy, 0.0, 1.0)
