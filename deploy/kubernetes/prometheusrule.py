"""Writes components/monitoring/prometheusrule.yaml from monitoring/alerts.yml (``make manifests``).

One source for the alerts: docker-compose's Prometheus loads the rules file itself, the
Prometheus Operator loads this PrometheusRule; a test checks the two agree.
"""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "monitoring" / "alerts.yml"
OUT = Path(__file__).parent / "components" / "monitoring" / "prometheusrule.yaml"
HEADER = "# Generated from monitoring/alerts.yml by `make manifests`: edit that file, not this one.\n"


def prometheus_rule() -> dict:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "cnn-serving", "labels": {"release": "prometheus"}},
        "spec": {"groups": groups},
    }


def render() -> str:
    return HEADER + yaml.safe_dump(prometheus_rule(), sort_keys=False, width=120)


if __name__ == "__main__":
    OUT.write_text(render())
