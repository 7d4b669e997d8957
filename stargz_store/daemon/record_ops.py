"""The control socket's recording operations (`fs.recorder`), served by `control_ops`.

- `record-start {"image": REF | "*"}` -> `{"image": canonical, "layers": N}`: record this image's
  first reads from now on (the layers it already resolved are recorded at once: the kernel may
  have looked their `diff` up before, and will not again); `"clear": true` forgets what its layers
  recorded before, so a new run starts from an empty record;
- `record-stop {"image": REF | "*"}` -> `{"image": ..., "was_recording": bool}`;
- `record {"image": REF, "offset": N, "limit": M}` -> `{"entries": [...], "next": N | null,
  "manifestDigest": ..., "recording": bool}`: the image's record lines (`fs.recorder.record_entries`),
  a page at a time: a reply is one line of at most `control.MAX_REPLY` bytes, and a large image's
  record is more than that.

The image must be resolved for `record` (its manifest names its layers); asking for it resolves
it when it is not (a lookup the store would make for Podman anyway).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

from ..fs.errors import FsError
from ..fs.recorder import ALL_IMAGES, AccessRecorder, record_entries
from .control import ControlRequestError, Operation

DEFAULT_PAGE = 2000  # record lines per reply: well under control.MAX_REPLY (a line is ~300 bytes)
MAX_PAGE = 3000


class RecordOps:
    """The three operations over one recorder and the image pool (for an image's layers)."""

    def __init__(self, pool: Any, recorder: AccessRecorder) -> None:
        self.pool = pool
        self.recorder = recorder

    def operations(self) -> dict[str, Operation]:
        return {"record-start": self.start, "record-stop": self.stop, "record": self.record}

    def _image(self, request: Mapping[str, Any], *, allow_all: bool) -> str:
        image = request.get("image")
        if not isinstance(image, str) or not image:
            raise ControlRequestError('request has no "image"')
        if image == ALL_IMAGES:
            if not allow_all:
                raise ControlRequestError('"*" names no single image: give its reference')
            return image
        try:
            return self.pool.canonical_ref(image)
        except FsError as exc:
            raise ControlRequestError(str(exc)) from None

    def _layers(self, image: str) -> tuple[list[str], str]:
        """The image's layer blob digests in manifest order, and its manifest digest (resolving it)."""
        try:
            files = self.pool.image_files(image)
        except FsError as exc:
            raise ControlRequestError(f"{image}: {exc}") from None
        try:
            manifest = json.loads(files.manifest)
            layers = [str(layer["digest"]) for layer in manifest.get("layers") or []]
        except (ValueError, TypeError, KeyError):
            raise ControlRequestError(f"{image}: its manifest lists no layers") from None
        return layers, "sha256:" + hashlib.sha256(files.manifest).hexdigest()

    def start(self, request: Mapping[str, Any]) -> Mapping[str, Any]:
        image = self._image(request, allow_all=True)
        self.recorder.start(image)
        layers: list[str] = []
        if image != ALL_IMAGES and self.pool.resolved(image):
            layers, _ = self._layers(image)
            if request.get("clear"):
                self.recorder.clear(layers)
            self.recorder.add_layers(image, layers)
        return {"image": image, "layers": len(layers)}

    def stop(self, request: Mapping[str, Any]) -> Mapping[str, Any]:
        image = self._image(request, allow_all=True)
        return {"image": image, "was_recording": self.recorder.stop(image)}

    def record(self, request: Mapping[str, Any]) -> Mapping[str, Any]:
        image = self._image(request, allow_all=False)
        offset, limit = request.get("offset", 0), request.get("limit", DEFAULT_PAGE)
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise ControlRequestError('"offset" must be an integer >= 0')
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_PAGE:
            raise ControlRequestError(f'"limit" must be an integer from 1 to {MAX_PAGE}')
        layers, manifest_digest = self._layers(image)
        entries = record_entries(self.recorder.reads_in(layers), layers, manifest_digest,
                                 self.recorder.started(image))
        page = entries[offset:offset + limit]
        following = offset + len(page)
        return {"entries": page, "next": following if following < len(entries) else None,
                "manifestDigest": manifest_digest, "recording": self.recorder.recording(image)}
