"""One self-contained HTML file per run: tables, curves and per-image panels, pictures embedded
as data URIs so the file opens in any browser with no server and no folder beside it."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Sequence

from PIL import Image

from .files import atomic_write_text
from .pictures import FOLDERS, Picture

STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #bbb; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
figure { display: inline-block; margin: 4px; vertical-align: top; }
figcaption { font-size: 12px; }
.curves img { height: 260px; }
details { margin: 0.3em 0; }
"""
OUTCOME_TITLES = {"FP": "false positives (good parts called DEFECT)", "FN": "false negatives (defects called OK)",
                  "TP": "true positives", "TN": "true negatives", "defective": "defective", "good": "good"}


def data_uri(path: str | Path, max_width: int = 720) -> str:
    """The picture as a JPEG data URI, scaled down to max_width."""
    image = Image.open(path).convert("RGB")
    if image.width > max_width:
        image = image.resize((max_width, round(image.height * max_width / image.width)), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def figure(path: str | Path, caption: str, max_width: int = 720) -> str:
    return f'<figure><img src="{data_uri(path, max_width)}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'


def evaluation_section(heading: str, curves: dict[str, Path], pictures: Sequence[Picture], note: str = "") -> str:
    """Curves, then the per-image panels grouped by outcome, errors first (open by default)."""
    parts = [f"<h3>{html.escape(heading)}</h3>"]
    if note:
        parts.append(f"<p>{html.escape(note)}</p>")
    parts.append('<div class="curves">' + "".join(figure(p, name, 480) for name, p in curves.items()) + "</div>")
    for name in FOLDERS:
        group = [p for p in pictures if p.outcome == name]
        if group:
            opened = " open" if name in ("FP", "FN") else ""
            items = "".join(figure(p.path, p.caption) for p in group)
            parts.append(f"<details{opened}><summary>{name}: {OUTCOME_TITLES[name]} ({len(group)})</summary>{items}</details>")
    return "\n".join(parts)


def write_html(path: str | Path, title: str, sections: Sequence[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "\n".join(sections)
    atomic_write_text(
        path,
        f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n",
    )
    return path
