"""``python -m binaryconnect`` and the ``binaryconnect`` command.

PyTorch takes a second or more to import: this entry point imports the command line (and with it PyTorch)
inside its own handler, so that Ctrl-C while it loads ends with one line and exit code 130, as it does later.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        print("binaryconnect: interrupted", file=sys.stderr)
        return 130
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
