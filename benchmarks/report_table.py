"""Print the markdown table of one pytest-benchmark JSON file (see vdit/bench/tables.py for the
conventions benchmark modules follow).

    pytest benchmarks/bench_x.py --benchmark-only --benchmark-json=out.json
    python -m benchmarks.report_table out.json --title "patch embedding"
"""
from __future__ import annotations

import argparse
import json

from vdit.bench.tables import markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file")
    parser.add_argument("--title", default="benchmark")
    args = parser.parse_args()
    with open(args.json_file) as f:
        print(markdown_table(json.load(f), args.title))


if __name__ == "__main__":
    main()
