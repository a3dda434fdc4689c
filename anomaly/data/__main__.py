"""Check an MVTec-layout category: `python -m anomaly.data root=R category=C [dtd_root=D]`.

Prints one JSON object (counts, masks, image sizes and modes, `problems`) and exits 0 when there are
no problems, 1 otherwise. With `dtd_root`, the texture files are decoded too: the object adds
`dtd_root` and `num_textures`, and `problems` lists the textures that do not decode.
"""

from __future__ import annotations

import json
import sys

from anomaly.data.mvtec import check_category
from anomaly.data.textures import TextureSource, check_textures
from anomaly.errors import DatasetError

USAGE = "usage: python -m anomaly.data root=PATH category=NAME [dtd_root=PATH]"
KEYS = ("root", "category", "dtd_root")


def parse_args(argv: list[str]) -> dict[str, str] | None:
    """The `key=value` arguments (a `data.` prefix is dropped), or None after printing an error."""
    args = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.removeprefix("data.")
        if not sep or key not in KEYS:
            print(f"error: unexpected argument '{arg}'; {USAGE}", file=sys.stderr)
            return None
        args[key] = value
    if "root" not in args:
        print(f"error: root is required; {USAGE}", file=sys.stderr)
        return None
    return args


def add_textures(report: dict, dtd_root: str) -> None:
    """Add the texture folder, its number of files and its problems to a category report."""
    try:
        num_textures = len(TextureSource(dtd_root))
    except DatasetError:
        num_textures = 0  # check_textures reports why
    problems = report.pop("problems") + check_textures(dtd_root)
    report.update(dtd_root=dtd_root, num_textures=num_textures, problems=problems)


def main(argv: list[str]) -> int:
    """Check the category (and textures) named by `argv`; the exit code (0 clean, 1, 2 usage)."""
    args = parse_args(argv)
    if args is None:
        return 2
    report = check_category(args["root"], args.get("category", "capsule"))
    if "dtd_root" in args:
        add_textures(report, args["dtd_root"])
    print(json.dumps(report, indent=2))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
