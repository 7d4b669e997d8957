"""What the pool keeps on disk: each image's manifest and config, and the layer numbers.

Both exist so that a restarted daemon (or, with issue 14, a process taking over the mount)
answers as the last one did:
- `MetadataStore`: `<root>/pool/metadata--sha256-<hex(sha256(ref))>/{manifest,config,meta.json}`
  (the Go store's layout). A restarted daemon re-serves the layers containers/storage already
  linked without asking the registry, even for a tag that has moved since. At most `max_images`
  are kept: beyond that the least recently used ones that the pool does not hold are removed,
  as the Go store deletes the directory of a ref it evicts.
- `LayerNumbers`: `<root>/layer-numbers`, one JSON line `[number, ref, blob digest]` per layer of
  a kept image. A layer's number is the high half of every inode number in its tree
  (`fs.inodes`), so it must not change while the kernel may hold one of them: it is assigned once,
  appended and fsync'd before any node of the layer is shown, loaded at start, and dropped only
  with its image's metadata (when nothing holds the image). Numbers are never reused.

Every write is atomic (a temporary file renamed into place, or one appended line); a damaged
file is reported and ignored, never fatal.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Callable, Iterable

from ..registry.client import Manifest
from ..registry.errors import RegistryError
from ..registry.manifest import sha256_digest

log = logging.getLogger(__name__)

METADATA_PREFIX = "metadata--sha256-"
META_FILE = "meta.json"


class MetadataStore:
    """Manifest and config per reference under `directory` (None: keep nothing)."""

    def __init__(self, directory: Path | None, max_images: int = 256) -> None:
        self.directory = directory
        self.max_images = max_images

    def path(self, ref: str) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / f"{METADATA_PREFIX}{hashlib.sha256(ref.encode()).hexdigest()}"

    def exists(self, ref: str) -> bool:
        path = self.path(ref)
        return path is not None and (path / META_FILE).exists()

    def save(self, ref: str, manifest: Manifest, config_raw: bytes) -> None:
        path = self.path(ref)
        if path is None:
            return
        try:
            path.mkdir(parents=True, exist_ok=True)
            meta = {"ref": ref, "manifest_digest": manifest.digest, "media_type": manifest.media_type}
            for name, data in (("manifest", manifest.raw), ("config", config_raw), (META_FILE, json.dumps(meta).encode())):
                tmp = path / f".{name}.tmp"
                tmp.write_bytes(data)
                tmp.replace(path / name)
        except OSError as e:
            log.warning("cannot keep metadata of %s on disk: %s", ref, e)

    def load(self, ref: str) -> tuple[Manifest, bytes] | None:
        """The kept manifest and config of `ref`, if they are there and still match each other."""
        if not self.exists(ref):
            return None
        path = self.path(ref)
        assert path is not None
        try:
            meta = json.loads((path / META_FILE).read_text())
            raw = (path / "manifest").read_bytes()
            config_raw = (path / "config").read_bytes()
            if meta.get("ref") != ref or sha256_digest(raw) != meta["manifest_digest"]:
                raise ValueError("manifest does not match its recorded digest")
            manifest = Manifest.from_raw(raw, meta["media_type"], meta["manifest_digest"])
            if sha256_digest(config_raw) != manifest.config["digest"]:
                raise ValueError("config does not match the manifest")
            os.utime(path / META_FILE)  # used now: the last to be pruned
        except (OSError, ValueError, KeyError, RegistryError) as e:
            log.warning("ignoring cached metadata of %s: %s", ref, e)
            return None
        return manifest, config_raw

    def remove(self, ref: str) -> None:
        path = self.path(ref)
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)

    def prune(self, keep: Callable[[str], bool]) -> list[str]:
        """Remove the least recently used images beyond `max_images` for which `keep(ref)` is
        false; returns their references."""
        if self.directory is None:
            return []
        kept: list[tuple[float, str, Path]] = []
        try:
            dirs = [d for d in self.directory.iterdir() if d.name.startswith(METADATA_PREFIX)]
        except OSError:
            return []
        if len(dirs) <= self.max_images:
            return []
        for d in dirs:
            try:
                ref = json.loads((d / META_FILE).read_text())["ref"]
                kept.append(((d / META_FILE).stat().st_mtime, ref, d))
            except (OSError, ValueError, KeyError, TypeError):
                kept.append((0.0, "", d))  # unreadable: the first to go
        kept.sort()
        removed: list[str] = []
        excess = len(kept) - self.max_images
        for _, ref, d in kept:
            if excess <= 0:
                break
            if ref and keep(ref):
                continue
            shutil.rmtree(d, ignore_errors=True)
            removed.append(ref)
            excess -= 1
        if removed:
            log.info("removed the kept metadata of %d unused image(s)", len(removed))
        return [r for r in removed if r]


class LayerNumbers:
    """(ref, blob digest) -> layer number, kept in `path` (None: in memory only). Thread-safe."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._numbers: dict[tuple[str, str], int] = {}
        self._layers: dict[int, tuple[str, str]] = {}
        self._next = 1
        self._lock = threading.Lock()
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            text = path.read_text()
        except FileNotFoundError:
            return
        except OSError as e:
            log.warning("cannot read layer numbers %s: %s; numbering anew", path, e)
            return
        for line in text.splitlines():
            try:
                record = json.loads(line)
                if isinstance(record, dict):
                    self._next = max(self._next, int(record["next"]))
                    continue
                number, ref, digest = int(record[0]), str(record[1]), str(record[2])
            except (ValueError, KeyError, IndexError, TypeError):
                log.warning("ignoring a damaged line of %s: %.80r", path, line)
                continue
            self._numbers[(ref, digest)] = number
            self._layers[number] = (ref, digest)
            self._next = max(self._next, number + 1)

    def numbers(self, ref: str, digests: Iterable[str]) -> dict[str, int]:
        """The number of each layer `digest` of `ref`, new ones assigned and kept on disk first."""
        with self._lock:
            out: dict[str, int] = {}
            new: list[tuple[int, str, str]] = []
            for digest in digests:
                number = self._numbers.get((ref, digest))
                if number is None:
                    number = self._next
                    self._next += 1
                    self._numbers[(ref, digest)] = number
                    self._layers[number] = (ref, digest)
                    new.append((number, ref, digest))
                out[digest] = number
            if new:
                self._append(new)
            return out

    def layer(self, number: int) -> tuple[str, str] | None:
        """(ref, blob digest) of layer `number`, if it is known. An unknown number is looked for
        on disk again: the process that served this mount before us (restart hand-over) may
        have numbered layers after we loaded the file."""
        found = self._layers.get(number)
        if found is None and self.path is not None:
            with self._lock:
                self._load(self.path)
                found = self._layers.get(number)
        return found

    def prune(self, refs: Iterable[str]) -> int:
        """Forget the numbers of every layer of `refs` (their metadata is gone); returns how many."""
        drop = set(refs)
        with self._lock:
            gone = [key for key in self._numbers if key[0] in drop]
            for key in gone:
                del self._layers[self._numbers.pop(key)]
            if gone:
                self._rewrite()
            return len(gone)

    def __len__(self) -> int:
        return len(self._numbers)

    def _append(self, records: list[tuple[int, str, str]]) -> None:
        if self.path is None:
            return
        data = "".join(json.dumps(list(r)) + "\n" for r in records).encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            log.warning("cannot keep layer numbers in %s: %s; a restart numbers these layers anew", self.path, e)

    def _rewrite(self) -> None:
        if self.path is None:
            return
        lines = [json.dumps({"next": self._next})] + [json.dumps([n, r, d]) for (r, d), n in self._numbers.items()]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            with open(tmp, "w") as f:
                f.write("\n".join(lines) + "\n")
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(self.path)
        except OSError as e:
            log.warning("cannot rewrite layer numbers %s: %s", self.path, e)
