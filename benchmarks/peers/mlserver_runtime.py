"""An MLServer custom runtime for the exported graph (MLServer's documented way to serve a custom model).

Requests are Open Inference Protocol JSON with the encoded images as base64 BYTES (MLServer has
no raw-body route); adaptive batching (``max_batch_size``, ``max_batch_time`` in
``model-settings.json``) merges concurrent requests into one ``predict``.
"""

from __future__ import annotations

import json

from mlserver import MLModel
from mlserver.codecs import Base64Codec, StringCodec
from mlserver.types import InferenceRequest, InferenceResponse

from benchmarks.peers.common import Classifier


class CNNRuntime(MLModel):
    async def load(self) -> bool:
        self.classifier = Classifier(self.settings.parameters.uri)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        files = self.decode(payload.inputs[0], default_codec=Base64Codec)
        answers = [json.dumps(top) for top in self.classifier.classify(list(files))]
        return InferenceResponse(model_name=self.name, outputs=[StringCodec.encode_output("predictions", answers)])
