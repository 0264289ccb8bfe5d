#!/usr/bin/env bash
# Fetches the CustomResourceDefinitions that the overlays' components need, as their projects
# publish them, from the Go module proxy (checked against the checksum database), into a cache
# folder keyed by their versions. A folder that is already complete is left as it is.
# Prints the folder.
#   KEDA                 github.com/kedacore/keda/v2, config/crd/bases
#   Prometheus Operator  github.com/prometheus-operator/prometheus-operator, example/prometheus-operator-crd
#   Kubeflow Trainer     github.com/kubeflow/trainer/v2, manifests/base/crds (TrainJob, training runtimes)
#   Strimzi              io.strimzi:api and io.strimzi:crd-generator from Maven Central (strimzi/pom.xml);
#                        Strimzi's generator writes the CRDs from its API model, as Strimzi's build
#                        does. Needs mvn and a Java 21 or newer (JAVA_HOME, java on PATH, or the
#                        Temurin JDK in /usr/lib/jvm).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

KEDA_VERSION=v2.18.3
PROMETHEUS_OPERATOR_VERSION=v0.85.0
KUBEFLOW_TRAINER_VERSION=v2.1.0
STRIMZI_VERSION="$(sed -n 's:.*<strimzi.version>\(.*\)</strimzi.version>.*:\1:p' "$here/strimzi/pom.xml")"

recipe_hash="$(cat "$here/crds.sh" "$here/strimzi/pom.xml" | sha256sum | cut -c1-12)"
cache="${CAI_CONTROLPLANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cai/controlplane}"
dest="$cache/crds-keda-${KEDA_VERSION}-prometheus-operator-${PROMETHEUS_OPERATOR_VERSION}-kubeflow-trainer-${KUBEFLOW_TRAINER_VERSION}-strimzi-${STRIMZI_VERSION}-${recipe_hash}"

if [[ -f "$dest/.complete" ]]; then
  echo "$dest"
  exit 0
fi
command -v go >/dev/null || { echo "crds.sh: go is not on PATH (the CRDs come from the Go module proxy)" >&2; exit 1; }
mkdir -p "$cache"
work="$(mktemp -d "$cache/.crds-XXXXXX")"
trap 'rm -rf "$work"' EXIT

module_dir() {  # module_dir <module@version>: download it and print where it is
  local dir
  dir="$(cd "$work" && GOFLAGS=-mod=mod go mod download -json "$1" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')"
  [[ -d "$dir" ]] || { echo "crds.sh: go mod download $1 gave no folder" >&2; exit 1; }
  echo "$dir"
}

keda="$(module_dir "github.com/kedacore/keda/v2@$KEDA_VERSION")"
cp "$keda"/config/crd/bases/keda.sh_*.yaml "$work/"
prom="$(module_dir "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION")"
cp "$prom"/example/prometheus-operator-crd/monitoring.coreos.com_*.yaml "$work/"
trainer="$(module_dir "github.com/kubeflow/trainer/v2@$KUBEFLOW_TRAINER_VERSION")"
cp "$trainer"/manifests/base/crds/trainer.kubeflow.org_*.yaml "$work/"

java_21() {  # a java binary of version 21 or newer, or nothing
  local candidate major
  for candidate in "${JAVA_HOME:+$JAVA_HOME/bin/java}" "$(command -v java || true)" /usr/lib/jvm/temurin-*/bin/java; do
    [[ -n "$candidate" && -x "$candidate" ]] || continue
    major="$("$candidate" -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')"
    if [[ "${major%%.*}" -ge 21 ]]; then echo "$candidate"; return; fi
  done
}
java="$(java_21)"
[[ -n "$java" ]] || { echo "crds.sh: Strimzi's CRD generator needs Java 21 or newer; none found (set JAVA_HOME)" >&2; exit 1; }
command -v mvn >/dev/null || { echo "crds.sh: mvn is not on PATH (Strimzi's API model comes from Maven Central)" >&2; exit 1; }
mvn -q -f "$here/strimzi/pom.xml" dependency:build-classpath -Dmdep.outputFile="$work/strimzi.classpath" >&2
model=io.strimzi.api.kafka.model
"$java" -cp "$(cat "$work/strimzi.classpath")" io.strimzi.crdgenerator.CrdGenerator \
  --label app:strimzi --label strimzi.io/crd-install:true \
  --crd-api-version v1 --api-versions v1 --storage-version v1 --yaml \
  "$model.kafka.Kafka=$work/kafka.strimzi.io_kafkas.yaml" \
  "$model.nodepool.KafkaNodePool=$work/kafka.strimzi.io_kafkanodepools.yaml" \
  "$model.topic.KafkaTopic=$work/kafka.strimzi.io_kafkatopics.yaml" >&2
rm "$work/strimzi.classpath"
chmod 644 "$work"/*.yaml

printf 'keda %s\nprometheus-operator %s\nkubeflow-trainer %s\nstrimzi %s\n' "$KEDA_VERSION" \
  "$PROMETHEUS_OPERATOR_VERSION" "$KUBEFLOW_TRAINER_VERSION" "$STRIMZI_VERSION" > "$work/VERSIONS"
touch "$work/.complete"
rm -rf "$dest"
mv "$work" "$dest"
trap - EXIT
echo "$dest"
