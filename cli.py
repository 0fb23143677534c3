"""The `bnserve` command line."""

import sys


def main(argv: list[str] | None = None) -> int:
    print("hello", argv or sys.argv[1:])
    return 0
