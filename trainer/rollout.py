"""Roll the policy Deployment when the trainer publishes a new policy version (TGI backend).

text-generation-inference loads its adapter at start-up and cannot swap it from outside, so a new
policy version reaches a TGI-served policy by a rolling update of its Deployment. The trainer
patches four annotations on the pod template (a strategic-merge PATCH through the Kubernetes API):

    cai.dev/policy-version   the version id published on the policy-versions topic
    cai.dev/policy-uri       where the weights are (the pods load them from here)
    cai.dev/policy-sha256    checksum of the weights, for the pods to verify
    cai.dev/policy-step      the optimizer step the weights come from

A change to the pod template makes the Deployment controller start a new ReplicaSet, so the pods
are replaced under the Deployment's own strategy (maxSurge, maxUnavailable) and its
PodDisruptionBudget; patching the same version twice changes nothing and starts no rollout.

Credentials: in a pod, the service account's token (in-cluster config); elsewhere the kubeconfig
(``KUBECONFIG`` or ``~/.kube/config``). The trainer's service account needs only this, in the
policy Deployment's namespace (least privilege: one verb set, one resource, one name)::

    apiVersion: rbac.authorization.k8s.io/v1
    kind: Role
    metadata: {name: cai-trainer-rollout, namespace: <namespace>}
    rules:
      - apiGroups: ["apps"]
        resources: ["deployments"]
        resourceNames: ["<policy deployment name>"]
        verbs: ["get", "patch"]

bound to the trainer's ServiceAccount by a RoleBinding in the same namespace (``patch`` is what
`DeploymentRollout.roll` uses; ``get`` lets an operator or a later check read the rollout back).
If the trainer runs in another namespace, the RoleBinding still lives in the policy's namespace
and names the trainer's ServiceAccount with its namespace as the subject.

The ``kubernetes`` client is imported inside the functions, so ``import trainer`` stays light.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cai.errors import CAIError, InvalidArgument, NotFound, PermissionDenied, Unauthenticated, Unavailable

if TYPE_CHECKING:
    from kubernetes.client import Configuration

    from cai.records import PolicyVersion

log = logging.getLogger("cai.trainer")

SETTING = "rollout_deployment"
ANNOTATION_PREFIX = "cai.dev/policy-"
ANNOTATIONS = tuple(f"{ANNOTATION_PREFIX}{key}" for key in ("version", "uri", "sha256", "step"))
PATCH_CONTENT_TYPE = "application/strategic-merge-patch+json"

# A namespace is a DNS-1123 label; a Deployment name is a DNS-1123 subdomain.
_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_NAMESPACE = re.compile(_LABEL)
_NAME = re.compile(rf"{_LABEL}(\.{_LABEL})*")
_SHA256 = re.compile(r"[0-9a-f]{64}")

# 429 (throttled by API priority and fairness) and 5xx are worth another try; other 4xx are not.
# Status 0 is what the client reports for a TLS failure, which a retry rarely fixes but a
# restarting API server behind a load balancer can produce, so it is retried too.
_RETRY_STATUS = frozenset({0, 429})


@dataclass(frozen=True)
class RolloutResult:
    """What the API server answered to one roll."""

    deployment: str  # "NAMESPACE/NAME"
    generation: int | None  # metadata.generation after the patch (the controller's target)
    annotations: dict[str, str]  # the pod template's annotations after the patch (all of them)


def parse_target(target: str) -> tuple[str, str]:
    """Split "NAMESPACE/NAME" into its parts, checking both are valid Kubernetes names."""
    namespace, sep, name = (target or "").strip().partition("/")
    if (
        not sep
        or len(namespace) > 63
        or len(name) > 253
        or not _NAMESPACE.fullmatch(namespace)
        or not _NAME.fullmatch(name)
    ):
        raise InvalidArgument(
            f"{SETTING} must be 'NAMESPACE/NAME' of the policy Deployment, both lowercase "
            f"Kubernetes names (for example 'cai/policy'); got {target!r}"
        )
    return namespace, name


def policy_annotations(version: str, uri: str, sha256: str, step: int) -> dict[str, str]:
    """The pod-template annotations that identify one policy version."""
    if not version or not uri:
        raise InvalidArgument("a policy version to roll out needs a non-empty version and uri")
    if not _SHA256.fullmatch(sha256):
        raise InvalidArgument(f"policy sha256 must be 64 lowercase hex digits, got {sha256!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InvalidArgument(f"policy step must be a non-negative integer, got {step!r}")
    return dict(zip(ANNOTATIONS, (version, uri, sha256, str(step)), strict=True))


def load_configuration() -> Configuration:
    """The in-cluster configuration (service account), else the kubeconfig's current context."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
        return configuration
    except config.ConfigException as in_cluster:
        reason = str(in_cluster)
    try:
        config.load_kube_config(client_configuration=configuration)
    except (config.ConfigException, OSError, ValueError) as kubeconfig:
        raise Unavailable(
            f"no Kubernetes credentials for {SETTING}: not in a cluster ({reason}) and no usable "
            f"kubeconfig ({kubeconfig}); run the trainer in a pod with a service account, or set "
            "KUBECONFIG"
        ) from None
    return configuration


class DeploymentRollout:
    """Rolls one Deployment by patching its pod template's policy annotations.

    `target` is "NAMESPACE/NAME". Without `configuration`, credentials are loaded once, here (in a
    pod: the service account; elsewhere: the kubeconfig), so a trainer without access fails at
    start-up rather than at its first published version.
    """

    def __init__(
        self,
        target: str,
        *,
        configuration: Configuration | None = None,
        attempts: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        timeout_s: float = 30.0,
    ) -> None:
        self.namespace, self.name = parse_target(target)
        self.target = f"{self.namespace}/{self.name}"
        if attempts < 1:
            raise InvalidArgument(f"rollout attempts must be at least 1, got {attempts}")
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.timeout_s = timeout_s
        self.configuration = configuration if configuration is not None else load_configuration()
        self.last: RolloutResult | None = None  # what the API server answered to the latest roll

    def publish(self, version: PolicyVersion) -> None:
        """As the trainer's publisher (trainer/io.py): roll the Deployment to `version`."""
        self.roll(version.version, version.uri, version.sha256, version.step)

    def close(self) -> None:
        """Nothing to release: every roll is a request of its own."""

    def roll(self, version: str, uri: str, sha256: str, step: int) -> None:
        """Patch the annotations of `version`; Kubernetes then replaces the pods one by one.

        Returns once the API server has accepted the patch (the pods are replaced after that, at
        the Deployment's own pace); `last` then holds the Deployment's answer.

        Retries 429, 5xx and connection failures with exponential backoff; raises at once on
        other client errors (401 Unauthenticated, 403 PermissionDenied, 404 NotFound, other 4xx
        InvalidArgument) and with Unavailable once the attempts are spent.
        """
        annotations = policy_annotations(version, uri, sha256, step)
        body = {"spec": {"template": {"metadata": {"annotations": annotations}}}}
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            try:
                deployment = self._patch(body)
            except _Transient as e:
                if attempt == self.attempts:
                    raise Unavailable(
                        f"cannot roll deployment {self.target} to policy version {version!r}: "
                        f"{e} (gave up after {attempt} attempts)"
                    ) from e.__cause__
                log.warning(
                    "rolling deployment %s: %s; retrying in %.1fs (attempt %d of %d)",
                    self.target,
                    e,
                    delay,
                    attempt,
                    self.attempts,
                )
                time.sleep(delay)
                delay = min(delay * 2, self.max_backoff_s)
                continue
            result = RolloutResult(
                deployment=self.target,
                generation=deployment.metadata.generation if deployment.metadata else None,
                annotations=_template_annotations(deployment),
            )
            missing = {k: v for k, v in annotations.items() if result.annotations.get(k) != v}
            if missing:  # a mutating webhook or an odd proxy dropped them: the pods would not change
                raise Unavailable(
                    f"deployment {self.target} was patched but its pod template lacks {sorted(missing)}"
                )
            log.info(
                "rolling deployment %s to policy version %s (step %d, generation %s)",
                self.target,
                version,
                step,
                result.generation,
            )
            self.last = result
            return
        raise AssertionError("unreachable")  # the loop returns or raises

    def _patch(self, body: dict[str, Any]) -> Any:
        """One PATCH; errors become CAIError (final) or _Transient (worth another try)."""
        import urllib3
        from kubernetes import client

        api_client = client.ApiClient(self.configuration)
        try:
            return client.AppsV1Api(api_client).patch_namespaced_deployment(
                self.name,
                self.namespace,
                body,
                _content_type=PATCH_CONTENT_TYPE,
                _request_timeout=(min(self.timeout_s, 10.0), self.timeout_s),
            )
        except client.ApiException as e:
            raise self._api_error(e) from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise _Transient(f"cannot reach the Kubernetes API at {self.configuration.host}: {e}") from e
        finally:
            api_client.close()

    def _api_error(self, e: Any) -> Exception:
        status = int(e.status or 0)
        what = f"HTTP {status} {e.reason or ''}".rstrip()
        detail = _status_message(e.body)
        said = f"{what}: {detail}" if detail else what
        if status in _RETRY_STATUS or status >= 500:
            return _Transient(said)
        where = f"cannot roll deployment {self.target}"
        if status == 401:
            return Unauthenticated(f"{where}: {said} (the service account token or kubeconfig is invalid)")
        if status == 403:
            return PermissionDenied(
                f"{where}: {said} (grant 'patch' on deployments in group apps, resourceNames "
                f"[{self.name}], namespace {self.namespace}, to the trainer's service account)"
            )
        if status == 404:
            return NotFound(f"{where}: {said} (check {SETTING})")
        return InvalidArgument(f"{where}: {said}")


class _Transient(CAIError):
    """A failure another attempt may not meet (never escapes `roll`)."""


def _status_message(body: Any) -> str:
    """The `message` of a Kubernetes Status body, else a short piece of the body."""
    if not body:
        return ""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
    try:
        message = json.loads(text).get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message) if message else text.strip()[:200]


def _template_annotations(deployment: Any) -> dict[str, str]:
    try:
        return dict(deployment.spec.template.metadata.annotations or {})
    except AttributeError:
        return {}
