"""serve/*.yaml configs and the Kubernetes manifests rendered from them, validated with kubernetes-validate
against the Kubernetes schemas (strict: unknown fields are errors)."""

import copy
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from ftx import deploy
from ftx.core.errors import FtxError

from .conftest import FTX

ROOT = Path(__file__).resolve().parents[1]
MULTI = ROOT / "serve" / "multi-lora.yaml"


def test_shipped_serve_configs_validate():
    edge = deploy.load(ROOT / "serve" / "edge.yaml").model
    assert edge.engine == "llamacpp" and edge.host == "127.0.0.1" and edge.llamacpp.parallel == 4
    multi = deploy.load(MULTI).model
    assert (
        multi.engine == "vllm"
        and set(multi.adapters) == {"json", "dpo"}
        and multi.kubernetes.gpus == 1
        and multi.kubernetes.tensor_parallel_size == 1
    )


def test_rendered_manifests_validate_against_kubernetes_schemas(tmp_path):
    out = tmp_path / "deploy.yaml"
    proc = subprocess.run(
        [*FTX, "serve", "k8s", str(MULTI), "--out", str(out)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    docs = list(yaml.safe_load_all(out.read_text()))
    assert [d["kind"] for d in docs] == ["Deployment", "Service", "PodDisruptionBudget"]
    for version in ("1.30", deploy.K8S_VERSION, "1.37"):
        deploy.validate(docs, version)
    dep, svc, pdb = docs
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": dep["spec"]["selector"]}
    pod = dep["spec"]["template"]["spec"]
    vllm, gw = pod["containers"]
    # the GPU, and vLLM reachable only from inside the pod
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 1
    args = vllm["args"]
    assert args[args.index("--host") + 1] == "127.0.0.1" and "--enable-lora" in args
    assert "json=/models/adapters/json" in args and "dpo=/models/adapters/dpo" in args
    # the API key: from the Secret, in both containers, never in the manifests
    for c in (vllm, gw):
        refs = [e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e]
        assert refs == [{"name": "ftx-api-key", "key": "api-key"}]
    assert "api_key" not in next(e["value"] for e in gw["env"] if e["name"] == "FTX_GATEWAY")
    # probes on the gateway's /health, the only port the Service reaches
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert gw[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert "ports" not in vllm and svc["spec"]["ports"][0]["targetPort"] == "http"
    assert svc["spec"]["type"] == "ClusterIP" and svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert "&id" not in out.read_text()  # plain YAML, no anchors


@pytest.mark.parametrize(
    "mutate, where",
    [
        (lambda d: d[0]["spec"].__setitem__("replicas", "two"), "spec.replicas"),
        (
            lambda d: d[0]["spec"]["template"]["spec"]["containers"][1].__setitem__("readinessprobe", {}),
            "readinessprobe",
        ),
        (lambda d: d[1]["spec"]["ports"][0].pop("port"), "port"),
    ],
)
def test_the_validator_rejects_broken_manifests(mutate, where):
    docs = deploy.manifests(deploy.load(MULTI).model, {"json": 8})
    deploy.validate(docs)
    bad = copy.deepcopy(docs)
    mutate(bad)
    with pytest.raises(FtxError, match=re.escape(where)):
        deploy.validate(bad)


def test_serve_config_errors_name_file_line_and_key(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("engine: vllm\nbase_model: smollm2-135m-instruct\nadapters:\n  ../evil: /tmp\n")
    with pytest.raises(FtxError, match=r"s\.yaml:4: adapters\.\.\./evil: adapter name"):
        deploy.load(cfg)
    cfg.write_text("engine: llamacpp\nport: 8080\nllamacpp:\n  paralel: 4\n")
    with pytest.raises(FtxError, match=r"s\.yaml:4: llamacpp\.paralel: unknown key"):
        deploy.load(cfg)
    cfg.write_text("engine: llamacpp\ngguf: missing.gguf\n")
    doc = deploy.load(cfg)
    with pytest.raises(FtxError, match=r"s\.yaml:2: gguf: file not found"):
        deploy.local(doc)
    cfg.write_text("engine: llamacpp\ngguf: x.gguf\nkubernetes: {}\n")
    with pytest.raises(FtxError, match="engine vllm only"):
        deploy.load(cfg)
    proc = subprocess.run(
        [*FTX, "serve", "k8s", str(MULTI), "kubernetes.replicas=-1"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and re.fullmatch(
        r"error: override 'kubernetes\.replicas=-1': kubernetes\.replicas: .*", proc.stderr.strip()
    ), proc.stderr


def test_max_lora_rank_from_the_adapters_or_the_config(tmp_path):
    spec = deploy.load(MULTI, ["vllm.max_lora_rank=null"]).model
    args = deploy.manifests(spec, {"json": 16, "dpo": 8})[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--max-lora-rank") + 1] == "16"
    args = deploy.manifests(spec, {"json": 20})[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--max-lora-rank") + 1] == "32"  # rounded up to a rank vLLM accepts


def test_scaled_serving_tensor_pipeline_parallel_autoscaler_and_disruption_budget(tmp_path):
    """TP 2 x PP 2: 4 GPUs per pod and both vLLM flags; an HPA on vLLM's queue depth owns the replica count; rollouts
    never ask for a GPU more than the replicas hold; all of it strictly valid."""
    out = tmp_path / "scaled.yaml"
    scaled = [
        "kubernetes.tensor_parallel_size=2",
        "kubernetes.pipeline_parallel_size=2",
        "kubernetes.autoscaling={min_replicas: 2, max_replicas: 6, metric: queue_depth, target: 2.5}",
        "kubernetes.max_unavailable=1",
    ]
    proc = subprocess.run(
        [*FTX, "serve", "k8s", str(MULTI), *scaled, "--out", str(out)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    said = " ".join((proc.stdout + proc.stderr).split())  # the console wraps lines
    assert "4 GPU(s) per pod" in said and "vllm_num_requests_waiting" in said
    docs = list(yaml.safe_load_all(out.read_text()))
    assert [d["kind"] for d in docs] == ["Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"]
    for version in ("1.30", deploy.K8S_VERSION, "1.37"):
        deploy.validate(docs, version)
    dep, _, pdb, hpa = docs
    vllm = dep["spec"]["template"]["spec"]["containers"][0]
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 4 and vllm["resources"]["requests"]["nvidia.com/gpu"] == 4
    args = vllm["args"]
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert args[args.index("--pipeline-parallel-size") + 1] == "2"
    assert "replicas" not in dep["spec"]  # the HPA's
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": dep["metadata"]["name"],
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    (m,) = hpa["spec"]["metrics"]
    assert m["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
    assert m["pods"]["target"] == {"type": "AverageValue", "averageValue": "2500m"}
    assert pdb["spec"]["selector"] == dep["spec"]["selector"]
    bad = subprocess.run(
        [*FTX, "serve", "k8s", str(MULTI), "kubernetes.autoscaling={min_replicas: 3, max_replicas: 2}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "max_replicas 2 < min_replicas 3" in bad.stderr, bad.stderr
