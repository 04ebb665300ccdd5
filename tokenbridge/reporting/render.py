"""Blocks to files: Markdown that diffs well in Git, and one self-contained HTML page (inline CSS, plots as data
URIs, no scripts, nothing fetched) that MLflow shows as an artifact."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from tokenbridge.io import write_text
from tokenbridge.reporting.document import Block, Heading, Image, Paragraph, Table

PRIMARY_CLASS = ' class="primary"'
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 62rem; margin: 2rem auto;
       padding: 0 1rem; color: #222; line-height: 1.5; }
table { border-collapse: collapse; margin: 0.75rem 0; font-size: 0.92rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
table.numbers td { text-align: right; font-variant-numeric: tabular-nums; }
table.numbers td:first-child { text-align: left; }
.primary { background: #fff4cc; }
th.primary { background: #ffe799; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: 0.9rem; }
"""


def write_document(out_dir: Path, stem: str, title: str, blocks: Sequence[Block],
                   images: Mapping[str, Path]) -> dict[str, Path]:
    """out_dir/<stem>.md and out_dir/<stem>.html; `images` maps each Image block's name to its PNG under plots/."""
    paths = {"markdown": Path(out_dir) / f"{stem}.md", "html": Path(out_dir) / f"{stem}.html"}
    write_text(paths["markdown"], markdown(title, blocks))
    embedded = {name: path.read_bytes() for name, path in images.items()}
    write_text(paths["html"], standalone_html(title, blocks, embedded))
    return paths


def _markdown_text(text: str) -> str:
    """Neutralise only a `<` that could open an HTML tag, so `0.1 <= 0.2` stays readable in a diff."""
    return re.sub(r"<(?=[A-Za-z/!?])", "&lt;", text)


def _markdown_cell(text: str) -> str:
    return _markdown_text(text).replace("|", "\\|").replace("\n", " ")


def markdown(title: str, blocks: Sequence[Block]) -> str:
    lines = [f"# {_markdown_text(title)}", ""]
    for block in blocks:
        match block:
            case Heading(text, level):
                lines += [f"{'#' * level} {_markdown_text(text)}", ""]
            case Paragraph(text):
                lines += [_markdown_text(text), ""]
            case Table(header, rows, numbers):
                align = ["---", *(["---:" if numbers else "---"] * (len(header) - 1))]
                lines += ["| " + " | ".join(map(_markdown_cell, row)) + " |" for row in [header, align, *rows]] + [""]
            case Image(name, caption):
                lines += [f"![{_markdown_text(caption)}](plots/{name}.png)", ""]
    return "\n".join(lines)


def _html_table(table: Table) -> str:
    def cells(tag: str, row: Sequence[str]) -> str:
        return "".join(f"<{tag}{PRIMARY_CLASS if index == table.marked_column else ''}>{html.escape(text)}</{tag}>"
                       for index, text in enumerate(row))

    classes = ' class="numbers"' if table.numbers else ""
    body = "\n".join(f"<tr>{cells('td', row)}</tr>" for row in table.rows)
    return f"<table{classes}>\n<thead><tr>{cells('th', table.header)}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def standalone_html(title: str, blocks: Sequence[Block], images: Mapping[str, bytes]) -> str:
    """A single self-contained page: inline CSS, plots as data URIs, no scripts, nothing fetched."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    for block in blocks:
        match block:
            case Heading(text, level):
                parts.append(f"<h{level}>{html.escape(text)}</h{level}>")
            case Paragraph(text):
                parts.append(f"<p>{html.escape(text)}</p>")
            case Table():
                parts.append(_html_table(block))
            case Image(name, caption):
                data = base64.b64encode(images[name]).decode("ascii")
                parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
                             f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")
