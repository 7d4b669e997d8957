"""Reading nerdctl/ctr-remote record files (`estargz.md` §8.4) into the paths to prioritize.

Two flavours are read:
- nerdctl's (`{"path": "..."}` a line): one list, applied to every layer (`Record.paths`);
- ctr-remote optimize's and `stargz-store record`'s (`path`, `manifestDigest`, `layerIndex`, and
  any other keys): when every line has a `layerIndex`, one list per layer (`Record.by_layer`), so a
  layer no recorded file came from gets `.no.prefetch.landmark` and a file shadowed by an upper
  layer is not prefetched from the lower one. `manifestDigest` is not checked: a record made on
  the unoptimized copy of an image (`stargz-store optimize`) names that copy's manifest, and the
  layers of a converted image match its source's one for one.
"""
from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from pathlib import Path

from .errors import RecordFileError

MAX_LAYER_INDEX = 4096


@dataclass(frozen=True)
class Record:
    """The paths of a record file in first-read order (first occurrence kept), and per layer
    index when the file says which layer each came from (None otherwise)."""

    paths: tuple[str, ...]
    by_layer: tuple[tuple[str, ...], ...] | None = None


def normalize_record_path(path: str) -> str:
    """`foo/bar`, `/foo/bar`, `./foo/bar` and `../foo/bar` all name `foo/bar` inside a layer."""
    return posixpath.normpath("/" + path).lstrip("/")


def _objects(text: str, source: str):
    """(line, object) of whitespace-separated JSON objects, each with a string `path`."""
    decoder = json.JSONDecoder()
    pos, n = 0, len(text)
    while True:
        while pos < n and text[pos].isspace():
            pos += 1
        if pos >= n:
            return
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise RecordFileError(f"{source}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
        line = text.count("\n", 0, pos) + 1
        if not isinstance(obj, dict) or not isinstance(obj.get("path"), str):
            raise RecordFileError(f'{source}: line {line}: expected an object with a string "path"')
        yield line, obj
        pos = end


def parse_record_file(text: str, source: str = "record file") -> Record:
    """Both flavours (module docstring). The root itself (`/`) prioritizes nothing and is dropped."""
    paths: list[str] = []
    seen: set[str] = set()
    layered: dict[int, dict[str, None]] = {}
    all_indexed = True
    for line, obj in _objects(text, source):
        path = normalize_record_path(obj["path"])
        index = obj.get("layerIndex")
        if index is None:
            all_indexed = False
        elif isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < MAX_LAYER_INDEX:
            raise RecordFileError(f'{source}: line {line}: "layerIndex" must be an integer from 0 to {MAX_LAYER_INDEX - 1}')
        if not path:
            continue
        if path not in seen:
            seen.add(path)
            paths.append(path)
        if index is not None:
            layered.setdefault(index, {})[path] = None
    by_layer = None
    if all_indexed and layered:
        by_layer = tuple(tuple(layered.get(i, {})) for i in range(max(layered) + 1))
    return Record(tuple(paths), by_layer)


def parse_record(text: str, source: str = "record file") -> list[str]:
    """Paths of whitespace-separated JSON objects, in file order, first occurrence kept."""
    return list(parse_record_file(text, source).paths)


def read_record(path: Path | str) -> Record:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordFileError(f"cannot read record file {path}: {exc}") from None
    return parse_record_file(text, str(path))


def read_record_file(path: Path | str) -> list[str]:
    return list(read_record(path).paths)
