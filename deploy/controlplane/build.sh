#!/usr/bin/env bash
# Builds the Kubernetes control plane that tests/k8s runs: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kubectl and kwok, all from the Go module proxy at the
# versions pinned in go.mod/go.sum (kwok by its own module's go.sum), into a cache folder keyed by
# those versions and the recipe's hash. A folder that is already complete is left as it is.
# Prints the folder. Takes 5-25 minutes on two cores the first time. The Go build and module caches
# (about 5 GB) are private to the build and removed after it: only the binaries (about 440 MB) stay.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"

KUBERNETES_VERSION=v1.33.13
ETCD_VERSION=v3.5.21
KWOK_VERSION=v0.7.0

recipe_hash="$(cat go.mod go.sum build.sh etcd/main.go | sha256sum | cut -c1-12)"
key="kubernetes-${KUBERNETES_VERSION}-etcd-${ETCD_VERSION}-kwok-${KWOK_VERSION}-${recipe_hash}"
cache="${CAI_CONTROLPLANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cai/controlplane}"
dest="$cache/$key"

if [[ -f "$dest/.complete" ]]; then
  echo "$dest"
  exit 0
fi

command -v go >/dev/null || { echo "build.sh: go is not on PATH (the control plane is built with Go)" >&2; exit 1; }
mkdir -p "$cache"
work="$(mktemp -d "$cache/.build-XXXXXX")"
gocaches="$(mktemp -d "$cache/.go-XXXXXX")"
trap 'rm -rf "$work" "$gocaches"' EXIT

# -modcacherw: the module cache is written read-only by default, which `rm -rf` cannot remove.
export CGO_ENABLED=0 GOFLAGS="-mod=readonly -trimpath -buildvcs=false -modcacherw"
export GOCACHE="$gocaches/build" GOMODCACHE="$gocaches/mod"
minor="${KUBERNETES_VERSION#v1.}"
minor="${minor%%.*}"
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean"
done

build() {  # build <output name> <package>
  echo "build.sh: building $1 ($2)" >&2
  local start=$SECONDS
  nice -n 10 go build -ldflags "$ldflags" -o "$work/$1" "$2"
  echo "build.sh: $1 built in $((SECONDS - start)) s" >&2
}

build kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver
build kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager
build kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler
build kubectl k8s.io/kubernetes/cmd/kubectl
build etcd ./etcd
echo "build.sh: building kwok (sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION)" >&2
(cd "$work" && GOFLAGS="-trimpath -buildvcs=false -modcacherw" GOBIN="$work" nice -n 10 go install "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION")

printf 'kubernetes %s\netcd %s\nkwok %s\nrecipe %s\n' \
  "$KUBERNETES_VERSION" "$ETCD_VERSION" "$KWOK_VERSION" "$recipe_hash" > "$work/VERSIONS"
touch "$work/.complete"
rm -rf "$dest"
mv "$work" "$dest"
rm -rf "$gocaches"
trap - EXIT
echo "$dest"
