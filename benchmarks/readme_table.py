"""Write a markdown table into README.md between `<!-- results:NAME -->` and `<!-- /results:NAME -->`.

Benchmarks call `write_table(name, header, rows, note)`; nothing in a results table is typed by hand.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_table(name: str, header: list[str], rows: list[list[str]], note: str = "",
                readme: Path = README) -> None:
    start, end = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
    text = readme.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{readme} has no {start} ... {end} block; add the two markers where the table goes")
    body = markdown_table(header, rows) + (f"\n\n{note}" if note else "")
    new = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: f"{start}\n{body}\n{end}", text,
                 flags=re.S)
    tmp = readme.with_suffix(".md.tmp")
    tmp.write_text(new)
    os.replace(tmp, readme)
