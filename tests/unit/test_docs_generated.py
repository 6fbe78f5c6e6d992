"""Docs and deploy files that must not drift from the code: generated ones are
exactly what tests/docgen.py writes, the example config names every setting with
its default, and the metrics the docs list are the metrics the proxy exposes."""

from __future__ import annotations

import re
from pathlib import Path

import docgen
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import TypeAdapter

from guardproxy.config import Settings
from guardproxy.metrics import GuardproxyCollector, PoolView, StatsRegistry
from guardproxy.policy import load_policy_set

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "guardproxy.example.yaml"


def test_generated_files_are_up_to_date() -> None:
    for path, text in docgen.generated().items():
        assert path.read_text(encoding="utf-8") == text, (
            f"{path.relative_to(ROOT)} is stale: run scripts/docgen and commit it"
        )


def test_the_policies_configmap_is_the_example_policies() -> None:
    doc = yaml.safe_load(docgen.CONFIGMAP.read_text())
    files = {p.name: p.read_text() for p in docgen.POLICIES.glob("*.yaml")}
    assert doc["data"] == files
    assert len(load_policy_set(docgen.POLICIES)) == len(files)


def test_the_example_config_names_every_setting_with_its_default() -> None:
    text = EXAMPLE.read_text()
    active = yaml.safe_load(text)
    Settings.model_validate(active)
    for name, value in active.items():
        field = Settings.model_fields[name]
        default = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
        assert value == default, f"{name}: the example shows {value!r}, the default is {default!r}"
    commented = dict(
        (m.group(1), m.group(2)) for m in re.finditer(r"^# ([a-z_]+): (.+)$", text, re.M)
    )
    for name, value in commented.items():
        if name in Settings.model_fields:
            TypeAdapter(Settings.model_fields[name].annotation).validate_python(
                yaml.safe_load(value)
            )
    missing = set(Settings.model_fields) - set(active) - set(commented)
    assert not missing, f"{EXAMPLE.name} does not name {sorted(missing)}"


def _documented_metrics() -> set[str]:
    text = (ROOT / "docs" / "observability.md").read_text()
    return set(re.findall(r"^\| `(guardproxy_[a-z_]+)`", text, re.M))


def test_the_metrics_the_docs_list_are_the_metrics_exposed() -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GuardproxyCollector(StatsRegistry(), lambda: [PoolView("default", dict)]))
    exposed = set()
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            counter = kind == "counter" and not name.endswith("_total")
            exposed.add(f"{name}_total" if counter else name)
    assert _documented_metrics() == exposed
