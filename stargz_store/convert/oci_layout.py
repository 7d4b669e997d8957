"""OCI image layouts (`oci:DIR[:TAG]`): `oci-layout`, `index.json`, `blobs/sha256/<hex>`.

Tags are the `org.opencontainers.image.ref.name` annotation of `index.json` entries, as skopeo
and buildah write them. Writes are atomic renames, so an interrupted conversion leaves at most
stray blobs, never a tag naming missing content.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ImageNotFoundError, UnsupportedImageError
from .location import OciLocation
from .media_types import OCI_INDEX, sniff_media_type
from .stores import RawManifest, verify_bytes

log = logging.getLogger(__name__)

REF_NAME = "org.opencontainers.image.ref.name"
MAX_MANIFEST_SIZE = 4 << 20


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def blob_path(layout: Path, digest: str) -> Path:
    algorithm, _, hex_ = digest.partition(":")
    if not hex_ or "/" in hex_ or "/" in algorithm or hex_.startswith("."):
        raise UnsupportedImageError(f"invalid digest {digest!r}")
    return layout / "blobs" / algorithm / hex_


def _tags(index: dict) -> list[str]:
    return [m.get("annotations", {}).get(REF_NAME) for m in index.get("manifests", [])
            if m.get("annotations", {}).get(REF_NAME)]


class OciLayoutSource:
    def __init__(self, location: OciLocation) -> None:
        self.location = location
        self.layout = location.path

    def describe(self) -> str:
        return str(self.location)

    def _index(self) -> dict:
        index_path = self.layout / "index.json"
        if not self.layout.is_dir():
            raise ImageNotFoundError(f"{self.describe()}: directory {self.layout} does not exist")
        try:
            return json.loads(index_path.read_bytes())
        except FileNotFoundError:
            raise ImageNotFoundError(f"{self.describe()}: not an OCI image layout (no index.json)") from None
        except (OSError, ValueError) as exc:
            raise UnsupportedImageError(f"{self.describe()}: unreadable index.json: {exc}") from None

    def root(self) -> RawManifest:
        index = self._index()
        manifests = index.get("manifests") or []
        tag = self.location.tag
        if tag is None:
            if len(manifests) != 1:
                tags = ", ".join(_tags(index)) or "none"
                raise ImageNotFoundError(
                    f"{self.describe()}: the layout holds {len(manifests)} images; name one as oci:DIR:TAG (tags: {tags})")
            chosen = manifests[0]
        else:
            matching = [m for m in manifests if m.get("annotations", {}).get(REF_NAME) == tag]
            if not matching:
                tags = ", ".join(_tags(index)) or "none"
                raise ImageNotFoundError(f"{self.describe()}: no image tagged {tag!r} (tags: {tags})")
            chosen = matching[-1]
        return self._read(chosen["digest"], chosen.get("mediaType"))

    def manifest(self, digest: str) -> RawManifest:
        return self._read(digest, None)

    def _read(self, digest: str, declared: str | None) -> RawManifest:
        path = blob_path(self.layout, digest)
        try:
            if path.stat().st_size > MAX_MANIFEST_SIZE:
                raise UnsupportedImageError(f"{self.describe()}: manifest {digest} is larger than 4 MiB")
            raw = path.read_bytes()
        except FileNotFoundError:
            raise ImageNotFoundError(f"{self.describe()}: manifest blob {digest} is missing") from None
        verify_bytes(raw, digest, f"{self.describe()}: manifest")
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise UnsupportedImageError(f"{self.describe()}: manifest {digest} is not JSON: {exc}") from None
        return RawManifest(raw, sniff_media_type(data, declared), digest)

    def blob_bytes(self, digest: str) -> bytes:
        try:
            data = blob_path(self.layout, digest).read_bytes()
        except FileNotFoundError:
            raise ImageNotFoundError(f"{self.describe()}: blob {digest} is missing") from None
        verify_bytes(data, digest, f"{self.describe()}: blob")
        return data

    def blob_file(self, digest: str, size: int, tmpdir: Path) -> Path:
        path = blob_path(self.layout, digest)
        if not path.is_file():
            raise ImageNotFoundError(f"{self.describe()}: layer blob {digest} is missing")
        return path

    def close(self) -> None:
        pass


class OciLayoutDestination:
    def __init__(self, location: OciLocation) -> None:
        self.location = location
        self.layout = location.path

    def describe(self) -> str:
        return str(self.location)

    def prepare(self) -> None:
        """Create the layout (or check an existing one) once the source is known to exist."""
        if self.layout.exists() and not self.layout.is_dir():
            raise UnsupportedImageError(f"{self.describe()}: {self.layout} exists and is not a directory")
        (self.layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        layout_file = self.layout / "oci-layout"
        if not layout_file.exists():
            self._atomic_write(layout_file, json.dumps({"imageLayoutVersion": "1.0.0"}).encode())

    def tmpdir_parent(self) -> Path | None:
        return self.layout  # same filesystem as blobs/: converted layers are renamed, not copied

    def put_blob_file(self, digest: str, path: Path) -> None:
        target = blob_path(self.layout, digest)
        if target.exists():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(path, target)
        except OSError:
            tmp = target.with_name(f".{target.name}.tmp")
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)

    def put_blob_bytes(self, digest: str, data: bytes) -> None:
        target = blob_path(self.layout, digest)
        if target.exists():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        self._atomic_write(target, data)

    def put_manifest(self, manifest: RawManifest, root: bool) -> None:
        self.put_blob_bytes(manifest.digest, manifest.raw)
        if root:
            self._tag(manifest)

    def _tag(self, manifest: RawManifest) -> None:
        """Point the tag at `manifest` in index.json (an untagged destination replaces untagged entries).

        The read-modify-write holds an flock on the layout directory, so two conversions into the
        same layout never drop each other's tag.
        """
        fd = os.open(self.layout, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._tag_locked(manifest)
        finally:
            os.close(fd)

    def _tag_locked(self, manifest: RawManifest) -> None:
        index_path = self.layout / "index.json"
        try:
            index = json.loads(index_path.read_bytes())
        except FileNotFoundError:
            index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
        tag = self.location.tag
        kept = [m for m in index.get("manifests", []) if m.get("annotations", {}).get(REF_NAME) != tag]
        descriptor: dict = {"mediaType": manifest.media_type, "digest": manifest.digest, "size": len(manifest.raw)}
        if tag is not None:
            descriptor["annotations"] = {REF_NAME: tag}
        index["manifests"] = kept + [descriptor]
        self._atomic_write(index_path, json.dumps(index, indent=2).encode())
        log.info("tagged %s in %s", manifest.digest, self.describe())

    @staticmethod
    def _atomic_write(target: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                os.fchmod(f.fileno(), 0o666 & ~_UMASK)  # mkstemp's 0600 would hide the layout from other users
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def close(self) -> None:
        pass
