"""The control plane's build recipe (deploy/controlplane) pins one version of each component."""

from __future__ import annotations

import re
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[2] / "deploy" / "controlplane"


def script_version(script: str, name: str) -> str:
    match = re.search(rf"^{name}=(\S+)$", (RECIPE / script).read_text(), re.MULTILINE)
    assert match, f"{script} sets no {name}"
    return match.group(1)


def go_mod() -> str:
    return (RECIPE / "go.mod").read_text()


def test_build_script_and_go_mod_name_the_same_versions():
    kubernetes = script_version("build.sh", "KUBERNETES_VERSION")
    etcd = script_version("build.sh", "ETCD_VERSION")
    assert re.search(rf"^\s+k8s\.io/kubernetes {re.escape(kubernetes)}$", go_mod(), re.MULTILINE)
    assert re.search(rf"^\s+go\.etcd\.io/etcd/server/v3 {re.escape(etcd)}$", go_mod(), re.MULTILINE)


def test_every_staging_module_is_replaced_by_its_published_version():
    kubernetes = script_version("build.sh", "KUBERNETES_VERSION")
    staging = "v0." + kubernetes.removeprefix("v1.")  # v1.33.13 -> v0.33.13
    replaces = dict(re.findall(r"^\s+(k8s\.io/\S+) => (\S+(?: \S+)?)$", go_mod(), re.MULTILINE))
    assert len(replaces) >= 30
    for module, target in replaces.items():
        if module.startswith("k8s.io/sample-"):
            assert target == f"./stub/{module.removeprefix('k8s.io/')}"
            assert (RECIPE / target / "go.mod").is_file()
        else:
            assert target == f"{module} {staging}", module


def test_go_sum_holds_the_pinned_modules():
    go_sum = (RECIPE / "go.sum").read_text()
    kubernetes = script_version("build.sh", "KUBERNETES_VERSION")
    assert f"k8s.io/kubernetes {kubernetes} h1:" in go_sum
    assert f"go.etcd.io/etcd/server/v3 {script_version('build.sh', 'ETCD_VERSION')} h1:" in go_sum
