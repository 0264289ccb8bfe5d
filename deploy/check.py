"""Render, validate and scan the Kubernetes manifests; lint the Dockerfile (`make deploy-check`).

    python deploy/check.py --kustomize .tools/kustomize --tools .tools/deploy-venv/bin

Every overlay in deploy/k8s/overlays is rendered with kustomize into --out, then:
  1. built-in kinds: `kubernetes-validate --strict` against each of KUBERNETES_VERSIONS; a warning
     (e.g. "no schema found") counts as a failure;
  2. custom resources: JSON Schema validation against deploy/k8s/schemas/ (trimmed from the
     operators' CRDs); a custom kind without a schema there is a failure;
  3. `checkov` on the rendered files: no failed check (skips are annotations with a reason);
  4. `hadolint` on the Dockerfile;
  5. the invariants below (`check_invariants`), which tests/deploy also runs on broken manifests.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = K8S / "overlays"
SCHEMAS = K8S / "schemas"
# The oldest Kubernetes minor the manifests support (docs/deploy.md) and the newest that
# kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.31.0", "1.37.0")
# Workloads that must get a GPU in each overlay; any other that asks for one must ask right.
GPU_WORKLOADS = {"gpu": {"Deployment/cai-policy", "StatefulSet/cai-trainer"}, "local": set()}
# vLLM serving policy versions (components/vllm-backend) and the trainer settings it must fit:
# the trainer's defaults (trainer/config.py) where its args do not set them.
VLLM_IMAGE = "vllm/vllm-openai:"
TRAINER_DEFAULTS = {"--max-staleness": "2", "--lora-r": "16"}
VLLM_DEFAULTS = {"--max-loras": "1", "--max-lora-rank": "16"}  # vLLM's own defaults
POLICY_LOADED_VERSIONS_DEFAULT = "3"  # services/settings.py

POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
LONG_RUNNING_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"}
BUILTIN_GROUPS = {"", "apps", "batch", "policy", "autoscaling"}
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PriorityClass",
}
GPU = "nvidia.com/gpu"
SKIP_ANNOTATION = re.compile(r"checkov\.io/skip\d+")
SKIP_VALUE = re.compile(r"CKV2?_[A-Z0-9]+_\d+=\S.{10,}")
ENV_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")

Doc = dict[str, Any]


def load_docs(text: str) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def name_of(doc: Doc) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def is_builtin(doc: Doc) -> bool:
    group = doc["apiVersion"].rpartition("/")[0]
    return group in BUILTIN_GROUPS or group.endswith(".k8s.io")


def schema_file(doc: Doc) -> Path:
    group, _, version = doc["apiVersion"].rpartition("/")
    return SCHEMAS / f"{group}_{version}_{doc['kind'].lower()}.json"


# ---- invariants --------------------------------------------------------------------------------


def _pod_spec(doc: Doc) -> Doc | None:
    if doc.get("kind") not in POD_TEMPLATE_KINDS:
        return None
    spec: Doc | None = doc.get("spec", {}).get("template", {}).get("spec")
    return spec


def _containers(pod: Doc) -> Iterator[tuple[str, Doc]]:
    for key in ("initContainers", "containers"):
        for container in pod.get(key) or []:
            yield key, container


def _selects(selector: Doc | None, labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against a label set; empty selects none."""
    if not selector:
        return False
    if not all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return bool(selector.get("matchLabels") or selector.get("matchExpressions"))


def _check_container(where: str, kind: str, key: str, c: Doc, pod: Doc) -> Iterator[str]:
    resources = c.get("resources") or {}
    for part in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            if resource not in (resources.get(part) or {}):
                yield f"{where}: no {part}.{resource}"
    sc = c.get("securityContext")
    if not sc:
        yield f"{where}: no securityContext"
    else:
        if sc.get("allowPrivilegeEscalation") is not False:
            yield f"{where}: allowPrivilegeEscalation is not false"
        if sc.get("readOnlyRootFilesystem") is not True:
            yield f"{where}: readOnlyRootFilesystem is not true"
        if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
            yield f"{where}: capabilities do not drop ALL"
        if sc.get("privileged"):
            yield f"{where}: privileged"
    pod_sc = pod.get("securityContext") or {}
    sc = sc or {}
    if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
        yield f"{where}: runAsNonRoot is not set"
    seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        yield f"{where}: no seccompProfile RuntimeDefault"
    if kind in LONG_RUNNING_KINDS and key == "containers":
        for probe in ("livenessProbe", "readinessProbe"):
            if not c.get(probe):
                yield f"{where}: no {probe}"
    requests = (resources.get("requests") or {}).get(GPU)
    limits = (resources.get("limits") or {}).get(GPU)
    if (requests is not None or limits is not None) and str(requests) != str(limits):
        yield f"{where}: {GPU} requests ({requests}) differ from limits ({limits})"


def _wants_gpu_nodes(pod: Doc) -> bool:
    selector = pod.get("nodeSelector") or {}
    tolerations = pod.get("tolerations") or []
    return any(k.startswith(GPU) for k in selector) or any(
        t.get("key", "").startswith(GPU) for t in tolerations
    )


def _requests_gpu(pod: Doc) -> bool:
    return any(GPU in ((c.get("resources") or {}).get("limits") or {}) for _, c in _containers(pod))


def _env_names(c: Doc, configmaps: dict[str, set[str]]) -> set[str] | None:
    """Variables a container gets; None when one comes from a ConfigMap not in the manifests."""
    names = {e["name"] for e in c.get("env") or []}
    for source in c.get("envFrom") or []:
        ref = (source.get("configMapRef") or {}).get("name")
        if ref is None or ref not in configmaps:
            return None
        names |= {source.get("prefix", "") + key for key in configmaps[ref]}
    return names


def check_invariants(docs: list[Doc], gpu_workloads: set[str] | None = None) -> list[str]:
    """What the schemas and checkov do not check; one line per problem, empty when all hold."""
    problems: list[str] = []
    workloads = [d for d in docs if _pod_spec(d) is not None]
    configmaps = {
        d["metadata"]["name"]: set((d.get("data") or {}) | (d.get("binaryData") or {}))
        for d in docs
        if d.get("kind") == "ConfigMap"
    }
    for doc in docs:
        if doc.get("kind") not in CLUSTER_SCOPED and not doc.get("metadata", {}).get("namespace"):
            problems.append(f"{name_of(doc)}: no namespace (it would land in the default one)")
        for key, value in (doc.get("metadata", {}).get("annotations") or {}).items():
            if SKIP_ANNOTATION.fullmatch(key) and not SKIP_VALUE.fullmatch(str(value)):
                problems.append(f"{name_of(doc)}: {key} must be CHECK_ID=reason, got {value!r}")
    for doc in workloads:
        kind, name = doc["kind"], name_of(doc)
        pod = _pod_spec(doc) or {}
        if kind != "Job":
            labels = doc["spec"]["template"].get("metadata", {}).get("labels") or {}
            if not _selects(doc["spec"].get("selector"), labels):
                problems.append(f"{name}: spec.selector does not match the pod template's labels")
        for key, c in _containers(pod):
            where = f"{name} {key[:-1]} {c.get('name')}"
            problems.extend(_check_container(where, kind, key, c, pod))
            env = _env_names(c, configmaps)
            words = [*(c.get("command") or []), *(c.get("args") or [])]
            for ref in sorted({m for w in words for m in ENV_REFERENCE.findall(str(w))}):
                if env is not None and ref not in env:
                    problems.append(f"{where}: $({ref}) is not one of its environment variables")
        gpu = _requests_gpu(pod)
        if _wants_gpu_nodes(pod) and not gpu:
            problems.append(f"{name}: runs on GPU nodes but requests no {GPU}")
        if gpu_workloads is not None and name in gpu_workloads and not gpu:
            problems.append(f"{name}: is a GPU workload but requests no {GPU}")
    for name in sorted((gpu_workloads or set()) - {name_of(d) for d in workloads}):
        problems.append(f"{name}: GPU workload missing from the manifests")
    for svc in (d for d in docs if d.get("kind") == "Service"):
        selector = svc.get("spec", {}).get("selector")
        if not selector:
            continue  # an external or manually managed Service
        pods = [
            (name_of(w), _pod_spec(w) or {})
            for w in workloads
            if w.get("metadata", {}).get("namespace") == svc.get("metadata", {}).get("namespace")
            and all(
                (w["spec"]["template"].get("metadata", {}).get("labels") or {}).get(k) == v
                for k, v in selector.items()
            )
        ]
        if not pods:
            problems.append(f"{name_of(svc)}: its selector matches no pod template")
        for port in svc["spec"].get("ports") or []:
            target = port.get("targetPort", port.get("port"))
            for workload, pod in pods:
                ports = [p for _, c in _containers(pod) for p in c.get("ports") or []]
                if not any(target in (p.get("name"), p.get("containerPort")) for p in ports):
                    problems.append(f"{name_of(svc)}: port {target} does not exist on {workload}'s pods")
    problems.extend(check_vllm(docs))
    for pdb in (d for d in docs if d.get("kind") == "PodDisruptionBudget"):
        selector = pdb.get("spec", {}).get("selector")
        if not any(
            _selects(selector, w["spec"]["template"].get("metadata", {}).get("labels") or {})
            for w in workloads
        ):
            problems.append(f"{name_of(pdb)}: its selector matches no pod template")
    return problems


def _flag(words: list[str], name: str, default: str | None = None) -> str | None:
    """The value of `--name=value` or `--name value` in a command line."""
    for i, word in enumerate(words):
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
        if word == name and i + 1 < len(words):
            return words[i + 1]
    return default


def _mounts(c: Doc) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in c.get("volumeMounts") or []}


def check_vllm(docs: list[Doc]) -> list[str]:
    """vLLM taking live policy versions: what the trainer publishes must fit what vLLM can load,
    and the policy service must hand vLLM the adapters through a volume both see at one path."""
    problems: list[str] = []
    settings: dict[str, str] = next(
        (
            d.get("data") or {}
            for d in docs
            if d.get("kind") == "ConfigMap" and d["metadata"]["name"].startswith("cai-settings")
        ),
        {},
    )
    trainer = next((d for d in docs if name_of(d) == "StatefulSet/cai-trainer"), None)
    trainer_args: list[str] = []
    if trainer is not None:
        for _, c in _containers(_pod_spec(trainer) or {}):
            trainer_args = [str(w) for w in [*(c.get("command") or []), *(c.get("args") or [])]]
    publishes = _flag(trainer_args, "--mode") == "online-dpo"
    window = int(_flag(trainer_args, "--max-staleness", TRAINER_DEFAULTS["--max-staleness"]) or 0) + 1
    rank = int(_flag(trainer_args, "--lora-r", TRAINER_DEFAULTS["--lora-r"]) or 0)
    for doc in docs:
        pod = _pod_spec(doc) or {}
        containers = dict((c.get("name"), c) for _, c in _containers(pod))
        for c in containers.values():
            if not str(c.get("image", "")).startswith(VLLM_IMAGE):
                continue
            where = f"{name_of(doc)} container {c.get('name')}"
            words = [str(w) for w in [*(c.get("command") or []), *(c.get("args") or [])]]
            served = _flag(words, "--served-model-name")
            for service in ("CRITIQUE", "JUDGE"):
                if settings.get(f"CAI_{service}_BACKEND", "").startswith("openai:") and (
                    settings.get(f"CAI_{service}_SERVED_MODEL") != served
                ):
                    problems.append(
                        f"{where}: CAI_{service}_SERVED_MODEL must name the base model "
                        f"({served!r}), or {service.lower()} may be served by a policy adapter"
                    )
            if not publishes or "policy" not in containers:
                continue
            env = {e["name"]: str(e.get("value", "")) for e in c.get("env") or []}
            if "--enable-lora" not in words:
                problems.append(f"{where}: the trainer publishes LoRA adapters but vLLM lacks --enable-lora")
            if env.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() not in ("true", "1"):
                problems.append(
                    f"{where}: the trainer publishes policy versions but "
                    "VLLM_ALLOW_RUNTIME_LORA_UPDATING is not true (vLLM cannot load them)"
                )
            max_loras = int(_flag(words, "--max-loras", VLLM_DEFAULTS["--max-loras"]) or 0)
            if max_loras < window:
                problems.append(
                    f"{where}: --max-loras {max_loras} < the trainer's max_staleness + 1 ({window}): "
                    "rollouts on the older versions it still accepts would wait for a slot"
                )
            max_rank = int(_flag(words, "--max-lora-rank", VLLM_DEFAULTS["--max-lora-rank"]) or 0)
            if max_rank < rank:
                problems.append(f"{where}: --max-lora-rank {max_rank} < the trainer's lora_r ({rank})")
            loaded = int(settings.get("CAI_POLICY_LOADED_VERSIONS", POLICY_LOADED_VERSIONS_DEFAULT))
            if not window <= loaded <= max_loras:
                problems.append(
                    f"{where}: CAI_POLICY_LOADED_VERSIONS {loaded} must be between the trainer's "
                    f"max_staleness + 1 ({window}) and --max-loras ({max_loras})"
                )
            port = _flag(words, "--port", "8000")
            if settings.get("CAI_POLICY_BACKEND") != f"openai:http://127.0.0.1:{port}":
                problems.append(
                    f"{where}: CAI_POLICY_BACKEND must be openai:http://127.0.0.1:{port}, this pod's vLLM"
                )
            folder = settings.get("CAI_POLICY_ADAPTER_DIR", "")
            policy_volume = _mounts(containers["policy"]).get(folder)
            if not folder or policy_volume is None or _mounts(c).get(folder) != policy_volume:
                problems.append(
                    f"{where}: CAI_POLICY_ADAPTER_DIR ({folder or 'unset'}) must be one volume "
                    "mounted at that path in both the policy and the vllm container"
                )
    if publishes and any(
        str(c.get("image", "")).startswith(VLLM_IMAGE)
        for d in docs
        for _, c in _containers(_pod_spec(d) or {})
    ):
        for binding in (d for d in docs if d.get("kind") in ("RoleBinding", "ClusterRoleBinding")):
            if any(s.get("name") == "cai-trainer" for s in binding.get("subjects") or []):
                problems.append(
                    f"{name_of(binding)}: with vLLM loading policy versions the trainer needs no "
                    "Kubernetes API access"
                )
    return problems


# ---- the tools ---------------------------------------------------------------------------------


def render(kustomize: str, overlay: Path) -> str:
    return subprocess.run(
        [kustomize, "build", str(overlay)], check=True, capture_output=True, text=True
    ).stdout


def validate_custom(docs: list[Doc]) -> list[str]:
    import jsonschema

    problems = []
    for doc in docs:
        path = schema_file(doc)
        if not path.is_file():
            problems.append(f"{name_of(doc)}: no schema for {doc['apiVersion']} {doc['kind']} in {SCHEMAS}")
            continue
        validator = jsonschema.Draft7Validator(json.loads(path.read_text()))
        for error in validator.iter_errors(doc):
            where = ".".join(str(p) for p in error.absolute_path) or "(root)"
            problems.append(f"{name_of(doc)}: {where}: {error.message}")
    return problems


def _run(label: str, command: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    print(f"--- {label}: {' '.join(command)}", flush=True)
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    return result.returncode, result.stdout + result.stderr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kustomize", required=True, help="the kustomize binary")
    parser.add_argument(
        "--tools", required=True, type=Path, help="folder of kubernetes-validate, checkov, hadolint"
    )
    parser.add_argument("--out", type=Path, default=ROOT / ".tools" / "rendered", help="where to render to")
    args = parser.parse_args(argv)
    failures: list[str] = []
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in args.out.glob("*.yaml"):
        stale.unlink()

    for overlay in sorted(p for p in OVERLAYS.iterdir() if p.is_dir()):
        docs = load_docs(render(args.kustomize, overlay))
        builtin = [d for d in docs if is_builtin(d)]
        custom = [d for d in docs if not is_builtin(d)]
        (args.out / f"{overlay.name}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
        builtin_file = args.out / f"{overlay.name}.builtin.yaml.txt"  # not scanned by checkov twice
        builtin_file.write_text(yaml.safe_dump_all(builtin, sort_keys=False))
        print(f"=== {overlay.name}: {len(builtin)} built-in resources, {len(custom)} custom resources")
        for version in KUBERNETES_VERSIONS:
            rc, output = _run(
                f"{overlay.name}: Kubernetes {version}",
                [
                    str(args.tools / "kubernetes-validate"),
                    "--strict",
                    "--quiet",
                    "-k",
                    version,
                    str(builtin_file),
                ],
            )
            bad = [line for line in output.splitlines() if line.startswith(("WARN", "ERROR", "FATAL"))]
            if rc != 0 or bad:
                failures += [f"{overlay.name}: kubernetes-validate {version}: {line}" for line in bad]
                failures += [] if bad else [f"{overlay.name}: kubernetes-validate exited {rc}: {output}"]
        problems = validate_custom(custom)
        where = SCHEMAS.relative_to(ROOT)
        print(f"--- {overlay.name}: custom resources against {where}: {len(problems)} problems")
        failures += [f"{overlay.name}: {p}" for p in problems]
        problems = check_invariants(docs, GPU_WORKLOADS.get(overlay.name))
        print(f"--- {overlay.name}: invariants: {len(problems)} problems")
        failures += [f"{overlay.name}: {p}" for p in problems]

    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"}
    rc, output = _run(
        "checkov",
        [
            str(args.tools / "checkov"),
            "--directory", str(args.out),
            "--framework", "kubernetes",
            "--skip-download",
            "--compact",
            "--quiet",
        ],
        env,
    )  # fmt: skip
    print(output.strip())
    if rc != 0:
        failures.append("checkov: failed checks (above)")
    rc, output = _run("hadolint", [str(args.tools / "hadolint"), str(ROOT / "Dockerfile")])
    if rc != 0:
        failures.append(f"hadolint: {output.strip()}")

    for failure in failures:
        print(f"FAIL {failure}")
    print("deploy-check: " + (f"{len(failures)} failures" if failures else "all checks passed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
