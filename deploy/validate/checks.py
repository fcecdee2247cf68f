"""Consistency checks across deploy/ that no schema can express, and a strict
(unknown-field) check of the KEDA objects against KEDA's own API models.

    python checks.py compose  ROOT
    python checks.py grafana  ROOT
    python checks.py k8s      ROOT RENDERED.yaml KEDA_OUT.json
    python checks.py compose-env ROOT SERVICE   (prints its TXQ_* variables)
Each prints its findings and exits 1 if any.
"""

import filecmp
import json
import re
import sys
import tomllib
import typing
from pathlib import Path

import yaml

problems: list[str] = []


def check(ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


def seconds(text: str) -> float:
    """humantime-style durations as used here: 30s, 2m, 500ms, 1h."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    m = re.fullmatch(r"(\d+)(ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"not a duration: {text}")
    return int(m.group(1)) * units[m.group(2)]


def compose(root: Path) -> None:
    deploy = root / "deploy"
    doc = yaml.safe_load((deploy / "docker-compose.yml").read_text())
    services = doc["services"]
    for name in ("rabbitmq", "mariadb", "postgres", "worker", "producer", "prometheus", "grafana"):
        check(name in services, f"compose: no service {name}")
    for name in ("rabbitmq", "mariadb", "postgres"):
        check("test" in services[name].get("healthcheck", {}), f"compose: {name} has no healthcheck")
    txq = {n: s for n, s in services.items() if s.get("image") == "txq:dev"}
    check({"worker", "worker-postgres", "producer"} <= txq.keys(), "compose: txq services must use image txq:dev")
    for name, svc in txq.items():
        build = svc.get("build", {})
        check(build.get("dockerfile") == "deploy/Dockerfile", f"compose: {name} builds another Dockerfile")
        check((deploy / build.get("context", "?") / "Cargo.toml").is_file(), f"compose: {name}'s build context has no Cargo.toml")
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                check((deploy / source).exists(), f"compose: {name} mounts {source}, which does not exist")
    default_grace = seconds("30s")  # txq's shutdown_grace default
    for name in ("worker", "worker-postgres"):
        svc = services[name]
        env = svc.get("environment", {})
        check(env.get("TXQ_METRICS_ADDR") == "0.0.0.0:9464", f"compose: {name} must listen on 0.0.0.0:9464")
        check(seconds(svc.get("stop_grace_period", "10s")) > default_grace, f"compose: {name} stop_grace_period must exceed shutdown_grace (30s)")
        check("/readyz" in json.dumps(svc.get("healthcheck", {})), f"compose: {name}'s healthcheck must ask /readyz")
        for arg in svc.get("command", []):
            if arg.startswith("/etc/txq/bank/"):
                check((root / "examples/bank" / arg.removeprefix("/etc/txq/bank/")).is_file(), f"compose: {name} uses {arg}, not in examples/bank")
    check(services["producer"]["depends_on"]["worker"]["condition"] == "service_healthy", "compose: the producer must wait for a ready worker")
    script = (deploy / "demo/producer.sh").read_text()
    ops = tomllib.loads((root / "examples/bank/ops.toml").read_text())
    for job_type in re.findall(r'type = "(\w+)"', script):
        check(job_type in ops or job_type == "refund", f"producer: job type {job_type} is not in examples/bank/ops.toml")
    check("refund" not in ops, "producer: `refund` is meant to be an unknown type")
    # Prometheus scrapes what compose runs.
    prom = yaml.safe_load((deploy / "prometheus/prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]]
    for target in targets:
        host, _, port = target.partition(":")
        check(host in services, f"prometheus: target {target} is no compose service")
    for name in ("worker", "worker-postgres"):
        check(f"{name}:9464" in targets, f"prometheus: does not scrape {name}:9464")
    rabbit_plugins = (deploy / "rabbitmq/enabled_plugins").read_text()
    check("rabbitmq_prometheus" in rabbit_plugins, "rabbitmq: rabbitmq_prometheus must be enabled for the queue panel")


def grafana(root: Path) -> None:
    deploy = root / "deploy"
    compose_doc = yaml.safe_load((deploy / "docker-compose.yml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose_doc["services"]["grafana"]["volumes"])
    datasources = yaml.safe_load((deploy / "grafana/provisioning/datasources/prometheus.yml").read_text())
    ds = datasources["datasources"]
    check(len(ds) == 1 and ds[0]["type"] == "prometheus" and ds[0].get("isDefault"), "grafana: one default Prometheus datasource expected")
    check(ds[0]["url"] == "http://prometheus:9090", "grafana: the datasource must point at the compose Prometheus")
    providers = yaml.safe_load((deploy / "grafana/provisioning/dashboards/txq.yml").read_text())["providers"]
    path = providers[0]["options"]["path"]
    check(mounts.get("./grafana/dashboards") == path, f"grafana: dashboards are provisioned from {path}, not where compose mounts them")
    dashboard = json.loads((deploy / "grafana/dashboards/txq.json").read_text())
    home = compose_doc["services"]["grafana"]["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH", "")
    check(home == f"{path}/txq.json", "grafana: the home dashboard path does not match the provisioned file")
    ids = [p["id"] for p in dashboard["panels"]]
    check(len(ids) == len(set(ids)), "grafana: panel ids are not unique")
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for panel in dashboard["panels"]:
        uid = panel.get("datasource", {}).get("uid")
        if panel["type"] != "row":
            check(uid == "${datasource}", f"grafana: panel {panel['title']} does not use the datasource variable")
            check(bool(panel.get("targets")), f"grafana: panel {panel['title']} has no query")
        for target in panel.get("targets", []):
            for var in re.findall(r"\$\{?(\w+)", target["expr"]):
                check(var in variables or var.startswith("__"), f"grafana: {panel['title']} uses undefined ${var}")
    # No two panels overlap on the 24-column grid.
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        check(g["x"] + g["w"] <= 24, f"grafana: {panel['title']} is wider than the grid")
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                other = cells.setdefault((x, y), panel["title"])
                check(other == panel["title"], f"grafana: {panel['title']} overlaps {other}")


# --- Kubernetes -----------------------------------------------------------------------


def unknown_fields(model: type, data: object, path: str) -> list[str]:
    """Keys of `data` that the pydantic `model` (generated from KEDA's CRDs) lacks.
    The API server rejects these with kubectl's default --validate=strict; the
    generated models would silently ignore them."""
    from pydantic import BaseModel

    found: list[str] = []
    if not isinstance(data, dict):
        return found
    fields = {(f.alias or name): f for name, f in model.model_fields.items()}
    for key, value in data.items():
        field = fields.get(key)
        if field is None:
            found.append(f"{path}.{key}")
            continue
        for inner in _models_in(field.annotation):
            if isinstance(value, list):
                for i, item in enumerate(value):
                    found += unknown_fields(inner, item, f"{path}.{key}[{i}]")
            else:
                found += unknown_fields(inner, value, f"{path}.{key}")
    return found


def _models_in(annotation: object) -> list[type]:
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type] = []
    for arg in typing.get_args(annotation):
        out += _models_in(arg)
    return out


def k8s(root: Path, rendered: Path, keda_out: Path) -> None:
    deploy = root / "deploy"
    k8s_dir = deploy / "k8s"
    docs = [d for d in yaml.safe_load_all(rendered.read_text()) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    for kind in ("Namespace", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "ScaledObject", "TriggerAuthentication"):
        check(len(by_kind.get(kind, [])) == 1, f"k8s: expected one {kind}")
    check("Secret" not in by_kind, "k8s: the kustomization must not ship a Secret (see secret.example.yaml)")
    secret = yaml.safe_load((k8s_dir / "secret.example.yaml").read_text())
    cm = by_kind["ConfigMap"][0]
    config = tomllib.loads(cm["data"]["txq.toml"])
    dep = by_kind["Deployment"][0]
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    labels = dep["spec"]["template"]["metadata"]["labels"]

    check(config.get("queue_type") == "quorum", "k8s: the fleet must use quorum queues")
    grace = seconds(config.get("shutdown_grace", "30s"))
    check(pod.get("terminationGracePeriodSeconds", 30) > grace, f"k8s: terminationGracePeriodSeconds must exceed shutdown_grace ({grace}s)")
    check("replicas" not in dep["spec"], "k8s: the Deployment must leave replicas to KEDA")
    port = int(config["metrics_addr"].rsplit(":", 1)[1])
    check(config["metrics_addr"].startswith("0.0.0.0:"), "k8s: metrics_addr must listen on all interfaces")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    check(ports.get("metrics") == port, "k8s: the metrics containerPort differs from metrics_addr")
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"), ("startupProbe", "/healthz")):
        get = container.get(probe, {}).get("httpGet", {})
        check(get.get("path") == path and get.get("port") == "metrics", f"k8s: {probe} must GET {path} on the metrics port")
    sc, psc = container.get("securityContext", {}), pod.get("securityContext", {})
    check(psc.get("runAsNonRoot") is True and sc.get("readOnlyRootFilesystem") is True, "k8s: must run as non-root with a read-only root filesystem")
    check(sc.get("allowPrivilegeEscalation") is False and sc.get("capabilities", {}).get("drop") == ["ALL"], "k8s: must drop privileges")
    res = container.get("resources", {})
    check({"cpu", "memory"} <= res.get("requests", {}).keys() and "memory" in res.get("limits", {}), "k8s: requests (cpu, memory) and a memory limit expected")
    dockerfile = (deploy / "Dockerfile").read_text()
    user = re.search(r"^USER (\d+)", dockerfile, re.M)
    check(bool(user) and int(user.group(1)) == psc.get("runAsUser"), "k8s: runAsUser differs from the Dockerfile's USER")
    check(f"EXPOSE {port}" in dockerfile, "Dockerfile: must EXPOSE the metrics port")

    # Files the worker reads exist in the ConfigMap and are the example's own.
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")["mountPath"]
    for arg in container["args"]:
        if arg.startswith(mount + "/"):
            check(arg.removeprefix(mount + "/") in cm["data"], f"k8s: {arg} is not in the ConfigMap")
    env = {e["name"]: e for e in container["env"]}
    check(env.get("TXQ_CONFIG", {}).get("value") == f"{mount}/txq.toml", "k8s: TXQ_CONFIG must name the mounted txq.toml")
    check(cm["metadata"]["name"] == next(v for v in pod["volumes"] if v["name"] == "config")["configMap"]["name"], "k8s: the config volume does not use the generated ConfigMap")
    for copy, original in (("ops.toml", "examples/bank/ops.toml"), ("schema.sql", "examples/bank/schema.mysql.sql")):
        check(filecmp.cmp(k8s_dir / "config" / copy, root / original, shallow=False), f"k8s: config/{copy} differs from {original}")

    # Secret keys: the Deployment, KEDA and the example Secret agree.
    keys = set(secret["stringData"])
    for var in ("TXQ_AMQP_URL", "TXQ_DATABASE_URL"):
        ref = env.get(var, {}).get("valueFrom", {}).get("secretKeyRef", {})
        check(ref.get("name") == secret["metadata"]["name"] and ref.get("key") in keys, f"k8s: {var} does not come from the example Secret")
    ta = by_kind["TriggerAuthentication"][0]
    so = by_kind["ScaledObject"][0]
    (ref,) = ta["spec"]["secretTargetRef"]
    check(ref["parameter"] == "host" and ref["name"] == secret["metadata"]["name"] and ref["key"] == "amqp-url", "keda: TriggerAuthentication must pass the amqp-url secret as host")
    check(secret["metadata"].get("namespace") == dep["metadata"]["namespace"], "k8s: the example Secret is in another namespace")
    check(so["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"], "keda: ScaledObject does not target the Deployment")
    (trigger,) = so["spec"]["triggers"]
    meta = trigger["metadata"]
    check(trigger["type"] == "rabbitmq" and meta.get("mode") == "QueueLength", "keda: a rabbitmq QueueLength trigger expected")
    check(meta.get("queueName") == config.get("queue", "txq.requests"), "keda: queueName differs from txq.toml's queue")
    check(trigger.get("authenticationRef", {}).get("name") == ta["metadata"]["name"], "keda: the trigger does not use the TriggerAuthentication")
    check(so["spec"].get("minReplicaCount", 0) <= so["spec"].get("maxReplicaCount", 100), "keda: minReplicaCount > maxReplicaCount")

    # Selectors pick the worker's pods.
    for kind in ("Service", "PodDisruptionBudget"):
        obj = by_kind[kind][0]
        sel = obj["spec"]["selector"]
        sel = sel.get("matchLabels", sel)
        check(all(labels.get(k) == v for k, v in sel.items()), f"k8s: the {kind}'s selector does not match the pods")
    svc_port = by_kind["Service"][0]["spec"]["ports"][0]
    check(svc_port["targetPort"] in ("metrics", port), "k8s: the Service does not target the metrics port")

    # KEDA objects: strict field names against KEDA's generated models.
    from cloudcoil.models.keda import v1alpha1

    for kind in ("ScaledObject", "TriggerAuthentication"):
        obj = by_kind[kind][0]
        model = getattr(v1alpha1, kind)
        try:
            model.model_validate(obj)
        except Exception as e:  # pydantic's ValidationError, reported as found
            problems.append(f"keda: {kind} does not validate: {e}")
        for field in unknown_fields(model, obj, kind):
            problems.append(f"keda: unknown field {field}")
    keda_out.write_text(json.dumps(by_kind["TriggerAuthentication"] + by_kind["ScaledObject"]))


def compose_env(root: Path, service: str) -> None:
    """Prints the TXQ_* variables of a compose service, one NAME=value a line."""
    doc = yaml.safe_load((root / "deploy/docker-compose.yml").read_text())
    for key, value in doc["services"][service].get("environment", {}).items():
        if key.startswith("TXQ_"):
            print(f"{key}={value}")


def main() -> int:
    what, root, *rest = sys.argv[1:]
    if what == "compose-env":
        compose_env(Path(root), rest[0])
        return 0
    {"compose": compose, "grafana": grafana, "k8s": k8s}[what](Path(root), *map(Path, rest))
    for p in problems:
        print(f"  {p}", file=sys.stderr)
    print(f"{what}: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
