"""`stargz-store`: the daemon (`stargz-store [flags] MOUNTPOINT`) and its tools (`stargz-store convert ...`,
`stargz-store auth-helper`, which is also installed as `stargz-store-helper`)."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "convert":
        from .convert.cli import main as convert_main

        return convert_main(args[1:])
    if args and args[0] == "auth-helper":
        from .daemon.auth_helper import main as helper_main

        return helper_main(args[1:])
    from .daemon.cli import main as daemon_main

    return daemon_main(args)


if __name__ == "__main__":
    sys.exit(main())
