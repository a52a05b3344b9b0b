"""The store is a Triton model repository: every config.pbtxt parses as Triton's own ModelConfig
message (tritonclient ships it; an unknown field or a wrong type fails the parse) and describes
the ONNX graph beside it as Triton's ONNX Runtime backend checks it (names, types, shapes with
the batch dimension first, the default file name), so overlays/triton serves the same store."""

from __future__ import annotations

import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from service.store.batch_limit import read_max_batch_size
from service.store.layout import ModelStore

ONNX_TO_TRITON = {onnx.TensorProto.UINT8: mc.TYPE_UINT8, onnx.TensorProto.FLOAT: mc.TYPE_FP32}


def shape(value: onnx.ValueInfoProto) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]


def test_every_config_is_a_triton_model_config_matching_its_graph(model_store: ModelStore) -> None:
    names = model_store.names()
    assert {"lenet5", "resnet18"} <= set(names)
    for name in names:
        directory = model_store.model_dir(name)
        config = text_format.Parse((directory / "config.pbtxt").read_text(), mc.ModelConfig())
        assert config.name == name == directory.name and config.platform == "onnxruntime_onnx"
        assert config.max_batch_size > 0 and config.HasField("dynamic_batching")
        assert read_max_batch_size(directory / "config.pbtxt") == config.max_batch_size  # the service reads it too
        assert config.version_policy.WhichOneof("policy_choice") == "latest"

        versions = model_store.versions(name)
        assert versions and all(v.graph.name == "model.onnx" and v.graph.parent.name.isdigit() for v in versions)
        graph = onnx.load(str(versions[-1].graph), load_external_data=False).graph
        for declared, actual in [
            *zip(config.input, graph.input, strict=True),
            *zip(config.output, graph.output, strict=True),
        ]:
            assert declared.name == actual.name
            assert declared.data_type == ONNX_TO_TRITON[actual.type.tensor_type.elem_type]
            # the batch dimension is Triton's, and dynamic; a tensor that is only the batch axis (the typicality
            # distance) is declared dims [1] with reshape { shape: [] }, as Triton's model configuration says
            model_dims = list(declared.reshape.shape) if declared.HasField("reshape") else list(declared.dims)
            assert [-1, *model_dims] == shape(actual)
            assert declared.dims and (not declared.HasField("reshape") or list(declared.dims) == [1])
        labels = [o.label_filename for o in config.output if o.label_filename]
        for label_file in labels:
            lines = (directory / label_file).read_text().splitlines()
            assert len(lines) == config.output[0].dims[0]


def test_a_config_with_an_unknown_field_does_not_parse() -> None:
    with pytest.raises(text_format.ParseError, match="max_batch"):
        text_format.Parse('name: "m" platform: "onnxruntime_onnx" max_batch: 8', mc.ModelConfig())
