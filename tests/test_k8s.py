"""The Kubernetes manifests in k8s/: every overlay renders, validates, and is wired as the
launcher expects.

Each overlay (Indexed Job or PyTorchJob, on CPU or GPU) is rendered once with plain
``kubectl kustomize`` -- no ``--load-restrictor`` flag, so what renders here is what
``kubectl apply -k`` applies (skipped, with the reason, where kubectl is missing). The configs
ConfigMap is generated from k8s/common/configs/, a copy of configs/ written by
``make k8s-configs`` (k8s/sync_configs.py); a test fails, naming that command, while the copy
or the file lists generated with it are out of step with configs/. The PyTorchJob's Worker
replicas come from NNODES_WORKERS by a kustomize replacement, and NNODES_WORKERS = NNODES - 1
is checked here and by the pod's own script. Core objects are
validated against the Kubernetes OpenAPI schemas bundled with ``kubernetes-validate`` (strict:
unknown fields are errors), the PyTorchJob against the openAPIV3Schema of the CRD in k8s/crds/
plus its pod templates against the core PodTemplate schema. The container's shell script is
run with stub ``python`` / ``getent`` executables, and the command line it execs is parsed by
the launcher's own argument parser. No cluster, no network; a few seconds.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
K8S = REPO_ROOT / "k8s"
CONFIGS = REPO_ROOT / "configs"
K8S_CONFIGS = K8S / "common" / "configs"  # the copy the configs ConfigMap is generated from
SYNC_CONFIGS = K8S / "sync_configs.py"     # writes it: make k8s-configs
FIX = "run `make k8s-configs` (python3 k8s/sync_configs.py) and commit k8s/"
CRD_FILE = K8S / "crds" / "kubeflow.org_pytorchjobs.yaml"
KUBECTL = shutil.which("kubectl")

OVERLAYS = ["indexed-job/cpu", "indexed-job/gpu", "pytorchjob/cpu", "pytorchjob/gpu"]
INDEXED = [o for o in OVERLAYS if o.startswith("indexed-job/")]
PYTORCHJOB = [o for o in OVERLAYS if o.startswith("pytorchjob/")]
GPU = [o for o in OVERLAYS if o.endswith("/gpu")]
CPU = [o for o in OVERLAYS if o.endswith("/cpu")]

# Kubernetes versions whose schemas every core object must satisfy: the oldest the manifests
# need (the batch.kubernetes.io/job-name pod label is 1.27+) and the newest bundled.
K8S_VERSIONS = ["1.29", kubernetes_validate.latest_version()]

WORKDIR = "/workspace/recsys-dist"  # the repo in the image
SECRET = "recsys-dist-s3"
# Environment variables / ConfigMap keys that may only come from a Secret.
CREDENTIAL_NAME = re.compile(r"^AWS_|SECRET|PASSWORD|TOKEN|CREDENTIAL", re.I)
AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")


def overlay_dir(overlay: str) -> Path:
    kind, hardware = overlay.split("/")
    return K8S / kind / "overlays" / hardware


_RENDERED: dict[str, tuple[str, list[dict]]] = {}


def render(overlay: str) -> tuple[str, list[dict]]:
    """(text, objects) of ``kubectl kustomize`` on one overlay, rendered once per session."""
    if KUBECTL is None:
        pytest.skip("kubectl not found on PATH: the k8s/ overlays are rendered with `kubectl kustomize`")
    if overlay not in _RENDERED:
        # No flags: the default load restrictor, as `kubectl apply -k` builds it.
        proc = subprocess.run([KUBECTL, "kustomize", str(overlay_dir(overlay))],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"kubectl kustomize {overlay} failed:\n{proc.stderr}"
        _RENDERED[overlay] = (proc.stdout, [d for d in yaml.safe_load_all(proc.stdout) if d])
    return _RENDERED[overlay]


def objects(overlay: str) -> list[dict]:
    return render(overlay)[1]


def only(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def configmap(docs: list[dict], name: str) -> dict:
    """The generated ConfigMap ``name`` (kustomize appends -<hash>)."""
    found = [d for d in docs if d["kind"] == "ConfigMap"
             and re.fullmatch(re.escape(name) + r"(-[a-z0-9]{10})?", d["metadata"]["name"])]
    assert len(found) == 1, f"expected one ConfigMap {name}, found {len(found)}"
    return found[0]


def params(docs: list[dict]) -> dict[str, str]:
    return configmap(docs, "recsys-dist-params")["data"]


def workload(docs: list[dict]) -> dict:
    found = [d for d in docs if d["kind"] in ("Job", "PyTorchJob")]
    assert len(found) == 1, f"expected one Job or PyTorchJob, found {[d['kind'] for d in found]}"
    return found[0]


def pod_templates(docs: list[dict]) -> dict[str, dict]:
    """Replica name -> pod template: {"node": ...} for the Job, Master/Worker for the PyTorchJob."""
    w = workload(docs)
    if w["kind"] == "Job":
        return {"node": w["spec"]["template"]}
    return {name: spec["template"] for name, spec in w["spec"]["pytorchReplicaSpecs"].items()}


def trainer(template: dict) -> dict:
    """The training container (named "pytorch": the training operator only configures that one)."""
    found = [c for c in template["spec"]["containers"] if c["name"] == "pytorch"]
    assert len(found) == 1, "expected one container named 'pytorch'"
    return found[0]


def configmaps_by_name(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}


def container_env(docs: list[dict], container: dict) -> dict[str, str]:
    """The literal environment of ``container``: its envFrom ConfigMaps, then its env values."""
    cms = configmaps_by_name(docs)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(cms[source["configMapRef"]["name"]]["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
    return env


def volume_for_mount(template: dict, mount_path: str) -> dict:
    mounts = [m for m in trainer(template)["volumeMounts"] if m["mountPath"] == mount_path]
    assert len(mounts) == 1, f"expected one volume mounted at {mount_path}"
    volumes = [v for v in template["spec"]["volumes"] if v["name"] == mounts[0]["name"]]
    assert len(volumes) == 1, f"no volume named {mounts[0]['name']}"
    return volumes[0]


def config_closure(rel: str) -> list[str]:
    """``rel`` (a path under configs/) and, recursively, the files its ``base:`` list names
    (relative to the including file's directory, as recsys_dist.config reads them)."""
    out: list[str] = []

    def visit(path: str) -> None:
        if path in out:
            return
        out.append(path)
        data = yaml.safe_load((CONFIGS / path).read_text()) or {}
        bases = data.get("base", [])
        for base in [bases] if isinstance(bases, str) else bases:
            visit(os.path.normpath(os.path.join(os.path.dirname(path), base)))

    visit(rel)
    return out


# ---------------------------------------------------------------------------------- render


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_expected_objects(overlay):
    docs = objects(overlay)
    kinds = sorted(d["kind"] for d in docs)
    if overlay in INDEXED:
        assert kinds == ["ConfigMap"] * 3 + ["Job", "Service"]
    else:
        assert kinds == ["ConfigMap"] * 3 + ["PyTorchJob"]
    assert all(d["metadata"]["name"].startswith("recsys-dist") for d in docs)


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_objects_validate_against_the_kubernetes_schemas(overlay):
    docs = objects(overlay)
    for doc in docs:
        if doc["kind"] == "PyTorchJob":
            continue  # its own schema: test_pytorchjob_validates_against_its_crd
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    # The pod templates of either kind, as core PodTemplates (the PyTorchJob's CRD leaves them
    # to the core schema too).
    for name, template in pod_templates(docs).items():
        for version in K8S_VERSIONS:
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                          "metadata": {"name": f"recsys-dist-{name.lower()}"},
                                          "template": template}, version, strict=True)


def test_strict_validation_rejects_unknown_and_mistyped_fields():
    """The validator used above does fail: a misspelled field and a wrong type are errors."""
    job = only(objects("indexed-job/cpu"), "Job")
    typo = copy.deepcopy(job)
    typo["spec"]["template"]["spec"]["subdomian"] = typo["spec"]["template"]["spec"].pop("subdomain")
    wrong_type = copy.deepcopy(job)
    wrong_type["spec"]["completions"] = "two"
    for bad in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, K8S_VERSIONS[0], strict=True)


def crd_schema() -> dict:
    crd = yaml.safe_load(CRD_FILE.read_text())
    assert (crd["kind"], crd["spec"]["group"], crd["spec"]["names"]["kind"]) == \
        ("CustomResourceDefinition", "kubeflow.org", "PyTorchJob")
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def pruned_fields(value, schema: dict, where: str = "") -> list[str]:
    """Fields of ``value`` that the API server would silently drop (structural-schema pruning):
    object keys the schema neither declares in ``properties`` nor admits through
    ``additionalProperties``, unless it preserves unknown fields. The root's metadata is
    ObjectMeta, never pruned."""
    if isinstance(value, dict):
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return []
        props, extra = schema.get("properties", {}), schema.get("additionalProperties")
        found = []
        for key, item in value.items():
            if where == "" and key == "metadata":
                continue
            if key in props:
                found += pruned_fields(item, props[key], f"{where}.{key}")
            elif isinstance(extra, dict):
                found += pruned_fields(item, extra, f"{where}.{key}")
            else:
                found.append(f"{where}.{key}")
        return found
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [f for i, item in enumerate(value)
                for f in pruned_fields(item, schema["items"], f"{where}[{i}]")]
    return []


def test_the_crd_file_is_a_valid_crd():
    kubernetes_validate.validate(yaml.safe_load(CRD_FILE.read_text()), K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("overlay", PYTORCHJOB)
def test_pytorchjob_validates_against_its_crd(overlay):
    job = only(objects(overlay), "PyTorchJob")
    assert job["apiVersion"] == "kubeflow.org/v1"
    schema = crd_schema()
    jsonschema.Draft7Validator(schema).validate(job)
    assert pruned_fields(job, schema) == [], "fields the API server would drop"
    # The operator accepts exactly these replica types for a PyTorchJob.
    assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Master", "Worker"}


def test_crd_schema_rejects_a_broken_pytorchjob():
    """The CRD checks above do fail: a wrong type, a bad enum value, a misspelled field."""
    job = only(objects("pytorchjob/cpu"), "PyTorchJob")
    schema = crd_schema()
    wrong_type = copy.deepcopy(job)
    wrong_type["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = "1"
    bad_enum = copy.deepcopy(job)
    bad_enum["spec"]["pytorchReplicaSpecs"]["Master"]["restartPolicy"] = "Sometimes"
    for bad in (wrong_type, bad_enum):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.Draft7Validator(schema).validate(bad)
    typo = copy.deepcopy(job)
    typo["spec"]["runPolicy"]["cleanupPolicy"] = typo["spec"]["runPolicy"].pop("cleanPodPolicy")
    assert pruned_fields(typo, schema) == [".spec.runPolicy.cleanupPolicy"]


# ------------------------------------------------------------------------------ references


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_reference_resolves(overlay):
    """ConfigMap references carry the generated (hashed) names -- for the PyTorchJob, kustomize
    only rewrites them through k8s/pytorchjob/base/kustomizeconfig.yaml -- mounts name volumes,
    and Secret references name the S3 Secret (created by hand, never rendered)."""
    docs = objects(overlay)
    cms = configmaps_by_name(docs)
    for name, template in pod_templates(docs).items():
        c = trainer(template)
        for source in c["envFrom"]:
            assert source["configMapRef"]["name"] in cms, f"{name}: envFrom {source}"
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        for v in volumes.values():
            if "configMap" in v:
                assert v["configMap"]["name"] in cms, f"{name}: volume {v['name']}"
        assert {m["name"] for m in c["volumeMounts"]} <= set(volumes)
        for var in c["env"]:
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == SECRET
    assert not [d for d in docs if d["kind"] == "Secret"]


# ------------------------------------------------------------------------------ credentials


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_s3_credentials_only_by_secret_reference(overlay):
    text, docs = render(overlay)
    assert not AWS_KEY_ID.search(text), "an AWS access key id in the rendered manifests"
    for cm in (d for d in docs if d["kind"] == "ConfigMap"):
        for key in cm.get("data", {}):
            assert not CREDENTIAL_NAME.search(key), f"{key} in ConfigMap {cm['metadata']['name']}"
    for name, template in pod_templates(docs).items():
        for c in template["spec"]["containers"] + template["spec"].get("initContainers", []):
            env = {v["name"]: v for v in c.get("env", [])}
            for var in env.values():
                if CREDENTIAL_NAME.search(var["name"]):
                    assert "value" not in var, f"{name}: literal value for {var['name']}"
                    assert set(var["valueFrom"]) == {"secretKeyRef"}, f"{name}: {var['name']}"
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                ref = env[key]["valueFrom"]["secretKeyRef"]
                assert (ref["name"], ref["key"], ref.get("optional", False)) == (SECRET, key, False)
            endpoint = env["AWS_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"]
            assert endpoint["name"] == SECRET and endpoint["optional"] is True


def test_no_aws_key_ids_in_the_k8s_sources():
    for path in K8S.rglob("*"):
        if path.is_file():
            assert not AWS_KEY_ID.search(path.read_text()), path


# ------------------------------------------------------------------------------ hardware


@pytest.mark.parametrize("overlay", GPU)
def test_gpu_overlay(overlay):
    docs = objects(overlay)
    nproc = int(params(docs)["NPROC_PER_NODE"])
    for name, template in pod_templates(docs).items():
        spec, c = template["spec"], trainer(template)
        # one GPU per rank, as a limit (Kubernetes sets the request of an extended resource to it)
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == nproc > 0, name
        env = container_env(docs, c)
        assert env["NCCL_DEBUG"] == "WARN"
        assert env["NCCL_SOCKET_IFNAME"] == "eth0"
        assert env["NCCL_IB_DISABLE"] in ("0", "1")
        assert spec["nodeSelector"]["nvidia.com/gpu.present"] == "true"
        assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule"
                   for t in spec["tolerations"]), name
        assert c["image"].endswith(":gpu")


@pytest.mark.parametrize("overlay", CPU)
def test_cpu_overlay(overlay):
    text, docs = render(overlay)
    assert "nvidia.com/gpu" not in text  # no GPU request, selector or toleration anywhere
    nproc = int(params(docs)["NPROC_PER_NODE"])
    for name, template in pod_templates(docs).items():
        c = trainer(template)
        env = container_env(docs, c)
        assert env["GLOO_SOCKET_IFNAME"] == "eth0"
        assert not [k for k in env if k.startswith("NCCL_")]
        # OpenMP threads x ranks fit in the cpu limit (the launcher would divide the node's cores)
        assert int(env["OMP_NUM_THREADS"]) * nproc <= int(c["resources"]["limits"]["cpu"])
        assert c["resources"]["limits"]["memory"] and c["image"].endswith(":cpu")
        assert not template["spec"].get("tolerations")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shared_memory_and_resources(overlay):
    docs = objects(overlay)
    for name, template in pod_templates(docs).items():
        shm = volume_for_mount(template, "/dev/shm")
        assert shm["emptyDir"]["medium"] == "Memory", name
        res = trainer(template)["resources"]
        assert res["requests"]["cpu"] == res["limits"]["cpu"] and \
            res["requests"]["memory"] == res["limits"]["memory"], f"{name}: not Guaranteed QoS"


# ------------------------------------------------------------------------------ job wiring


@pytest.mark.parametrize("overlay", INDEXED)
def test_indexed_job_and_headless_service(overlay):
    docs = objects(overlay)
    job, svc = only(docs, "Job"), only(docs, "Service")
    nnodes = int(params(docs)["NNODES"])
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == nnodes
    template = job["spec"]["template"]
    pod, c = template["spec"], trainer(template)
    # headless, selects the Job's pods, and is the pods' subdomain
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    selector = svc["spec"]["selector"]
    assert selector and selector.items() <= template["metadata"]["labels"].items()
    assert pod["subdomain"] == svc["metadata"]["name"]
    assert {v["name"]: v.get("value") for v in c["env"]}["RDZV_SERVICE"] == svc["metadata"]["name"]
    # the rendezvous port: the script's endpoint, the container port, the Service port
    script = c["args"][0]
    (port,) = re.findall(r'--rdzv-endpoint "\$\{RDZV_HOST\}:(\d+)"', script)
    (cport,) = [p for p in c["ports"] if p["name"] == "c10d"]
    (sport,) = [p for p in svc["spec"]["ports"] if p["name"] == "c10d"]
    assert int(port) == cport["containerPort"] == sport["port"]
    assert sport["targetPort"] in ("c10d", cport["containerPort"])
    # the node rank is the completion index; pod 0 of this Job is the endpoint
    assert '--node-rank "${JOB_COMPLETION_INDEX}"' in script
    assert 'RDZV_HOST="${JOB_NAME}-0.${RDZV_SERVICE}"' in script
    job_name = {v["name"]: v for v in c["env"]}["JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert job_name == "metadata.labels['batch.kubernetes.io/job-name']"


@pytest.mark.parametrize("overlay", PYTORCHJOB)
def test_pytorchjob_replicas_and_rendezvous(overlay):
    docs = objects(overlay)
    job = only(docs, "PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    p = params(docs)
    assert replicas["Master"]["replicas"] == 1
    assert 1 + replicas["Worker"]["replicas"] == int(p["NNODES"])
    # the Worker count is the overlay's NNODES_WORKERS (a replacement), stated as NNODES - 1
    assert int(p["NNODES_WORKERS"]) == int(p["NNODES"]) - 1, \
        f"{overlay}: set NNODES_WORKERS = NNODES - 1 in its kustomization.yaml"
    assert replicas["Worker"]["replicas"] == int(p["NNODES_WORKERS"])
    assert replicas["Master"]["template"] == replicas["Worker"]["template"]
    for spec in replicas.values():
        assert spec["restartPolicy"] == "OnFailure"
        c = trainer(spec["template"])
        assert [p["name"] for p in c["ports"]] == ["pytorchjob-port"]  # the operator's MASTER_PORT
        assert '--rdzv-endpoint "${MASTER_ADDR}:${MASTER_PORT}"' in c["args"][0]
    assert "elasticPolicy" not in job["spec"]


# -------------------------------------------------------------------- the container command


def run_entrypoint(docs: list[dict], template: dict, tmp_path: Path, extra_env: dict[str, str]) -> list[str]:
    """Run the container's shell script with stub getent/python; return python's argv."""
    c = trainer(template)
    assert c["command"] == ["bash", "-c"] and len(c["args"]) == 1
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    argv_file = tmp_path / "argv"
    for tool, body in {"getent": "exit 0", "python": 'printf "%s\\0" "$@" > "$ARGV_FILE"'}.items():
        path = stubs / tool
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    env = {"PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}", "ARGV_FILE": str(argv_file)}
    env.update(container_env(docs, c))
    env.update(extra_env)
    proc = subprocess.run(["bash", "-c", c["args"][0]], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    argv = argv_file.read_text().split("\0")[:-1]
    assert argv[:3] == ["-m", "launcher", "train"], argv
    return argv[2:]


def pod_env(overlay: str) -> dict[str, str]:
    """What Kubernetes / the training operator add to the pod's environment."""
    if overlay in INDEXED:
        return {"JOB_NAME": "recsys-dist", "JOB_COMPLETION_INDEX": "1"}
    return {"JOB_NAME": "recsys-dist", "MASTER_ADDR": "recsys-dist-master-0", "MASTER_PORT": "23456",
            "WORLD_SIZE": "2", "RANK": "1"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_command_line_parses_with_the_launcher(overlay, tmp_path):
    from launcher.__main__ import build_parser

    docs = objects(overlay)
    p = params(docs)
    for name, template in pod_templates(docs).items():
        argv = run_entrypoint(docs, template, tmp_path, {**pod_env(overlay),
                                                         "OVERRIDES": "train.max_steps=7 model.dim=32"})
        args = build_parser().parse_args(argv)
        assert args.command == "train" and args.launcher == "torchrun"
        assert args.config == p["CONFIG"]
        assert args.nnodes == p["NNODES"] and args.nproc_per_node == int(p["NPROC_PER_NODE"])
        assert args.max_restarts == 3
        if overlay in INDEXED:
            assert args.rdzv_endpoint == "recsys-dist-0.recsys-dist:29500"
            assert args.node_rank == 1 and args.rdzv_id == "recsys-dist"
        else:
            assert args.rdzv_endpoint == "recsys-dist-master-0:23456" and args.node_rank is None
        # the parameters become config overrides; OVERRIDES splits into words
        assert args.overrides == [f"data.shards_url={p['SHARDS_URL']}",
                                  f"checkpoint.url={p['CHECKPOINT_URL']}",
                                  "data.build_if_missing=false", "train.max_steps=7", "model.dim=32"], name


@pytest.mark.parametrize("overlay", ["indexed-job/cpu", "pytorchjob/gpu"])
def test_command_overrides_are_config_fields(overlay, tmp_path):
    """The overrides the pods pass load into a JobConfig (checkpoint.url included)."""
    import dataclasses

    from launcher.__main__ import build_parser
    from recsys_dist.config import JobConfig, load_config

    if "checkpoint" not in {f.name for f in dataclasses.fields(JobConfig)}:
        pytest.skip("JobConfig has no checkpoint section yet: checkpoint.url lands with the checkpoint work")
    docs = objects(overlay)
    template = next(iter(pod_templates(docs).values()))
    args = build_parser().parse_args(run_entrypoint(docs, template, tmp_path, pod_env(overlay)))
    cfg = load_config(REPO_ROOT / args.config, args.overrides)
    p = params(docs)
    assert cfg.data.shards_url == p["SHARDS_URL"] and cfg.checkpoint.url == p["CHECKPOINT_URL"]
    assert cfg.data.build_if_missing is False


# ------------------------------------------------------------------------------ the configs


def repo_configs() -> dict[str, str]:
    return {str(p.relative_to(CONFIGS)): p.read_text() for p in sorted(CONFIGS.rglob("*.yaml"))}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configs_configmap_holds_configs_and_mounts_it_in_place(overlay):
    docs = objects(overlay)
    data = configmap(docs, "recsys-dist-configs")["data"]
    files = repo_configs()
    # every file of configs/, byte for byte, under the key <dir>__<file>
    assert {k.replace("__", "/"): v for k, v in data.items()} == files
    for name, template in pod_templates(docs).items():
        c = trainer(template)
        assert c["workingDir"] == WORKDIR
        volume = volume_for_mount(template, f"{WORKDIR}/configs")
        items = {i["key"]: i["path"] for i in volume["configMap"]["items"]}
        # each key back at its path under configs/, and nothing left out
        assert items == {k: k.replace("__", "/") for k in data}, name
        assert [m for m in c["volumeMounts"] if m["mountPath"] == f"{WORKDIR}/configs"][0]["readOnly"] is True
    # the job's config and every file it layers through base: are in the ConfigMap
    config = params(docs)["CONFIG"]
    assert config.startswith("configs/")
    closure = config_closure(config.removeprefix("configs/"))
    assert len(closure) >= 3, f"{config} should layer a dataset and a model file: {closure}"
    assert set(closure) <= set(items.values())


def materialize_configmap_volume(root: Path, data: dict[str, str], items: list[dict]) -> None:
    """Write a configMap volume as the kubelet does: files under a timestamped directory,
    ``..data`` pointing at it, and each top-level entry a symlink through ``..data``."""
    stamp = root / "..2026_01_01_00_00_00.000000001"
    for item in items:
        path = stamp / item["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(data[item["key"]])
    (root / "..data").symlink_to(stamp.name)
    for top in {item["path"].split("/")[0] for item in items}:
        (root / top).symlink_to(f"..data/{top}")


@pytest.mark.parametrize("overlay", ["indexed-job/gpu", "pytorchjob/cpu"])
def test_mounted_configs_load_like_the_checkout(overlay, tmp_path):
    """In the pod, CONFIG and its base: files resolve inside the mounted volume (symlinks and
    all) to the same JobConfig as in a checkout."""
    from recsys_dist.config import load_config

    docs = objects(overlay)
    template = next(iter(pod_templates(docs).values()))
    volume = volume_for_mount(template, f"{WORKDIR}/configs")
    workdir = tmp_path / "workspace"
    (workdir / "configs").mkdir(parents=True)
    materialize_configmap_volume(workdir / "configs", configmap(docs, "recsys-dist-configs")["data"],
                                 volume["configMap"]["items"])
    p = params(docs)
    overrides = [f"data.shards_url={p['SHARDS_URL']}", "data.build_if_missing=false"]
    mounted = load_config(workdir / p["CONFIG"], overrides)
    assert mounted == load_config(REPO_ROOT / p["CONFIG"], overrides)
    assert mounted.data.shards_url == p["SHARDS_URL"]



# ----------------------------------------------- plain `kubectl apply -k`: the configs copy


def test_kustomizations_read_no_file_outside_their_directory():
    """The default load restrictor (the only one `kubectl apply -k` has) refuses files outside a
    kustomization's directory: no generator or patch file may reach out of it. Resources and
    components (directories) may."""
    for path in K8S.rglob("kustomization.yaml"):
        k = yaml.safe_load(path.read_text())
        files = [f.split("=", 1)[-1] for gen in k.get("configMapGenerator", []) + k.get("secretGenerator", [])
                 for f in gen.get("files", []) + gen.get("envs", [])]
        files += [p["path"] for p in k.get("patches", []) if "path" in p]
        for f in files:
            resolved = (path.parent / f).resolve()
            assert resolved.is_relative_to(path.parent.resolve()), f"{path.relative_to(REPO_ROOT)}: {f}"
            assert resolved.is_file(), f"{path.relative_to(REPO_ROOT)}: {f} does not exist"


def test_the_configs_copy_in_k8s_is_in_step_with_configs():
    """k8s/common/configs/ holds exactly the files of configs/, byte for byte, and the
    generated lists (ConfigMap files, both volumes' items) name exactly them."""
    copy = {p.relative_to(K8S_CONFIGS).as_posix(): p.read_bytes()
            for p in sorted(K8S_CONFIGS.rglob("*")) if p.is_file()}
    repo = {p.relative_to(CONFIGS).as_posix(): p.read_bytes() for p in sorted(CONFIGS.rglob("*.yaml"))}
    missing, stale = sorted(set(repo) - set(copy)), sorted(set(copy) - set(repo))
    changed = sorted(k for k in set(repo) & set(copy) if repo[k] != copy[k])
    assert not (missing or stale or changed), \
        f"k8s/common/configs/ is out of step with configs/ (missing {missing}, not in configs/ {stale}, " \
        f"changed {changed}): {FIX}"
    proc = subprocess.run([sys.executable, "-B", str(SYNC_CONFIGS), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}\n{FIX}"


def copy_of_the_manifests(tmp_path: Path) -> Path:
    """configs/ and k8s/ of this checkout under tmp_path (what sync_configs.py and kustomize read)."""
    root = tmp_path / "repo"
    shutil.copytree(CONFIGS, root / "configs")
    shutil.copytree(K8S, root / "k8s", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_make_k8s_configs_brings_a_changed_configs_dir_back_in_step(tmp_path):
    """On a copy: a new, a changed and a removed config make --check fail; writing fixes the
    copy and every list, and plain `kubectl kustomize` then holds and mounts the new file."""
    if KUBECTL is None:
        pytest.skip("kubectl not found on PATH")
    root = copy_of_the_manifests(tmp_path)
    script = [sys.executable, "-B", str(root / "k8s" / "sync_configs.py"), "--root", str(root)]
    (root / "configs" / "models" / "tiny.yaml").write_text("model:\n  dim: 8\n")
    (root / "configs" / "datasets" / "ml1m.yaml").write_text(
        (CONFIGS / "datasets" / "ml1m.yaml").read_text() + "# changed\n")
    (root / "configs" / "zhihu_sasrec.yaml").unlink()
    check = subprocess.run(script + ["--check"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 1
    assert "make k8s-configs" in check.stderr
    for line in ("out of step: k8s/common/configs/models/tiny.yaml",
                 "out of step: k8s/common/configs/datasets/ml1m.yaml",
                 "not in configs/: k8s/common/configs/zhihu_sasrec.yaml",
                 "out of step: k8s/common/kustomization.yaml",
                 "out of step: k8s/indexed-job/base/job.yaml",
                 "out of step: k8s/pytorchjob/base/pytorchjob.yaml"):
        assert line in check.stdout.splitlines(), check.stdout
    assert subprocess.run(script, capture_output=True, text=True, timeout=60).returncode == 0
    assert subprocess.run(script + ["--check"], capture_output=True, text=True, timeout=60).returncode == 0
    want = {p.relative_to(root / "configs").as_posix(): p.read_text()
            for p in (root / "configs").rglob("*.yaml")}
    for overlay in ("indexed-job/cpu", "pytorchjob/gpu"):
        kind, hardware = overlay.split("/")
        proc = subprocess.run([KUBECTL, "kustomize", str(root / "k8s" / kind / "overlays" / hardware)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
        data = configmap(docs, "recsys-dist-configs")["data"]
        assert {k.replace("__", "/"): v for k, v in data.items()} == want
        for name, template in pod_templates(docs).items():
            items = {i["key"]: i["path"] for i in volume_for_mount(template, f"{WORKDIR}/configs")["configMap"]["items"]}
            assert items == {k: k.replace("__", "/") for k in data}, name
            assert items["models__tiny.yaml"] == "models/tiny.yaml"


def test_worker_replicas_follow_the_overlay_parameters(tmp_path):
    """On a copy: NNODES=5, NNODES_WORKERS=4 in the PyTorchJob overlay render 4 Worker replicas,
    with no other edit."""
    if KUBECTL is None:
        pytest.skip("kubectl not found on PATH")
    root = copy_of_the_manifests(tmp_path)
    path = root / "k8s" / "pytorchjob" / "overlays" / "cpu" / "kustomization.yaml"
    text = path.read_text()
    assert text.count("- NNODES=2 ") == 1 and text.count("- NNODES_WORKERS=1 ") == 1
    path.write_text(text.replace("- NNODES=2 ", "- NNODES=5 ").replace("- NNODES_WORKERS=1 ", "- NNODES_WORKERS=4 "))
    proc = subprocess.run([KUBECTL, "kustomize", str(path.parent)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    replicas = only(docs, "PyTorchJob")["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 4)
    assert params(docs)["NNODES"] == "5"


@pytest.mark.parametrize("overlay", PYTORCHJOB)
def test_pod_refuses_a_worker_count_that_is_not_nnodes_minus_one(overlay, tmp_path):
    """A pod whose NNODES_WORKERS is not NNODES - 1 fails at start with one line (rather than
    waiting in the rendezvous for nodes that never come)."""
    docs = objects(overlay)
    template = pod_templates(docs)["Master"]
    env = {"PATH": os.environ["PATH"], **container_env(docs, trainer(template)), **pod_env(overlay),
           "NNODES": "3", "NNODES_WORKERS": "1"}
    proc = subprocess.run(["bash", "-c", trainer(template)["args"][0]], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("recsys-dist-params: NNODES_WORKERS=1 must be NNODES - 1 (NNODES=3); "
                                   "set both in the overlay")
