"""Our fmaas proto equals the vLLM TGIS adapter's published one (its wheel's generated module) and keeps TGIS's."""

from __future__ import annotations

import ast
import asyncio
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from services.common.protocol import ModelInfo
from services.gateway.adapters import AdapterLookup
from services.gateway.pb import generation_pb2 as pb
from services.gateway.validation import ValidationError

# The release whose proto the extensions follow; a newer one may add fields we do not serve yet.
ADAPTER_VERSION = "0.10.0"
ADAPTER_MODULE = "vllm_tgis_adapter/grpc/pb/generation_pb2.py"


def _adapter_file_descriptor(tmp: Path) -> descriptor_pb2.FileDescriptorProto:
    """The adapter's serialized descriptor, read from its wheel without importing it (its names clash with ours)."""
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", f"vllm-tgis-adapter=={ADAPTER_VERSION}", "--no-deps",
                        "--quiet", "--timeout", "10", "--retries", "1", "-d", str(tmp)], check=True, timeout=120, capture_output=True)
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"the vllm-tgis-adapter wheel could not be fetched from PyPI (offline?): {exc}")
    wheel = next(tmp.glob("vllm_tgis_adapter-*.whl"))
    source = zipfile.ZipFile(wheel).read(ADAPTER_MODULE).decode()
    serialized = re.search(r"AddSerializedFile\((b'.*?')\)", source, re.S)
    assert serialized, "the adapter's generated module no longer embeds a serialized descriptor"
    return descriptor_pb2.FileDescriptorProto.FromString(ast.literal_eval(serialized.group(1)))


def _ours() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(proto)
    return proto


def _message_shape(message: descriptor_pb2.DescriptorProto, prefix: str = "") -> dict[str, object]:
    """Everything that decides the wire format and the generated API, keyed by full name (order-free)."""
    shapes: dict[str, object] = {}
    oneofs = [o.name for o in message.oneof_decl]
    shapes[prefix + message.name] = {
        f.name: (f.number, f.label, f.type, f.type_name, oneofs[f.oneof_index] if f.HasField("oneof_index") else None,
                 f.proto3_optional)
        for f in message.field
    }
    for nested in message.nested_type:
        shapes.update(_message_shape(nested, f"{prefix}{message.name}."))
    for enum in message.enum_type:
        shapes[f"{prefix}{message.name}.{enum.name}"] = {v.name: v.number for v in enum.value}
    return shapes


def _file_shape(proto: descriptor_pb2.FileDescriptorProto) -> dict[str, object]:
    shapes: dict[str, object] = {"package": proto.package}
    for message in proto.message_type:
        shapes.update(_message_shape(message))
    for enum in proto.enum_type:
        shapes[enum.name] = {v.name: v.number for v in enum.value}
    for service in proto.service:
        shapes[service.name] = {m.name: (m.input_type, m.output_type, m.server_streaming) for m in service.method}
    return shapes


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> dict[str, object]:
    return _file_shape(_adapter_file_descriptor(tmp_path_factory.mktemp("adapter-wheel")))


def test_our_descriptors_equal_the_adapters(adapter):
    ours = _file_shape(_ours())
    assert sorted(ours) == sorted(adapter)
    for name, shape in adapter.items():
        assert ours[name] == shape, name


def test_the_extensions_have_the_adapters_names_and_numbers():
    def numbers(message) -> dict[str, int]:
        return {f.name: f.number for f in message.DESCRIPTOR.fields}

    assert numbers(pb.BatchedGenerationRequest)["adapter_id"] == 4
    assert numbers(pb.SingleGenerationRequest)["adapter_id"] == 4
    assert {k: v for k, v in numbers(pb.BatchedTokenizeRequest).items() if k in ("prefix_id", "adapter_id")} == {
        "prefix_id": 6, "adapter_id": 7}
    guided = pb.DecodingParameters.DESCRIPTOR.oneofs_by_name["guided"]
    assert {f.name: f.number for f in guided.fields} == {"format": 3, "json_schema": 4, "regex": 5, "choice": 6,
                                                         "grammar": 7}
    assert {v.name: v.number for v in pb.DecodingParameters.ResponseFormat.DESCRIPTOR.values} == {"TEXT": 0, "JSON": 1}
    assert numbers(pb.DecodingParameters.StringChoices) == {"choices": 1}


def test_a_tgis_client_sees_no_change():
    """TGIS's bytes decode the same: temperature became proto3-optional (same wire type), 0 still reads as unset."""
    tgis_bytes = pb.Parameters(sampling=pb.SamplingParameters(top_k=5)).SerializeToString()
    decoded = pb.Parameters.FromString(tgis_bytes)
    assert decoded.sampling.temperature == 0.0 and decoded.sampling.top_k == 5
    assert pb.SamplingParameters(temperature=0.5).SerializeToString() == b"\x0d" + struct.pack("<f", 0.5)
    assert pb.DecodingParameters(repetition_penalty=1.5).WhichOneof("guided") is None


def test_an_adapter_id_without_adapter_cache_is_refused_naming_it():
    model = ModelInfo("m", "/m", False, 10, 0, 0, 64, 16, 1, 1, "cpu", "float32")
    with pytest.raises(ValidationError, match="can't retrieve adapter with id 'team/lora-1': adapter_id supplied but "
                                              "no adapter store was configured"):
        asyncio.run(AdapterLookup(None).check("team/lora-1", model))
