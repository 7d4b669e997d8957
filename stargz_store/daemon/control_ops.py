"""The operations the daemon serves on its control socket, and starting that socket.

    control = start_control_socket(args.addr or root / SOCKET_NAME, pool)   # after build_store
    ...
    control.close()                                                          # when stopping

Operations (requests and replies as in `control`):
- `ping` -> `{"pid": ..., "version": ...}`: is a daemon there, which one;
- `status`, `prune`: see `operations` (`stargz-store status`, `stargz-store prune`);
- `add-credentials` `{"credentials": {"<ref>": {"username", "password", "identityToken"}}}`
  -> `{"references": N}`: what `stargz-store-helper` forwards from containers/image. The
  credentials replace what was known for each reference (memory only, see
  `registry.runtime_credentials`); a reference whose credentials changed has its remembered
  failures forgotten, so the pull that brought them is not answered from an earlier failure
  (e.g. a lookup made before the runtime had logged in).
- `record-start`, `record-stop`, `record`: first reads of images (`record_ops`), when the daemon
  passed its recorder.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from ..registry.runtime_credentials import RuntimeCredentialsError, parse_helper_document
from ..fs.recorder import AccessRecorder
from .control import ControlRequestError, ControlServer, Operation
from .record_ops import RecordOps

log = logging.getLogger(__name__)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("stargz-store")
    except Exception:  # not installed (run from a checkout)
        return "unknown"


class AddCredentials:
    """`add-credentials`: the runtime's credentials for image references, into the registry client."""

    def __init__(self, pool: Any, on_accepted: Callable[[Any], None] | None = None) -> None:
        self.pool = pool
        self.on_accepted = on_accepted  # the restart holder keeps accepted documents for the next process

    def __call__(self, request: Mapping[str, Any]) -> Mapping[str, Any]:
        try:
            entries = parse_helper_document(request.get("credentials"))
        except RuntimeCredentialsError as exc:
            raise ControlRequestError(str(exc)) from None
        if self.on_accepted is not None:
            self.on_accepted(request.get("credentials"))
        changed = self.pool.client.runtime_credentials.update(entries)
        for ref in changed:
            self.pool.forget_failures(ref)
        for ref, creds in entries.items():  # references only: never a secret
            state = ("removed" if creds is None else "updated") if ref in changed else "unchanged"
            log.log(logging.INFO if ref in changed else logging.DEBUG, "credentials from the runtime for %s: %s",
                    ref, state)
        return {"references": len(entries)}


def daemon_operations(pool: Any, more: Mapping[str, Operation] | None = None,
                      recorder: AccessRecorder | None = None,
                      on_credentials: Callable[[Any], None] | None = None) -> dict[str, Operation]:
    """The daemon's operations by name: these, `more` (`operations.Operations`: status, prune),
    with a `recorder` the recording operations; `on_credentials` hears of accepted credentials
    (the serving process reports them to the holder, for the next process)."""
    pid = os.getpid()
    version = _version()
    operations: dict[str, Operation] = {
        "ping": lambda request: {"pid": pid, "version": version},
        "add-credentials": AddCredentials(pool, on_credentials),
        **(more or {}),
    }
    if recorder is not None:
        operations.update(RecordOps(pool, recorder).operations())
    return operations


class _NoControl:
    """Stands in when the socket could not be made: the daemon serves on without it."""

    def close(self) -> None:
        pass


def start_control_socket(address: str | os.PathLike[str], pool: Any,
                         more: Mapping[str, Operation] | None = None,
                         recorder: AccessRecorder | None = None,
                         on_credentials: Callable[[Any], None] | None = None) -> ControlServer | _NoControl:
    """Serve `daemon_operations(pool, more, recorder, on_credentials)` at `address`; on failure log why
    and go on without it (lazy pulls of public images do not need it; credentials from the runtime
    then do not arrive)."""
    try:
        return ControlServer(address, daemon_operations(pool, more, recorder, on_credentials)).start()
    except (OSError, ValueError) as exc:
        log.error("cannot serve the control socket at %s (%s): credentials from Podman/CRI-O will not "
                  "reach this daemon", Path(os.fspath(address)), getattr(exc, "strerror", None) or exc)
        return _NoControl()
