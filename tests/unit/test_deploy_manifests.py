"""Deployment files agree with the Kubernetes schemas and with the proxy itself.

Offline and fast: every manifest under deploy/kubernetes is validated (strict:
unknown fields are errors) against the Kubernetes JSON schemas shipped by the
``kubernetes-validate`` package, and a deliberately broken manifest must be
rejected, so the validator is known to be live. The compose file is parsed and
its services, mounts and settings checked; the Dockerfile is read. Every
setting named in an arg, env var or config file must exist in
``guardproxy.config.Settings``, and the effective settings of each deployment
must validate. Probe and HEALTHCHECK paths are requested from a real
``OpsServer`` on loopback.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import json
import re
import shlex
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

from guardproxy import cli
from guardproxy.config import ENV_PREFIX, Settings, parse_dsn
from guardproxy.protocol.scram import load_verifiers
from guardproxy.server.http import OpsServer

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
NAMESPACE = "guardproxy"

# The oldest Kubernetes the manifests target, and the newest the installed schemas know.
K8S_VERSIONS = tuple(dict.fromkeys(("1.28", kubernetes_validate.latest_version())))

# Files other work adds to the repository. A compose mount of one of them is
# skipped, not failed, while the file is missing; any other missing file fails.
WRITTEN_BY_OTHERS = {
    "deploy/prometheus/prometheus.yml": "the Prometheus scrape config",
    "deploy/prometheus/alerts.yml": "the Prometheus alert rules",
    "deploy/grafana/guardproxy-dashboard.json": "the Grafana dashboard",
    "sql/example_schema.sql": "the example shop schema",
    "policies": "the example policies",
}
# Settings the deployment files already use while they are being added to Settings.
PENDING_SETTINGS = {"policies": "the policies directory, --policies"}
# Flags of `guardproxy serve` that are not settings.
CLI_ONLY_FLAGS = {"config"}


# ------------------------------------------------------------------ loading


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def k8s_objects() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in manifest_files():
        for doc in load_yaml_docs(path):
            out.append(
                (f"{path.name}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}", doc)
            )
    return out


OBJECTS = k8s_objects()


def the(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        doc
        for _, doc in OBJECTS
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected exactly one {kind} {name or ''} in {K8S}, found {len(found)}"
    return found[0]


def deployment() -> dict[str, Any]:
    return the("Deployment")


def container() -> dict[str, Any]:
    containers = deployment()["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "the Deployment runs one container, guardproxy"
    return containers[0]


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def compose_binds() -> list[tuple[str, str, str]]:
    """(service, source relative to deploy/, target) of every bind mount in the compose file."""
    out = []
    for service, spec in load_compose()["services"].items():
        for volume in spec.get("volumes", []):
            if isinstance(volume, str):
                source, _, rest = volume.partition(":")
                if source.startswith((".", "/")):
                    out.append((service, source, rest.split(":")[0]))
            elif volume.get("type") == "bind":
                out.append((service, volume["source"], volume["target"]))
    return out


def interpolate(value: str) -> str:
    """Compose variable interpolation with the defaults given in the file ($$ is a literal $)."""
    value = re.sub(r"\$\{(\w+)(?::?[-?]([^}]*))?\}", lambda m: m.group(2) or "", value)
    return value.replace("$$", "$")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def dockerfile_final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (kw, _) in enumerate(instructions) if kw == "FROM")
    return instructions[last_from:]


def dockerfile_args() -> dict[str, str]:
    args = {}
    for kw, rest in dockerfile_instructions():
        if kw == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key.strip()] = value.strip()
    return args


def dockerfile_env() -> dict[str, str]:
    env = {}
    for kw, rest in dockerfile_final_stage():
        if kw == "ENV":
            for item in shlex.split(rest):
                key, sep, value = item.partition("=")
                assert sep, f"use ENV KEY=VALUE in the Dockerfile, not {rest!r}"
                env[key] = value
    return env


def settings_env(env: dict[str, str]) -> dict[str, str]:
    """GUARDPROXY_<NAME> variables as {name: value}."""
    return {
        k.removeprefix(ENV_PREFIX).lower(): v for k, v in env.items() if k.startswith(ENV_PREFIX)
    }


def flags(tokens: list[str], *, positionals: bool = False) -> dict[str, str | None]:
    """--name value / --name=value / --switch as {name: value}, in the spelling of settings."""
    out: dict[str, str | None] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            assert positionals, f"unexpected argument {token!r} in {tokens}"
            i += 1
            continue
        name, sep, value = token[2:].partition("=")
        if not sep and i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            value = tokens[i + 1]
            i += 1
        out[name.replace("-", "_")] = value if (sep or value) else None
        i += 1
    return out


def guardproxy_invocations(command: list[str] | str) -> list[tuple[str, list[str]]]:
    """(subcommand, arguments) of each `guardproxy SUB ...` in a command or a shell script."""
    if isinstance(command, str):
        command = [command]
    out = []
    for part in command:
        for line in part.splitlines():
            tokens = shlex.split(line, comments=True)
            for i, token in enumerate(tokens[:-1]):
                if token == "guardproxy":
                    rest = tokens[i + 2 :]
                    end = next((j for j, t in enumerate(rest) if t in {"|", "&&", ";"}), len(rest))
                    out.append((tokens[i + 1], rest[:end]))
    return out


def assert_names_are_settings(names: set[str], where: str, *, flags_too: bool = False) -> None:
    known = set(Settings.model_fields)
    pending = {n for n in names if n in PENDING_SETTINGS and n not in known}
    if flags_too:
        known |= CLI_ONLY_FLAGS
    unknown = sorted(names - known - pending)
    assert not unknown, (
        f"{where} names {unknown}, which are not settings of guardproxy.config.Settings "
        f"(known: {', '.join(Settings.model_fields)})"
    )
    if flags_too:
        serve_params = set(inspect.signature(cli.serve).parameters)
        missing = sorted(n for n in names - pending if n not in serve_params)
        assert not missing, f"{where} passes {missing}, which `guardproxy serve` has no flag for"


def effective_settings(values: dict[str, Any], where: str) -> Settings:
    """Validates settings as the proxy would, leaving out pending settings not in Settings yet."""
    usable = {k: v for k, v in values.items() if k in Settings.model_fields}
    try:
        return Settings.model_validate(usable)
    except Exception as exc:
        pytest.fail(f"the settings {where} would run with are invalid: {exc}")


def parse_duration(value: str | int) -> float:
    if isinstance(value, int):
        return float(value)
    total, units = 0.0, {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value):
        total += float(number) * units[unit]
    return total


# ------------------------------------------------------- kubernetes schemas


def test_kubernetes_directory_has_every_manifest_and_kustomization_lists_them() -> None:
    kinds = {doc["kind"] for _, doc in OBJECTS}
    assert kinds >= {
        "Namespace",
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    }
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == [p.name for p in manifest_files()]
    assert kustomization["namespace"] == NAMESPACE
    image = container()["image"].rsplit(":", 1)[0]
    assert image in {i["name"] for i in kustomization.get("images", [])}
    for name, doc in OBJECTS:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{name}: namespace"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(("name", "doc"), OBJECTS, ids=[name for name, _ in OBJECTS])
def test_manifest_is_valid_against_kubernetes_schema(
    name: str, doc: dict[str, Any], version: str
) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path) or "(top)"
        pytest.fail(f"{name} is invalid for Kubernetes {version} at {where}: {exc.message}")


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        if value is _DELETE:
            del node[last]
        else:
            node[int(last) if last.isdigit() else last] = value

    return mutate


_DELETE = object()
CONTAINER = "spec.template.spec.containers.0"
BREAKAGES = {
    "replicas-not-an-integer": _set("spec.replicas", "three"),
    "misspelt-probe-field": _set(f"{CONTAINER}.readinesProbe", {"httpGet": {"path": "/readyz"}}),
    "probe-without-port": _set(f"{CONTAINER}.livenessProbe.httpGet.port", _DELETE),
    "no-selector": _set("spec.selector", _DELETE),
    "unknown-top-level-field": _set("speck", {}),
}


@pytest.mark.parametrize("breakage", BREAKAGES.values(), ids=BREAKAGES.keys())
def test_validator_rejects_a_broken_deployment(breakage: Callable[[dict[str, Any]], None]) -> None:
    good = copy.deepcopy(deployment())
    kubernetes_validate.validate(good, K8S_VERSIONS[0], strict=True)  # the control passes
    broken = copy.deepcopy(good)
    breakage(broken)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)


# ---------------------------------------------- the Deployment and its peers


# What the downward API gives a pod, for the env vars taken from it (fieldRef).
POD_FIELDS = {"status.podIP": "10.244.3.17", "metadata.name": "guardproxy-7d9c-abcde"}


def container_env() -> dict[str, str]:
    """The container's env as the kubelet sets it: values with $(VAR) references to
    earlier variables expanded, Secret refs and downward-API fields resolved."""
    out: dict[str, str] = {}
    for env in container().get("env", []):
        if "value" in env:
            value = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                lambda m: out.get(m.group(1), m.group(0)),
                str(env["value"]),
            )
        elif "fieldRef" in env["valueFrom"]:
            value = POD_FIELDS[env["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            ref = env["valueFrom"]["secretKeyRef"]
            value = the("Secret", ref["name"])["stringData"][ref["key"]]
        out[env["name"]] = value
    return out


def deployment_settings() -> dict[str, Any]:
    """config file (ConfigMap) < env (values and Secret refs) < args, as the pod would run."""
    c = container()
    args = flags(c.get("args", []))
    values: dict[str, Any] = {}
    config_path = args.get("config")
    if config_path:
        key = mounted_key(config_path, "ConfigMap")
        values.update(yaml.safe_load(the("ConfigMap", key[0])["data"][key[1]]) or {})
    values.update(settings_env(container_env()))
    values.update({k: v for k, v in args.items() if k not in CLI_ONLY_FLAGS})
    return values


def mounted_key(file_path: str, kind: str) -> tuple[str, str]:
    """(object name, key) of the ConfigMap or Secret that provides file_path in the pod."""
    path = PurePosixPath(file_path)
    volume = mounted_volume(str(path.parent))
    source = volume.get("configMap") if kind == "ConfigMap" else volume.get("secret")
    assert source, f"{file_path} is not mounted from a {kind}"
    name = source["name"] if kind == "ConfigMap" else source["secretName"]
    return name, path.name


def mounted_volume(directory: str) -> dict[str, Any]:
    mounts = {m["mountPath"]: m["name"] for m in container()["volumeMounts"]}
    assert directory in mounts, f"nothing is mounted at {directory} (mounts: {sorted(mounts)})"
    volumes = {v["name"]: v for v in deployment()["spec"]["template"]["spec"]["volumes"]}
    return volumes[mounts[directory]]


def test_deployment_names_only_known_settings() -> None:
    c = container()
    arg_names = set(flags(c.get("args", [])))
    assert_names_are_settings(arg_names, "the Deployment's args", flags_too=True)
    env = {e["name"]: "" for e in c.get("env", [])}
    assert_names_are_settings(set(settings_env(env)), "the Deployment's env")
    config = the("ConfigMap", "guardproxy-config")["data"]["guardproxy.yaml"]
    assert_names_are_settings(
        set(yaml.safe_load(config)), "configmap-config.yaml's guardproxy.yaml"
    )


def test_deployment_settings_are_valid_and_wired_to_the_mounts() -> None:
    values = deployment_settings()
    s = effective_settings(values, "the Deployment")
    assert s.listen_host == "0.0.0.0" and s.auth_mode == "scram"
    assert s.upstream is not None and s.metrics_port is not None
    # The files and directories the settings name are where the pod mounts them.
    assert s.auth_file is not None
    name, key = mounted_key(str(s.auth_file), "Secret")
    assert key in the("Secret", name)["stringData"]
    policies = values.get("policies")
    assert policies, "the Deployment passes a policies directory"
    assert mounted_volume(str(policies))["configMap"]["name"] == "guardproxy-policies"
    # Ports line up: container ports, probes, Service, scrape annotation.
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert ports == {"postgres": s.listen_port, "metrics": s.metrics_port}
    annotations = deployment()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == s.metrics_port
    service = the("Service")
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {
        "postgres": "postgres",
        "metrics": "metrics",
    }


def test_deployment_advertises_the_pod_ip_for_cancel_requests_between_replicas() -> None:
    # Replicas forward cancel requests to each other at the address each one registered:
    # the pod's own IP (downward API) and the port agents connect to, never the Service.
    env = {e["name"]: e for e in container()["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    names = list(env)
    assert names.index("POD_IP") < names.index("GUARDPROXY_ADVERTISE_ADDRESS"), (
        "$(POD_IP) expands only when POD_IP is defined earlier in the list"
    )
    s = effective_settings(deployment_settings(), "the Deployment")
    assert s.advertise_address == f"{POD_FIELDS['status.podIP']}:{s.listen_port}"
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert ports["postgres"] == s.listen_port
    assert s.instance_stale_after >= 2 * s.instance_heartbeat_interval


def test_deployment_probes_use_the_ops_port_paths() -> None:
    c = container()
    probes = {
        kind: c[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["startupProbe"]["path"] == "/healthz"
    assert {p["port"] for p in probes.values()} == {"metrics"}


def test_deployment_shuts_down_gracefully_and_runs_locked_down() -> None:
    spec = deployment()["spec"]
    pod = spec["template"]["spec"]
    c = container()
    s = effective_settings(deployment_settings(), "the Deployment")
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + s.shutdown_timeout, (
        "terminationGracePeriodSeconds must exceed the preStop sleep plus shutdown_timeout, "
        "or the kubelet kills the proxy while transactions are still finishing"
    )
    assert spec["replicas"] == 3
    assert pod["securityContext"]["runAsNonRoot"] is True
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    # A read-only root still needs a writable /tmp (the workers' cancel relay sockets).
    assert "emptyDir" in mounted_volume("/tmp")
    for kind in ("requests", "limits"):
        assert set(c["resources"][kind]) == {"cpu", "memory"}
    assert pod["topologySpreadConstraints"]


def test_service_pdb_and_hpa_select_the_deployment() -> None:
    d = deployment()
    pod_labels = d["spec"]["template"]["metadata"]["labels"]
    selector = d["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert the("Service")["spec"]["selector"].items() <= pod_labels.items()
    pdb = the("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    for constraint in d["spec"]["template"]["spec"]["topologySpreadConstraints"]:
        assert constraint["labelSelector"]["matchLabels"].items() <= pod_labels.items()
    hpa = the("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", d["metadata"]["name"])
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert pdb["spec"]["minAvailable"] == 2
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"], (
        "with minReplicas <= minAvailable, no node could ever be drained"
    )


def test_policies_configmap_holds_a_policy_set_the_proxy_loads(tmp_path: Path) -> None:
    data = the("ConfigMap", "guardproxy-policies").get("data") or {}
    assert data, "the proxy refuses to start without a policy file"
    for key in data:
        assert re.fullmatch(r"[-._a-zA-Z0-9]+\.ya?ml", key), f"policy key {key!r}"
        (tmp_path / key).write_text(data[key])
    try:
        from guardproxy.policy.loader import load_policy_set
    except ImportError:
        pytest.skip("guardproxy.policy.loader is not there yet: policy files only parsed")
    try:
        policies = load_policy_set(tmp_path)
    except Exception as exc:
        pytest.fail(
            f"configmap-policies.yaml holds policies the proxy rejects: {exc}\n"
            "regenerate it from policies/ (see the command at the top of the file)"
        )
    assert len(policies) == len(data)


def test_example_secret_holds_only_fake_values(tmp_path: Path) -> None:
    upstream = the("Secret", "guardproxy-upstream")["stringData"]["upstream"]
    assert "FAKE" in (parse_dsn(upstream).password or ""), "the example DSN must be obviously fake"
    auth = tmp_path / "agents.auth"
    auth.write_text(the("Secret", "guardproxy-auth")["stringData"]["agents.auth"])
    assert load_verifiers(auth) == {}, "the example auth file must hold no verifier"


# ------------------------------------------------------------------ compose


def test_compose_services_and_wiring() -> None:
    compose = load_compose()
    services = compose["services"]
    assert set(services) == {"postgres", "guardproxy", "prometheus", "grafana"}
    assert str(services["postgres"]["image"]).startswith("postgres:15")
    proxy = services["guardproxy"]
    build = proxy["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == ROOT, "guardproxy is built from the repository root"
    assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
    assert proxy["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "healthcheck" in services["postgres"]
    declared = set(compose.get("volumes") or {})
    for service, spec in services.items():
        for volume in spec.get("volumes", []):
            if isinstance(volume, dict) and volume.get("type") == "bind":
                assert volume["bind"]["create_host_path"] is False, (
                    f"{service}: a missing {volume['source']} must be an error, not a new directory"
                )
            if isinstance(volume, str) and not volume.startswith((".", "/")):
                assert volume.split(":")[0] in declared, f"{service}: undeclared volume {volume}"
    targets = {target for svc, _, target in compose_binds() if svc == "prometheus"}
    assert "/etc/prometheus/prometheus.yml" in targets


def test_compose_guardproxy_settings_are_known_and_valid() -> None:
    compose = load_compose()
    proxy = compose["services"]["guardproxy"]
    env = {k: interpolate(str(v)) for k, v in (proxy.get("environment") or {}).items()}
    assert_names_are_settings(set(settings_env(env)), "the compose guardproxy environment")
    values: dict[str, Any] = settings_env(dockerfile_env()) | settings_env(env)
    invocations = guardproxy_invocations(proxy.get("command", []))
    if proxy.get("entrypoint") is None:
        invocations = [("serve", [interpolate(str(t)) for t in proxy.get("command", [])])]
    assert [sub for sub, _ in invocations].count("serve") == 1, "the proxy is started once"
    for sub, args in invocations:
        named = flags(args, positionals=sub != "serve")
        if sub == "serve":
            assert_names_are_settings(set(named), "the compose `guardproxy serve`", flags_too=True)
            values |= {k: v for k, v in named.items() if k not in CLI_ONLY_FLAGS}
        else:
            func = getattr(cli, sub, None)
            if func is None and args:  # a command group: `guardproxy db upgrade`
                func = getattr(cli, f"{sub}_{args[0]}", None)
            assert func is not None, f"compose runs `guardproxy {sub}`, which does not exist"
            params = set(inspect.signature(func).parameters)
            assert set(named) <= params, f"`guardproxy {sub}` has no flag for {set(named) - params}"
    s = effective_settings(values, "the compose guardproxy service")
    # The DSN reaches the compose Postgres with the credentials it was created with.
    assert s.upstream is not None
    upstream = parse_dsn(s.upstream)
    pg_env = {
        k: interpolate(str(v)) for k, v in compose["services"]["postgres"]["environment"].items()
    }
    assert (upstream.host, upstream.port) == ("postgres", 5432)
    assert upstream.user == pg_env["POSTGRES_USER"]
    assert upstream.password == pg_env["POSTGRES_PASSWORD"]
    assert upstream.database == pg_env["POSTGRES_DB"]
    published = {str(p).rsplit(":", 1)[-1] for p in proxy["ports"]}
    assert {str(s.listen_port), str(s.metrics_port)} <= published
    assert parse_duration(proxy["stop_grace_period"]) > s.shutdown_timeout
    if "policies" in values:
        policy_mounts = [t for svc, _, t in compose_binds() if svc == "guardproxy"]
        assert values["policies"] in policy_mounts


def test_compose_grafana_provisioning_points_at_prometheus_and_the_dashboard() -> None:
    binds = {target: source for svc, source, target in compose_binds() if svc == "grafana"}
    sources = {
        t: yaml.safe_load((DEPLOY / s).read_text()) for t, s in binds.items() if t.endswith(".yml")
    }
    datasources = next(v for t, v in sources.items() if "/datasources/" in t)["datasources"]
    assert [d["url"] for d in datasources] == ["http://prometheus:9090"]
    providers = next(v for t, v in sources.items() if "/dashboards/" in t)["providers"]
    dashboards = [t for t in binds if t.endswith(".json")]
    assert dashboards, "grafana mounts the guardproxy dashboard"
    paths = {p["options"]["path"] for p in providers}
    assert {str(PurePosixPath(t).parent) for t in dashboards} <= paths


@pytest.mark.parametrize(
    ("service", "source", "target"),
    compose_binds(),
    ids=[f"{s}:{src}" for s, src, _ in compose_binds()],
)
def test_compose_mount_source_exists(service: str, source: str, target: str) -> None:
    path = (DEPLOY / source).resolve()
    assert path.is_relative_to(ROOT), f"{service} mounts {source}, outside the repository"
    rel = path.relative_to(ROOT).as_posix()
    if not path.exists():
        if rel in WRITTEN_BY_OTHERS:
            pytest.skip(
                f"{rel} ({WRITTEN_BY_OTHERS[rel]}) is not in the repository yet: it is being "
                f"written separately; compose service {service} mounts it at {target}"
            )
        pytest.fail(f"compose service {service} mounts {rel}, which does not exist")
    if path.is_file():
        assert PurePosixPath(target).suffix == path.suffix, f"{rel} mounted as {target}"
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix in {".yml", ".yaml"}:
            yaml.safe_load(path.read_text())


# --------------------------------------------------------------- Dockerfile


def test_dockerfile_builds_a_non_root_guardproxy_image() -> None:
    args = dockerfile_args()
    froms = [rest for kw, rest in dockerfile_instructions() if kw == "FROM"]
    for image in froms:
        resolved = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image.split()[0])
        assert resolved == "python:3.11-slim"
    runs = " ".join(rest for kw, rest in dockerfile_instructions() if kw == "RUN")
    assert re.search(r"pip install \.(\s|$)", runs), "the image pip-installs the project"
    # the hot path compiled (guardproxy/native.py), with a compiler in the build stage only
    compiled = re.search(r"GUARDPROXY_COMPILE=1 \S*pip install ([^&]*)", runs)
    assert compiled, "the image compiles the hot path"
    assert "--no-build-isolation" in compiled.group(1), "mypyc needs the dependencies' types"
    assert "gcc" in runs and "gcc" not in " ".join(
        r for kw, r in dockerfile_final_stage() if kw == "RUN"
    )
    final = dict(dockerfile_final_stage())
    user = final["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0, "USER must be a numeric non-root uid"
    assert json.loads(final["ENTRYPOINT"]) == ["guardproxy", "serve"]
    env = dockerfile_env()
    assert_names_are_settings(set(settings_env(env)), "the Dockerfile's ENV")
    s = effective_settings(settings_env(env), "the image by default")
    exposed = {
        int(p.split("/")[0])
        for kw, rest in dockerfile_final_stage()
        if kw == "EXPOSE"
        for p in rest.split()
    }
    assert {s.listen_port, s.metrics_port} <= exposed


def test_dockerfile_copies_everything_the_package_build_needs() -> None:
    """pyproject's readme, package directories and package-dir mappings are in the build context."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = project.get("tool", {}).get("setuptools", {})
    needed = {"pyproject.toml", "setup.py", project["project"]["readme"]}
    package_dirs = setuptools.get("package-dir", {})
    for package in setuptools.get("packages", ["guardproxy"]):
        top = package.split(".")[0]
        mapped = next(
            (d for p, d in package_dirs.items() if package == p or package.startswith(p + ".")),
            None,
        )
        needed.add(mapped.split("/")[0] if mapped else top)
    copied: set[str] = set()
    for kw, rest in dockerfile_instructions():
        if kw == "COPY" and not rest.startswith("--from"):
            *sources, _dest = shlex.split(rest)
            copied |= {src.rstrip("/") for src in sources}
    assert needed <= copied, f"the Dockerfile does not COPY {sorted(needed - copied)}"
    for source in needed:
        assert (ROOT / source).exists(), source


def test_the_package_build_ships_every_subpackage() -> None:
    """pyproject lists the packages by hand: a subpackage left out is missing from every
    non-editable install (the image) while the checkout, editable, still has it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(project["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "guardproxy").rglob("__init__.py")
    }
    assert found - listed == set(), f"pyproject.toml does not ship {sorted(found - listed)}"


def healthcheck_command() -> list[str]:
    final = dict(dockerfile_final_stage())
    _, _, command = final["HEALTHCHECK"].partition("CMD ")
    argv = json.loads(command)
    assert isinstance(argv, list), "HEALTHCHECK CMD in exec form"
    return argv


def test_dockerfile_healthcheck_asks_healthz_without_curl() -> None:
    argv = healthcheck_command()
    text = " ".join(argv)
    assert "/healthz" in text
    assert not ({"curl", "wget"} & set(re.findall(r"\w+", text))), "python:3.11-slim has neither"
    assert argv[:2] == ["python", "-c"]
    default_port = re.search(r"get\('GUARDPROXY_METRICS_PORT', '(\d+)'\)", text)
    assert default_port, "the healthcheck follows GUARDPROXY_METRICS_PORT"
    assert default_port.group(1) == dockerfile_env()["GUARDPROXY_METRICS_PORT"]


# ------------------------------------------- the paths are really served


async def http_status(port: int, path: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
    await writer.drain()
    status_line = await reader.readline()
    await reader.read()
    writer.close()
    await writer.wait_closed()
    return int(status_line.split()[1])


async def test_probe_and_healthcheck_paths_are_served_by_the_ops_port() -> None:
    c = container()
    paths = {
        c[kind]["httpGet"]["path"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    paths.add(deployment()["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"])

    async def ready() -> tuple[bool, str]:
        return True, "ready"

    ops = OpsServer(CollectorRegistry(), ready)
    await ops.start("127.0.0.1", 0)
    try:
        for path in sorted(paths):
            assert await http_status(ops.port, path) == 200, path
        assert await http_status(ops.port, "/no-such-path") == 404  # the control

        # The Dockerfile's HEALTHCHECK command itself: exit 0 while /healthz answers.
        argv = healthcheck_command()
        env = {"GUARDPROXY_METRICS_PORT": str(ops.port), "PATH": ""}
        proc = await asyncio.create_subprocess_exec(sys.executable, *argv[1:], env=env)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        ops.close()
    # ... and non-zero once nothing listens there.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *argv[1:], env=env, stderr=asyncio.subprocess.DEVNULL
    )
    assert await asyncio.wait_for(proc.wait(), 15) != 0


@pytest.mark.parametrize("name", sorted(PENDING_SETTINGS))
def test_pending_setting_has_landed(name: str) -> None:
    if name not in Settings.model_fields:
        pytest.skip(
            f"setting {name!r} ({PENDING_SETTINGS[name]}) is not in guardproxy.config.Settings "
            "yet; the deployment files already use it"
        )
    assert name in inspect.signature(cli.serve).parameters
