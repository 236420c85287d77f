"""The committed gRPC stubs match proto/generation.proto, and the proto keeps TGIS's wire numbers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services.gateway.pb import generation_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
ADAPTER_EXTENSIONS = {"BatchedGenerationRequest": {"adapter_id"}, "BatchedTokenizeRequest": {"prefix_id", "adapter_id"},
                      "DecodingParameters": {"format", "json_schema", "regex", "choice", "grammar"}}


def test_committed_stubs_are_up_to_date(tmp_path):
    pytest.importorskip("grpc_tools")
    (tmp_path / "services/gateway/pb").mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-Iservices/gateway/pb={ROOT / 'proto'}",
                    f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                    "services/gateway/pb/generation.proto"], check=True, cwd=ROOT)
    for name in ("generation_pb2.py", "generation_pb2.pyi", "generation_pb2_grpc.py"):
        generated = (tmp_path / "services/gateway/pb" / name).read_text()
        assert generated == (ROOT / "services/gateway/pb" / name).read_text(), f"run scripts/gen-proto.sh ({name})"


def test_tgis_field_numbers():
    def numbers(message) -> dict[str, int]:
        # The vLLM TGIS adapter's extensions are checked in test_adapter_proto.py; TGIS's own fields are these.
        extensions = ADAPTER_EXTENSIONS.get(message.DESCRIPTOR.name, set())
        return {f.name: f.number for f in message.DESCRIPTOR.fields if f.name not in extensions}

    assert numbers(pb.GenerationResponse) == {
        "input_token_count": 6, "generated_token_count": 2, "text": 4, "stop_reason": 7, "stop_sequence": 11,
        "seed": 10, "tokens": 8, "input_tokens": 9}
    assert numbers(pb.Parameters) == {"method": 1, "sampling": 2, "stopping": 3, "response": 4, "decoding": 5,
                                      "truncate_input_tokens": 6}
    assert numbers(pb.SamplingParameters) == {"temperature": 1, "top_k": 2, "top_p": 3, "typical_p": 4, "seed": 5}
    assert numbers(pb.StoppingCriteria) == {"max_new_tokens": 1, "min_new_tokens": 2, "time_limit_millis": 3,
                                            "stop_sequences": 4, "include_stop_sequence": 5}
    assert numbers(pb.BatchedTokenizeRequest) == {"model_id": 1, "requests": 2, "return_tokens": 3,
                                                  "return_offsets": 4, "truncate_input_tokens": 5}
    assert numbers(pb.DecodingParameters) == {"repetition_penalty": 1, "length_penalty": 2}
    assert numbers(pb.BatchedGenerationRequest) == {"model_id": 1, "prefix_id": 2, "requests": 3, "params": 10}
    assert numbers(pb.TokenInfo) == {"text": 2, "logprob": 3, "rank": 4, "top_tokens": 5}
    assert [v.number for v in pb.StopReason.DESCRIPTOR.values] == list(range(8))
    assert pb.DESCRIPTOR.package == "fmaas"
