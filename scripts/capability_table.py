"""Print the capability table of every op's declared kernels, or write it into a markdown file.

    python scripts/capability_table.py                               # print it
    python scripts/capability_table.py --update docs/architecture.md # replace the copy between the markers

The table is ``vdit.ops._registry.capability_table()`` of this checkout's vdit; tests/ops/test_registry.py
checks that docs/architecture.md embeds the current one.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's vdit, not another installed one

import vdit.ops  # noqa: E402, F401  (importing the ops declares their kernels)
from vdit.ops import _registry  # noqa: E402

START, END = "<!-- capability-table -->\n", "<!-- /capability-table -->"


def update_doc(path: str) -> None:
    """Replace the table between the ``<!-- capability-table -->`` markers in ``path`` with the current one."""
    with open(path) as f:
        text = f.read()
    if START not in text or END not in text:
        raise ValueError(f"path {path!r} has no {START.strip()} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w") as f:
        f.write(head + START + _registry.capability_table() + "\n" + END + tail)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", metavar="PATH", help="markdown file whose table to replace")
    args = parser.parse_args(argv)
    if args.update:
        update_doc(args.update)
    else:
        print(_registry.capability_table())


if __name__ == "__main__":
    main()
