"""Platform strings and choosing a manifest from an index the way Podman would.

Default: linux plus the host architecture, with the arm variant normalised (arm64 == arm64/v8).
"""
from __future__ import annotations

import platform as _platform
from dataclasses import dataclass

from .errors import InvalidReferenceError

_MACHINE_TO_ARCH = {
    "x86_64": ("amd64", ""), "amd64": ("amd64", ""),
    "aarch64": ("arm64", "v8"), "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"), "armv5tel": ("arm", "v5"),
    "i386": ("386", ""), "i686": ("386", ""),
    "ppc64le": ("ppc64le", ""), "s390x": ("s390x", ""), "riscv64": ("riscv64", ""),
    "mips64": ("mips64", ""), "loongarch64": ("loong64", ""),
}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")


def host_platform() -> Platform:
    arch, variant = _MACHINE_TO_ARCH.get(_platform.machine().lower(), (_platform.machine().lower(), ""))
    return Platform("linux", arch, variant)


def parse_platform(text: str | None) -> Platform:
    """`os/arch[/variant]`; None or '' means the host's platform."""
    if not text:
        return host_platform()
    parts = text.strip().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise InvalidReferenceError(f"invalid platform {text!r}: expected os/arch[/variant]")
    os_, arch = parts[0].lower(), parts[1].lower()
    variant = parts[2].lower() if len(parts) == 3 else ""
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(arch, arch)
    if arch == "arm64" and not variant:
        variant = "v8"
    return Platform(os_, arch, variant)


def _variants_acceptable(wanted: Platform) -> list[str]:
    """Variants this platform runs, most preferred first (an arm/v7 host also runs v6 and v5)."""
    if wanted.architecture == "arm64":
        return ["v8", ""] if wanted.variant in ("", "v8") else [wanted.variant]
    if wanted.architecture == "arm" and wanted.variant:
        order = ["v8", "v7", "v6", "v5"]
        if wanted.variant in order:
            return order[order.index(wanted.variant):] + [""]
        return [wanted.variant]
    if wanted.variant:
        return [wanted.variant]
    return []  # empty: any variant


def match_rank(descriptor_platform: dict | None, wanted: Platform) -> int | None:
    """Lower is better; None when the entry cannot run on `wanted`. No platform counts as a match."""
    if not descriptor_platform:
        return 1000
    if str(descriptor_platform.get("os", "")).lower() != wanted.os:
        return None
    arch = str(descriptor_platform.get("architecture", "")).lower()
    if arch != wanted.architecture:
        return None
    variant = str(descriptor_platform.get("variant", "") or "").lower()
    accepted = _variants_acceptable(wanted)
    if not accepted:
        return 0
    if variant in accepted:
        return accepted.index(variant)
    return None


def select_descriptor(index: dict, wanted: Platform) -> dict | None:
    """The best matching entry of an index's `manifests`, first listed on ties."""
    best: tuple[int, int] | None = None
    chosen: dict | None = None
    for i, desc in enumerate(index.get("manifests") or []):
        if not isinstance(desc, dict):
            continue
        rank = match_rank(desc.get("platform"), wanted)
        if rank is not None and (best is None or (rank, i) < best):
            best, chosen = (rank, i), desc
    return chosen
