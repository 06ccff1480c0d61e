"""The Grafana dashboard only uses metrics that metrics.yaml declares."""

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def declared_metrics() -> set[str]:
    config = yaml.safe_load((ROOT / "metrics.yaml").read_text())
    names = set()
    for section in ("ts_metrics", "model_metrics"):
        for metrics in config[section].values():
            names |= {m["name"] for m in metrics}
    return names


def test_dashboard_queries_name_declared_metrics():
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs
    used = {name for e in exprs for name in re.findall(r"\b([A-Za-z_][A-Za-z0-9_]*)\s*[{\[]", e)} - {"rate"}
    missing = used - declared_metrics()
    assert not missing, f"dashboard uses undeclared metrics: {sorted(missing)}"
    for stage in ("DecodeTransformMs", "HostToDeviceMs", "InferenceMs", "PostprocessMs", "BadImages"):
        assert stage in used
