"""Check an MVTec-layout category: `python -m anomaly.data root=R category=C`.

Prints one JSON object (counts, masks, image sizes and modes, `problems`) and exits 0 when there are
no problems, 1 otherwise.
"""

from __future__ import annotations

import json
import sys

from anomaly.data.mvtec import check_category

USAGE = "usage: python -m anomaly.data root=PATH category=NAME"


def main(argv: list[str]) -> int:
    args = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.removeprefix("data.")
        if not sep or key not in ("root", "category"):
            print(f"error: unexpected argument '{arg}'; {USAGE}", file=sys.stderr)
            return 2
        args[key] = value
    if "root" not in args:
        print(f"error: root is required; {USAGE}", file=sys.stderr)
        return 2
    report = check_category(args["root"], args.get("category", "capsule"))
    print(json.dumps(report, indent=2))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
