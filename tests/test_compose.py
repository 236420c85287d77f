"""compose/ wiring without Docker: scaled services, the envoy front, the one-line second replica, keys everywhere.

(tests/test_k8s.py validates the file against the compose spec.)
"""

from __future__ import annotations

from pathlib import Path

import yaml

COMPOSE = Path(__file__).resolve().parents[1] / "compose"


def load() -> dict:
    return yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())["services"]


def addresses(env: dict) -> list[tuple[str, int]]:
    found = []
    for value in env.values():
        for item in str(value).split(","):
            if item.startswith("tcp://"):
                host, port = item[len("tcp://"):].rsplit(":", 1)
                found.append((host, int(port)))
    return found


def test_every_address_is_a_service_of_the_file():
    services = load()
    for name, service in services.items():
        for host, _ in addresses(service.get("environment", {})):
            assert host == "0.0.0.0" or host in services, (name, host)


def test_tokenizers_and_gateways_scale_and_clients_come_through_an_l7_front():
    services = load()
    assert services["tokenizer"]["environment"]["TOKENIZER_ENDPOINT"] == "tcp://gateway:5570"
    assert services["tokenizer"]["deploy"]["replicas"] == 3 and services["gateway"]["deploy"]["replicas"] == 2
    for name in ("tokenizer", "gateway"):
        assert "container_name" not in services[name] and "ports" not in services[name]
    assert "8033:8033" in services["front"]["ports"]
    envoy = yaml.safe_load((COMPOSE / "envoy.yaml").read_text())["static_resources"]
    grpc = next(c for c in envoy["clusters"] if c["name"] == "gateways-grpc")
    assert grpc["type"] == "STRICT_DNS"
    assert "http2_protocol_options" in str(grpc["typed_extension_protocol_options"])
    address = grpc["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert (address["address"], address["port_value"]) == ("gateway", 8033)


def test_the_second_replica_is_one_profile_and_every_gateway_knows_it():
    services = load()
    assert services["gateway"]["environment"]["SCHEDULER_ENDPOINT"] == "tcp://scheduler:5550,tcp://scheduler-b:5550"
    for name in ("scheduler-b", "worker-b"):
        assert services[name]["profiles"] == ["replica-b"]
    assert {host for host, _ in addresses(services["worker-b"]["environment"])} == {"scheduler-b"}
    assert {host for host, _ in addresses(services["worker"]["environment"])} == {"scheduler"}
    assert services["scheduler-b"]["environment"] == services["scheduler"]["environment"]


def test_every_service_on_the_internal_links_has_the_curve_keys():
    services = load()
    for name in ("scheduler", "worker", "scheduler-b", "worker-b", "tokenizer", "gateway"):
        env = services[name]["environment"]
        assert env["CURVE_KEYS_DIR"] == "/curve", name
        assert "curve-keys:/curve:ro" in services[name]["volumes"], name
        assert "curve-keys" in services[name]["depends_on"], name
    assert "generate-curve-keys /curve" in " ".join(services["curve-keys"]["command"])
