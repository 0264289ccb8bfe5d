"""A real Kubernetes control plane for the manifests in deploy/k8s.

`controlplane` (session): etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok
from deploy/controlplane (built once into a cache folder by build.sh; `make controlplane` does it
ahead of the tests), with three CPU nodes and two GPU nodes simulated by kwok, and the CRDs of
KEDA, Strimzi, the Prometheus Operator and Kubeflow Trainer as those projects publish them
(crds.sh).

`deployed` (per test module, once per overlay): applies one overlay server-side into the
namespace `cai`, waits until every Deployment, StatefulSet and Job has finished rolling out, and
deletes the namespace afterwards, so that the next one starts from an empty namespace.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from k8s_support import ON_GPU, Deployed, controlplane_module, deploy


@pytest.fixture(scope="session")
def controlplane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    bin_dir = controlplane_module.build()
    crd_dir = controlplane_module.fetch_crds()
    plane = controlplane_module.ControlPlane(bin_dir, tmp_path_factory.mktemp("controlplane"))
    plane.start()
    try:
        plane.install_crds(crd_dir)
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="module", params=sorted(ON_GPU))
def deployed(request: pytest.FixtureRequest, controlplane: Any) -> Iterator[Deployed]:
    yield from deploy(controlplane, request.param)
