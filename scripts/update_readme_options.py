#!/usr/bin/env python3
"""Rewrite the README's options table from the option declarations (yeastarfs.config.OPTIONS).

The table stands between the ``<!-- options:begin -->`` and ``<!-- options:end -->`` lines;
tests/unit/test_config.py fails while it differs from ``config.options_markdown()``.
Run after adding or changing an option: ``.venv/bin/python scripts/update_readme_options.py``.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from yeastarfs.config import OPTIONS_BEGIN, OPTIONS_END, options_markdown  # noqa: E402

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def main() -> int:
    text = README.read_text(encoding="utf-8")
    before, begin, rest = text.partition(OPTIONS_BEGIN + "\n")
    _, end, after = rest.partition(OPTIONS_END)
    if not begin or not end:
        print(f"update_readme_options: {README} lacks the {OPTIONS_BEGIN} / {OPTIONS_END} lines", file=sys.stderr)
        return 1
    updated = before + begin + options_markdown() + end + after
    if updated != text:
        README.write_text(updated, encoding="utf-8")
        print(f"update_readme_options: {README} updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
