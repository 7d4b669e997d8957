"""Which manifests of an index get converted.

Choosing one platform reuses the registry client's rules (`stargz_store.registry.platforms`), so
the converter picks the instance Podman and the store would pull.
"""
from __future__ import annotations

from ..registry.errors import InvalidReferenceError
from ..registry.platforms import Platform, host_platform, parse_platform, select_descriptor
from .errors import ConvertError

__all__ = ["Platform", "host_platform", "platform_from_text", "select_descriptor", "is_attestation",
           "describe_platform"]


def platform_from_text(text: str | None) -> Platform:
    """`os/arch[/variant]`, or the host's platform for None."""
    try:
        return parse_platform(text)
    except InvalidReferenceError as exc:
        raise ConvertError(str(exc)) from None


def is_attestation(descriptor: dict) -> bool:
    """BuildKit attestation manifests ride in indexes as `unknown/unknown`; they hold no layers to convert."""
    plat = descriptor.get("platform") or {}
    annotations = descriptor.get("annotations") or {}
    return plat.get("os") == "unknown" or "vnd.docker.reference.type" in annotations


def describe_platform(descriptor: dict) -> str:
    plat = descriptor.get("platform") or {}
    if not plat:
        return "(no platform)"
    text = f"{plat.get('os', '?')}/{plat.get('architecture', '?')}"
    return text + (f"/{plat['variant']}" if plat.get("variant") else "")
