"""RBAC, decided by the API server itself, for every ServiceAccount the overlays create.

`kubectl auth can-i --as=system:serviceaccount:...` asks the API server's authorizer (Node,RBAC)
what each account may do. The trainer's rollout code (trainer/rollout.py) then runs against the
API server with a token of its own ServiceAccount (TokenRequest, as the kubelet would mount it):
it may patch exactly one Deployment and gets 403 for anything else. On the GPU overlay vLLM loads
each policy version, so the trainer has no permission at all.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from k8s_support import NAMESPACE

from cai.errors import NotFound, PermissionDenied, Unauthenticated
from trainer.rollout import ANNOTATIONS, DeploymentRollout

# The Deployment the trainer may roll (its Role's one resourceName), per overlay; none on the GPU
# overlay, where vLLM loads each version.
ROLLOUT_TARGET = {"local": "cai-policy", "gpu": None}
SHA = "0123456789abcdef" * 4


def can_i(plane: Any, account: str, verb: str, resource: str, namespace: str = NAMESPACE) -> bool:
    result = plane.kubectl(
        "auth", "can-i", verb, resource, "-n", namespace,
        f"--as=system:serviceaccount:{NAMESPACE}:{account}", check=False,
    )  # fmt: skip
    answer = result.stdout.strip()
    assert answer in ("yes", "no"), f"kubectl auth can-i: {result.stderr}"
    return answer == "yes"


def matrix(rolls: str | None) -> dict[str, tuple[list[tuple[str, ...]], list[tuple[str, ...]]]]:
    """Per ServiceAccount: (what it may do, what it may not), as can-i arguments."""
    target = rolls or "cai-policy"
    may = [("get", f"deployments.apps/{target}"), ("patch", f"deployments.apps/{target}")]
    nothing_else = [
        ("get", "pods"),
        ("list", "secrets"),
        ("get", "secrets"),
        ("get", "configmaps"),
        ("create", "pods"),
        ("create", "pods/exec"),
        ("list", "deployments.apps"),
        ("get", "statefulsets.apps/cai-trainer"),
        ("create", "serviceaccounts/token"),
        ("create", "rolebindings.rbac.authorization.k8s.io"),
    ]
    return {
        "cai-trainer": (
            may if rolls else [],
            [
                *([] if rolls else may),
                ("patch", "deployments.apps/cai-critique"),
                ("patch", "deployments.apps/cai-judge"),
                ("update", f"deployments.apps/{target}"),
                ("delete", f"deployments.apps/{target}"),
                ("watch", "deployments.apps"),
                ("patch", f"deployments.apps/{target}", "default"),
                ("patch", f"deployments.apps/{target}/scale"),
                ("create", "deployments.apps"),
                *nothing_else,
            ],
        ),
        "default": (
            [],
            [("get", f"deployments.apps/{target}"), ("patch", f"deployments.apps/{target}"), *nothing_else],
        ),
    }


def test_every_service_account_has_exactly_its_permissions(deployed, controlplane):
    target = ROLLOUT_TARGET[deployed.name]
    expected = matrix(target)
    accounts = {
        sa["metadata"]["name"] for sa in controlplane.get("serviceaccounts", "-n", NAMESPACE)["items"]
    }
    assert accounts == set(expected), "a ServiceAccount without an entry in this test's matrix"
    wrong = []
    for account, (may, may_not) in expected.items():
        for args in may:
            if not can_i(controlplane, account, *args):
                wrong.append(f"{account} may not {' '.join(args)}")
        for args in may_not:
            if can_i(controlplane, account, *args):
                wrong.append(f"{account} may {' '.join(args)}")
    assert not wrong


def test_the_trainer_gains_only_one_rule_over_a_plain_account(deployed, controlplane):
    def rules(account: str) -> set[str]:
        out = controlplane.kubectl(
            "auth", "can-i", "--list", "-n", NAMESPACE, f"--as=system:serviceaccount:{NAMESPACE}:{account}"
        ).stdout
        return {" ".join(line.split()) for line in out.splitlines()[1:] if line.strip()}

    extra = rules("cai-trainer") - rules("default")
    target = ROLLOUT_TARGET[deployed.name]
    assert extra == ({f"deployments.apps [] [{target}] [get patch]"} if target else set())


@pytest.fixture
def trainer_configuration(controlplane, tmp_path):
    """A kubernetes client configuration holding a TokenRequest token of cai-trainer."""
    from kubernetes import client

    token = controlplane.kubectl("create", "token", "cai-trainer", "-n", NAMESPACE, "--duration=1h").stdout
    configuration = client.Configuration()
    configuration.host = controlplane.server
    configuration.ssl_ca_cert = str(controlplane.ca_file)
    configuration.api_key = {"authorization": f"Bearer {token.strip()}"}
    return configuration


# Only where the trainer rolls a Deployment: on the GPU overlay it may roll nothing, which
# test_every_service_account_has_exactly_its_permissions checks.
@pytest.mark.parametrize("deployed", ["local"], indirect=True)
def test_the_trainer_rolls_its_deployment_with_its_own_token(deployed, controlplane, trainer_configuration):
    target = ROLLOUT_TARGET[deployed.name]
    before = controlplane.get(f"deployment/{target}", "-n", NAMESPACE)
    old_pods = {p["metadata"]["name"] for p in deployed.pods(**{"app.kubernetes.io/name": target})}

    rollout = DeploymentRollout(f"{NAMESPACE}/{target}", configuration=trainer_configuration, attempts=1)
    rollout.roll("v7", "http://cai-trainer:8081/policies/v7.tar", SHA, 70)

    assert rollout.last is not None
    assert rollout.last.generation == before["metadata"]["generation"] + 1
    controlplane.kubectl("rollout", "status", f"deployment/{target}", "-n", NAMESPACE, "--timeout=120s")
    after = controlplane.get(f"deployment/{target}", "-n", NAMESPACE)
    annotations = after["spec"]["template"]["metadata"]["annotations"]
    assert [annotations[k] for k in ANNOTATIONS] == [
        "v7",
        "http://cai-trainer:8081/policies/v7.tar",
        SHA,
        "70",
    ]
    new_pods = deployed.pods(**{"app.kubernetes.io/name": target})
    assert {p["metadata"]["name"] for p in new_pods}.isdisjoint(old_pods)
    assert all(p["metadata"]["annotations"][ANNOTATIONS[0]] == "v7" for p in new_pods)
    # The same version again changes nothing: no new generation, no new pods.
    rollout.roll("v7", "http://cai-trainer:8081/policies/v7.tar", SHA, 70)
    assert rollout.last.generation == after["metadata"]["generation"]
    # The next version replaces every annotation of the previous one.
    rollout.roll("v8", "http://cai-trainer:8081/policies/v8.tar", "f" * 64, 80)
    assert rollout.last.generation == after["metadata"]["generation"] + 1
    assert [rollout.last.annotations[k] for k in ANNOTATIONS] == [
        "v8",
        "http://cai-trainer:8081/policies/v8.tar",
        "f" * 64,
        "80",
    ]
    controlplane.kubectl("rollout", "status", f"deployment/{target}", "-n", NAMESPACE, "--timeout=120s")


@pytest.mark.parametrize("other", ["cai/cai-critique", "cai/cai-judge", "default/{target}"])
def test_the_trainer_gets_403_for_any_other_deployment(deployed, trainer_configuration, other):
    target = other.format(target=ROLLOUT_TARGET[deployed.name] or "cai-policy")
    rollout = DeploymentRollout(target, configuration=trainer_configuration, attempts=1)
    with pytest.raises(PermissionDenied) as raised:
        rollout.roll("v8", "http://cai-trainer:8081/policies/v8.tar", SHA, 80)
    message = str(raised.value)
    assert "HTTP 403" in message
    assert 'User "system:serviceaccount:cai:cai-trainer" cannot patch resource "deployments"' in message
    assert json.dumps(target.split("/")[0]) in message  # the namespace the API server refused


def test_a_missing_deployment_is_not_found(deployed, controlplane):
    """As the admin (the trainer could not even ask): the API server's 404 becomes NotFound."""
    from kubernetes import client, config

    configuration = client.Configuration()
    config.load_kube_config(str(controlplane.kubeconfig), client_configuration=configuration)
    rollout = DeploymentRollout(f"{NAMESPACE}/no-such-deployment", configuration=configuration, attempts=1)
    with pytest.raises(NotFound, match="HTTP 404"):
        rollout.roll("v9", "http://cai-trainer:8081/policies/v9.tar", SHA, 90)


def test_a_token_the_api_server_did_not_issue_is_unauthenticated(deployed, trainer_configuration):
    trainer_configuration.api_key = {"authorization": "Bearer not-a-token"}
    rollout = DeploymentRollout(f"{NAMESPACE}/cai-policy", configuration=trainer_configuration, attempts=1)
    with pytest.raises(Unauthenticated, match="HTTP 401"):
        rollout.roll("v9", "http://cai-trainer:8081/policies/v9.tar", SHA, 90)
