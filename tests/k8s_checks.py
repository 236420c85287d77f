"""Checks over rendered Kubernetes manifests (one stack = one `kubectl kustomize` output): wiring, probes, safety.

Each check returns a list of problems (empty: fine), so a test can show them all at once.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
LOCAL_HOSTS = {"0.0.0.0", "127.0.0.1", "localhost"}
_REF = re.compile(r"\$\((\w+)\)")
_TCP = re.compile(r"^tcp://([^:/]+):(\d+)$")

Doc = dict


def render(directory: Path) -> list[Doc]:
    """The objects `kubectl kustomize directory` renders."""
    out = subprocess.run([shutil.which("kubectl") or "kubectl", "kustomize", str(directory)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {directory} failed:\n{out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def long_running(pod: Doc) -> Iterator[Doc]:
    """The containers that serve: the main ones and native sidecars (init containers with restartPolicy Always)."""
    yield from pod.get("containers", [])
    yield from (c for c in pod.get("initContainers", []) if c.get("restartPolicy") == "Always")


def all_containers(pod: Doc) -> Iterator[Doc]:
    yield from pod.get("containers", [])
    yield from pod.get("initContainers", [])


def pod_specs(docs: list[Doc]) -> Iterator[tuple[str, Doc, Doc]]:
    """(kind/name, pod template metadata, pod spec) of every Deployment and Job."""
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            template = doc["spec"]["template"]
            yield f"{doc['kind']}/{doc['metadata']['name']}", template["metadata"], template["spec"]


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def env_of(container: Doc, config: dict[str, str]) -> dict[str, str]:
    """The container's env as the kubelet sees it: envFrom ConfigMaps, then env with $(VAR) expanded."""
    env = dict(config) if container.get("envFrom") else {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = _REF.sub(lambda m: env.get(m.group(1), m.group(0)), item["value"])
    return env


def container_ports(pod: Doc) -> dict[str | int, int]:
    """Port name and number -> number, over every container of the pod."""
    ports: dict[str | int, int] = {}
    for container in all_containers(pod):
        for port in container.get("ports", []):
            ports[port["containerPort"]] = port["containerPort"]
            if "name" in port:
                ports[port["name"]] = port["containerPort"]
    return ports


def config_data(docs: list[Doc]) -> dict[str, str]:
    merged: dict[str, str] = {}
    for config_map in of_kind(docs, "ConfigMap"):
        merged.update(config_map.get("data", {}))
    return merged


def check_services(docs: list[Doc]) -> list[str]:
    """Every Service selects exactly one Deployment's pods, and its targetPorts exist on them."""
    problems = []
    deployments = of_kind(docs, "Deployment")
    for service in of_kind(docs, "Service"):
        name = service["metadata"]["name"]
        matched = [d for d in deployments if selects(service["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]
        if len(matched) != 1:
            problems.append(f"Service {name} selects {len(matched)} Deployments")
            continue
        ports = container_ports(matched[0]["spec"]["template"]["spec"])
        problems += [f"Service {name}: targetPort {p['targetPort']} not on its pods"
                     for p in service["spec"]["ports"] if p.get("targetPort", p["port"]) not in ports]
    return problems


def check_addresses(docs: list[Doc]) -> list[str]:
    """Every tcp:// address a container connects to is a Service of this stack with that port."""
    problems = []
    services = {s["metadata"]["name"]: {p["port"] for p in s["spec"]["ports"]} for s in of_kind(docs, "Service")}
    config = config_data(docs)
    for where, _, pod in pod_specs(docs):
        for container in all_containers(pod):
            for key, value in env_of(container, config).items():
                if "$(" in value:
                    problems.append(f"{where}/{container['name']}: {key}={value} references an undefined variable")
                for item in value.split(","):  # endpoint lists: every gateway, every replica
                    match = _TCP.match(item.strip())
                    if not match or match.group(1) in LOCAL_HOSTS:
                        continue
                    host, port = match.group(1), int(match.group(2))
                    if port not in services.get(host, set()):
                        problems.append(f"{where}/{container['name']}: {key}={item} is no Service port of this stack")
    return problems


def check_discovery(docs: list[Doc]) -> list[str]:
    """The Service tokenizers join is headless with not-ready pods, so its name resolves to every gateway pod."""
    problems = []
    services = {s["metadata"]["name"]: s for s in of_kind(docs, "Service")}
    config = config_data(docs)
    for where, _, pod in pod_specs(docs):
        for container in long_running(pod):
            for item in env_of(container, config).get("TOKENIZER_ENDPOINT", "").split(","):
                match = _TCP.match(item.strip())
                if not match or match.group(1) in LOCAL_HOSTS or match.group(1) not in services:
                    continue
                spec = services[match.group(1)]["spec"]
                if spec.get("clusterIP") != "None" or not spec.get("publishNotReadyAddresses"):
                    problems.append(f"{where}/{container['name']}: Service {match.group(1)} must be headless and "
                                    "publish not-ready pods, or tokenizers would miss gateways")
    return problems


def check_containers(docs: list[Doc]) -> list[str]:
    """Resources, non-root and dropped privileges everywhere; the three probes on every serving container."""
    problems = []
    for where, _, pod in pod_specs(docs):
        pod_security = pod.get("securityContext", {})
        for container in all_containers(pod):
            at = f"{where}/{container['name']}"
            resources = container.get("resources", {})
            if not resources.get("requests") or "memory" not in resources.get("limits", {}):
                problems.append(f"{at}: needs requests and a memory limit")
            security = container.get("securityContext", {})
            if not (security.get("runAsNonRoot") or pod_security.get("runAsNonRoot")):
                problems.append(f"{at}: not runAsNonRoot")
            if security.get("allowPrivilegeEscalation") is not False or security.get("capabilities", {}).get("drop") != ["ALL"]:
                problems.append(f"{at}: must not escalate and must drop all capabilities")
            names = [e["name"] for e in container.get("env", [])]
            problems += [f"{at}: env {n} set twice" for n in sorted({n for n in names if names.count(n) > 1})]
        if where.startswith("Deployment/"):
            problems += check_probes(where, pod)
    return problems


def check_probes(where: str, pod: Doc) -> list[str]:
    problems = []
    for container in long_running(pod):
        at = f"{where}/{container['name']}"
        ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            http = container.get(probe, {}).get("httpGet")
            if http is None:
                problems.append(f"{at}: no {probe} (httpGet)")
                continue
            port = ports.get(http["port"], http["port"])
            served = int(env["HEALTH_PORT"]) if "HEALTH_PORT" in env else int(env.get("PORT", 3000))
            if port != served:
                problems.append(f"{at}: {probe} on port {port}, but the process answers on {served}")
    return problems


def check_autoscaling(docs: list[Doc]) -> list[str]:
    """HPA targets exist and leave replicas to the HPA; PDBs select pods."""
    problems = []
    deployments = {d["metadata"]["name"]: d for d in of_kind(docs, "Deployment")}
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]["name"]
        if target not in deployments:
            problems.append(f"HPA {hpa['metadata']['name']} targets missing Deployment {target}")
        elif "replicas" in deployments[target]["spec"]:
            problems.append(f"Deployment {target} sets replicas beside its HPA: every apply resets the HPA")
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        if not any(selects(selector, d["spec"]["template"]["metadata"]["labels"]) for d in deployments.values()):
            problems.append(f"PDB {pdb['metadata']['name']} selects no pods")
    return problems


def check_network_policies(docs: list[Doc]) -> list[str]:
    """Every pod with a port is covered, and every port a policy opens exists on the pods it selects."""
    problems = []
    policies = of_kind(docs, "NetworkPolicy")
    for deployment in of_kind(docs, "Deployment"):
        labels, pod = deployment["spec"]["template"]["metadata"]["labels"], deployment["spec"]["template"]["spec"]
        covering = [p for p in policies if selects(p["spec"]["podSelector"]["matchLabels"], labels)]
        if not covering:
            problems.append(f"Deployment {deployment['metadata']['name']}: no NetworkPolicy")
        ports = container_ports(pod)
        opened = {p["port"] for policy in covering for rule in policy["spec"].get("ingress", []) for p in rule["ports"]}
        problems += [f"Deployment {deployment['metadata']['name']}: policy port {p} is on no container"
                     for p in opened if p not in ports]
    return problems


def selector_of(doc: Doc) -> dict | None:
    """The pod selector of a Service, Deployment, PodDisruptionBudget or NetworkPolicy (None for other kinds)."""
    spec = doc.get("spec", {})
    if doc["kind"] == "Service":
        return spec.get("selector")
    if doc["kind"] in ("Deployment", "PodDisruptionBudget"):
        return spec["selector"]["matchLabels"]
    if doc["kind"] == "NetworkPolicy":
        return spec["podSelector"]["matchLabels"]
    return None


def selector_overlaps(a: list[Doc], b: list[Doc]) -> list[str]:
    """Selectors of stack `a` that select pods of stack `b`."""
    pods_b = [d["spec"]["template"]["metadata"]["labels"] for d in of_kind(b, "Deployment")]
    return [f"{doc['kind']} {doc['metadata']['name']} selects pods of the other stack" for doc in a
            if (selector := selector_of(doc)) and any(selects(selector, labels) for labels in pods_b)]


def check_commands(docs: list[Doc], scripts: set[str], server_commands: set[str]) -> list[str]:
    """Every container runs a console script of this package (text-generation-server with a real subcommand)."""
    problems = []
    for where, _, pod in pod_specs(docs):
        for container in all_containers(pod):
            command = container.get("command", [])
            at = f"{where}/{container['name']}"
            if not command or command[0] not in scripts:
                problems.append(f"{at}: command {command} is no console script of the package")
            elif command[0] == "text-generation-server" and (len(command) < 2 or command[1] not in server_commands):
                problems.append(f"{at}: text-generation-server has no subcommand {command[1:2]}")
    return problems


def module_paths(text: str) -> set[str]:
    """Dotted `services.…` names mentioned in manifest text (python -m targets, imports)."""
    return set(re.findall(r"\bservices(?:\.\w+)+", text))


def resolves(dotted: str) -> bool:
    """Whether `dotted` is a module of this repository, or a name defined in one (not merely imported there)."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        if cut == len(parts):
            return True
        obj = getattr(module, parts[cut], None)
        return obj is not None and getattr(obj, "__module__", module.__name__) == module.__name__
    return False
