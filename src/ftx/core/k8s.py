"""Kubernetes manifests, whichever renders them (ftx.deploy: serving; ftx.trainjob: training): strict validation
against the API schemas of a Kubernetes release (kubernetes-validate, offline) and plain YAML output."""

from __future__ import annotations

from .errors import FtxError

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
K8S_VERSION = "1.33"  # validated against this Kubernetes release's schemas unless told otherwise


def validate(docs: list[dict], version: str = K8S_VERSION) -> None:
    """Strict validation against the Kubernetes schemas of `version` (kubernetes-validate); FtxError if not."""
    try:
        import kubernetes_validate
    except ImportError:
        raise FtxError("kubernetes-validate is not installed (it is in requirements.lock; run `make setup`)") from None
    for d in docs:
        try:
            kubernetes_validate.validate(d, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            raise FtxError(
                f"rendered {d['kind']} does not validate against Kubernetes {version}: {path or '(top)'}: {e.message}"
            ) from None
        except kubernetes_validate.VersionNotSupportedError:
            raise FtxError(f"Kubernetes {version}: no schemas for this version in kubernetes-validate") from None


def to_yaml(docs: list[dict]) -> str:
    import yaml

    class Dumper(yaml.SafeDumper):  # shared dicts (labels, probes) written out in full, no &anchors
        def ignore_aliases(self, data):
            return True

    return yaml.dump_all(docs, Dumper=Dumper, sort_keys=False, default_flow_style=False)
