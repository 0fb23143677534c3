"""Deployment files agree with the server: ports, probes, grace periods, image contract.

The Dockerfile, docker-compose.yml and deploy/k8s/*.yaml repeat numbers that live in
bnserve.server.config (DEFAULT_PORT, DEFAULT_METRICS_PORT, DEFAULT_GRACE_S) and flags that live
in bnserve.cli; these tests fail when one side moves without the other. No Docker, no cluster:
the files are parsed with PyYAML (the test extra) and checked structurally.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from bnserve.cli import build_parser
from bnserve.server.config import DEFAULT_GRACE_S, DEFAULT_METRICS_PORT, DEFAULT_PORT

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
CI_SCRIPT = ROOT / "deploy" / "docker-ci.sh"
YAML_FILES = [COMPOSE, *sorted(K8S.glob("*.yaml"))]


def load_all(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def load(path: Path) -> Any:
    (doc,) = load_all(path)
    return doc


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_yaml_files_parse(path: Path) -> None:
    assert load_all(path), f"{path} is empty"


# --- helpers ----------------------------------------------------------------------------------


def k8s_objects() -> dict[str, list[dict[str, Any]]]:
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_all(path):
            by_kind.setdefault(doc["kind"], []).append(doc)
    return by_kind


def the(kind: str) -> dict[str, Any]:
    (obj,) = k8s_objects()[kind]
    return obj


def container() -> dict[str, Any]:
    (c,) = the("Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def serve_args(args: list[str]) -> Any:
    """The container's args as `bnserve serve` parses them (unknown flags fail here)."""
    return build_parser().parse_args(["serve", *map(str, args)])


def cpu(q: str | int | float) -> float:
    s = str(q)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def mem(q: str | int) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 1e3, "M": 1e6, "G": 1e9}
    s = str(q)
    for suffix, factor in units.items():
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * factor
    return float(s)


def prestop_seconds(c: dict[str, Any]) -> float:
    pre = c["lifecycle"]["preStop"]
    if "sleep" in pre:
        return float(pre["sleep"]["seconds"])
    cmd = pre["exec"]["command"]
    assert cmd[0] == "sleep" and len(cmd) == 2, cmd
    return float(cmd[1])


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        if raw.lstrip().startswith("#") or (not raw.strip() and not pending):
            continue
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends in a continuation"
    return out


def instr(name: str) -> list[str]:
    return [args for word, args in dockerfile() if word == name]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in instr("ENV"):
        for token in shlex.split(args):
            key, sep, value = token.partition("=")
            assert sep, f"ENV in key=value form please: {args}"
            env[key] = value
    return env


# --- Dockerfile ---------------------------------------------------------------------------------


def test_dockerfile_stages_and_base() -> None:
    text = DOCKERFILE.read_text()
    assert text.splitlines()[0] == "ARG BASE_IMAGE=python:3.11-slim"
    assert "# syntax=" not in text
    froms = instr("FROM")
    # the venv, the native front end (compilers stay there), the runtime image
    assert froms == ["${BASE_IMAGE} AS build", "${BASE_IMAGE} AS native", "${BASE_IMAGE}"]
    copies = instr("COPY")
    assert "--from=build /opt/bnserve /opt/bnserve" in copies
    assert "--from=native /opt/bnserve/native /opt/bnserve/native" in copies
    assert "model_repository/ /models/" in copies
    # the runtime finds the native binary where the native stage built it
    assert dockerfile_env()["BNSERVE_NATIVE_BIN"] == "/opt/bnserve/native/bnserve_native"


def test_dockerfile_serving_install_only() -> None:
    runs = " ".join(instr("RUN"))
    # every dependency from the serving lock, hashes checked; bnserve itself adds none
    assert "pip install --require-hashes -r requirements-serve.txt" in runs
    assert "requirements-serve.txt ./" in instr("COPY")
    assert "pip install --no-deps --no-build-isolation ." in runs
    assert "python3 -m venv" in runs
    assert "[train]" not in runs and "[test]" not in runs
    assert "pip install torch" not in runs


def test_dockerfile_ports_env_and_healthcheck_agree_with_server_defaults() -> None:
    (expose,) = instr("EXPOSE")
    assert sorted(map(int, expose.split())) == sorted([DEFAULT_PORT, DEFAULT_METRICS_PORT])
    env = dockerfile_env()
    assert int(env["BNSERVE_PORT"]) == DEFAULT_PORT
    assert int(env["BNSERVE_METRICS_PORT"]) == DEFAULT_METRICS_PORT
    assert float(env["BNSERVE_GRACE"]) == DEFAULT_GRACE_S
    assert env["BNSERVE_REPO"] == "/models"
    assert env["BNSERVE_HOST"] == "0.0.0.0"

    (health,) = instr("HEALTHCHECK")
    cmd = health.split(" CMD ", 1)[1]
    m = re.search(r'bnserve health --target "?127\.0\.0\.1:\$\{BNSERVE_PORT:-(\d+)\}"?', cmd)
    assert m, cmd
    assert int(m.group(1)) == DEFAULT_PORT
    # The probe's own flags exist, and it would target the default port.
    words = shlex.split(cmd.replace("${BNSERVE_PORT:-8001}", str(DEFAULT_PORT)))
    probe = words[words.index("health") : words.index("||")]
    args = build_parser().parse_args(probe)
    assert args.target == f"127.0.0.1:{DEFAULT_PORT}"
    timeout = float(re.search(r"--timeout=(\d+)s", health).group(1))  # type: ignore[union-attr]
    assert args.timeout < timeout


def test_dockerfile_entrypoint_exec_form_nonroot_sigterm() -> None:
    (entry,) = instr("ENTRYPOINT")
    assert json.loads(entry) == ["bnserve", "serve"]  # exec form: no shell as PID 1
    (cmd,) = instr("CMD")
    assert json.loads(cmd) == []
    assert instr("STOPSIGNAL") == ["SIGTERM"]
    (user,) = instr("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    pod_security = the("Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert int(uid) == pod_security["runAsUser"]


def test_dockerignore_keeps_local_state_out() -> None:
    entries = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git", "build", ".pytest_cache", "checkpoints", "tests", "**/*.pt"} <= entries
    for needed in ("model_repository", "pyproject.toml", "README.md", "server", "cli.py"):
        assert needed not in entries


# --- Kubernetes -------------------------------------------------------------------------------


def test_deployment_args_ports_and_probes_agree_with_server_defaults() -> None:
    dep = the("Deployment")
    assert dep["spec"]["replicas"] >= 2
    c = container()
    args = serve_args(c["args"])
    assert "--grace" in c["args"], "pass --grace explicitly: the grace periods depend on it"
    assert args.port == DEFAULT_PORT
    assert args.metrics_port == DEFAULT_METRICS_PORT
    assert args.grace == DEFAULT_GRACE_S
    assert str(args.repo) == "/models"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": DEFAULT_PORT, "metrics": DEFAULT_METRICS_PORT}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": DEFAULT_PORT}, probe  # grpc.health.v1, server-wide
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == DEFAULT_METRICS_PORT


def test_grace_periods_nest() -> None:
    """preStop, then SIGTERM and up to --grace of draining, all before the kubelet's SIGKILL."""
    spec = the("Deployment")["spec"]["template"]["spec"]
    c = container()
    grace = serve_args(c["args"]).grace
    pre = prestop_seconds(c)
    assert pre > 0
    assert spec["terminationGracePeriodSeconds"] > pre + grace
    # Liveness must not kill a pod that is draining (health is NOT_SERVING from SIGTERM on).
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > grace


def test_resources_and_instances() -> None:
    c = container()
    req, lim = c["resources"]["requests"], c["resources"]["limits"]
    assert cpu(req["cpu"]) <= cpu(lim["cpu"])
    assert mem(req["memory"]) <= mem(lim["memory"])
    # os.cpu_count() in a pod is the node's: sessions per model must follow the CPU limit.
    assert serve_args(c["args"]).instances == int(cpu(lim["cpu"]))
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert "/tmp" in mounts


def test_services_select_the_pods() -> None:
    labels = the("Deployment")["spec"]["template"]["metadata"]["labels"]
    services = k8s_objects()["Service"]
    headless = [s for s in services if s["spec"].get("clusterIP") == "None"]
    cluster = [s for s in services if s["spec"].get("type", "ClusterIP") == "ClusterIP"]
    cluster = [s for s in cluster if s["spec"].get("clusterIP") != "None"]
    assert len(headless) == 1 and len(cluster) == 1
    for svc in services:
        assert svc["spec"]["selector"].items() <= labels.items()
        grpc = [p for p in svc["spec"]["ports"] if p["name"] == "grpc"]
        assert grpc and grpc[0]["port"] == DEFAULT_PORT and grpc[0]["targetPort"] == "grpc"
    metrics = [p for p in cluster[0]["spec"]["ports"] if p["name"] == "metrics"]
    assert metrics and metrics[0]["port"] == DEFAULT_METRICS_PORT


def test_hpa_and_pdb() -> None:
    dep = the("Deployment")
    hpa = the("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": dep["metadata"]["name"],
    }
    assert 2 <= hpa["spec"]["minReplicas"] <= dep["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    pdb = the("PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # A budget as large as the replica count would block every node drain.
    assert 1 <= pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


def test_kustomization_lists_every_manifest() -> None:
    kust = load(K8S / "kustomization.yaml")
    others = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == others


# --- docker compose ---------------------------------------------------------------------------


def test_compose_server() -> None:
    server = load(COMPOSE)["services"]["server"]
    assert server["build"]["context"] == "."
    published = {int(p.split(":")[1]) for p in server["ports"]}
    assert published == {DEFAULT_PORT, DEFAULT_METRICS_PORT}
    grace = serve_args(server["command"]).grace
    assert grace == DEFAULT_GRACE_S
    assert server["stop_signal"] == "SIGTERM"
    stop = float(server["stop_grace_period"].rstrip("s"))
    assert stop > grace
    test = server["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL" and "bnserve health --target 127.0.0.1:" in test[1]
    assert f"BNSERVE_PORT:-{DEFAULT_PORT}" in test[1]


def test_compose_bench() -> None:
    services = load(COMPOSE)["services"]
    bench = services["bench"]
    assert bench["image"] == services["server"]["image"]
    assert bench["depends_on"]["server"]["condition"] == "service_healthy"
    assert bench["entrypoint"] == ["bnserve", "bench"]
    cmd = bench["command"]
    assert cmd == [
        "--target",
        f"server:{DEFAULT_PORT}",
        "--model",
        "digits",
        "--duration",
        "10",
        "--concurrency",
        "8",
    ]
    assert bench["restart"] == "no"


def test_compose_bench_flags_parse() -> None:
    parser = build_parser()
    choices = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    if "bench" not in choices:
        pytest.skip("`bnserve bench` is not in the CLI yet")
    args = parser.parse_args(["bench", *load(COMPOSE)["services"]["bench"]["command"]])
    assert args.model == "digits"


# --- the CI script ------------------------------------------------------------------------------


def test_ci_script_is_valid_bash() -> None:
    text = CI_SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert CI_SCRIPT.stat().st_mode & 0o111, "not executable"
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    subprocess.run([bash, "-n", str(CI_SCRIPT)], check=True)
