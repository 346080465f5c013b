"""The report's document model: a list of blocks (headings, paragraphs, tables, images, code)
rendered twice, to Markdown (``report.md``) and to one self-contained HTML page (images inlined as
base64 PNGs), so that the two never disagree."""

from __future__ import annotations

import base64
import hashlib
import html
import re
from dataclasses import dataclass, field
from typing import Any, Iterable


MAX_NAME = 100  # characters of a token: a file name "samples_<token>.png" stays far below the usual 255-byte limit


def _plain_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def safe_name(text: str, others: Iterable[str] = ()) -> str:
    """``text`` reduced to a file-name and anchor-safe token of at most ``MAX_NAME`` characters.

    An ordinary name keeps its plain token ("teacher/ocr" -> "teacher_ocr"), so the file names of
    reports already built stay. A short hash of the full name is appended where the plain token
    would not tell names apart: a name cut to fit, or one changed to a token that another name of
    ``others`` (the names sharing the folder) also gives ("teacher/ocr" beside "teacher_ocr")."""
    token = _plain_name(text)
    clash = token != text and any(other != text and _plain_name(other) == token for other in others)
    if len(token) <= MAX_NAME and not clash:
        return token
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]
    return f"{token[:MAX_NAME - len(digest) - 1].rstrip('_')}-{digest}"


@dataclass
class Cell:
    text: str
    bold: bool = False


@dataclass
class Block:
    kind: str  # h1 h2 h3 p note list table img code details
    text: str = ""
    items: list = field(default_factory=list)  # list items / table rows
    headers: list = field(default_factory=list)
    png: bytes = b""  # img
    file: str = ""  # img: file name relative to out_dir


class Doc:
    def __init__(self) -> None:
        self.blocks: list[Block] = []

    def h(self, level: int, text: str) -> None:
        self.blocks.append(Block(f"h{level}", text))

    def p(self, text: str) -> None:
        self.blocks.append(Block("p", text))

    def note(self, text: str) -> None:
        self.blocks.append(Block("note", text))

    def list(self, items: list[str], ordered: bool = False) -> None:
        self.blocks.append(Block("list", "ol" if ordered else "ul", items=list(items)))

    def table(self, headers: list[str], rows: list[list[Any]]) -> None:
        rows = [[c if isinstance(c, Cell) else Cell(str(c)) for c in row] for row in rows]
        self.blocks.append(Block("table", headers=list(headers), items=rows))

    def img(self, file: str, png: bytes, caption: str) -> None:
        self.blocks.append(Block("img", caption, png=png, file=file))

    def code(self, text: str) -> None:
        self.blocks.append(Block("code", text))

    def details(self, summary: str, text: str) -> None:
        self.blocks.append(Block("details", summary, items=[text]))


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_fence(text: str) -> str:
    fence = "```"
    while fence in text:
        fence += "`"
    return fence


def render_markdown(doc: Doc) -> str:
    out: list[str] = []
    for b in doc.blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append("#" * int(b.kind[1]) + " " + b.text)
        elif b.kind == "p":
            out.append(b.text)
        elif b.kind == "note":
            out.append(f"> {b.text}")
        elif b.kind == "list":
            out.append("\n".join(
                f"{i}. {item}" if b.text == "ol" else f"- {item}" for i, item in enumerate(b.items, start=1)
            ))
        elif b.kind == "table":
            lines = ["| " + " | ".join(_md_cell(h) for h in b.headers) + " |",
                     "|" + "|".join("---" for _ in b.headers) + "|"]
            for row in b.items:
                cells = [f"**{_md_cell(c.text)}**" if c.bold else _md_cell(c.text) for c in row]
                lines.append("| " + " | ".join(cells) + " |")
            out.append("\n".join(lines))
        elif b.kind == "img":
            out.append(f"![{_md_cell(b.text)}]({b.file})\n\n*{b.text}*")
        elif b.kind == "code":
            fence = _md_fence(b.text)
            out.append(f"{fence}\n{b.text}\n{fence}")
        elif b.kind == "details":
            fence = _md_fence(b.items[0])
            out.append(f"<details><summary>{html.escape(b.text)}</summary>\n\n{fence}json\n{b.items[0]}\n{fence}\n\n</details>")
    return "\n\n".join(out) + "\n"


CSS = """
body{font-family:-apple-system,BlinkMacSystemFont,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1180px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #ddd;padding-bottom:.2em}h2{border-bottom:1px solid #eee;margin-top:1.8em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.9em;color:#555}
.note{color:#666;font-style:italic;border-left:3px solid #ddd;padding-left:.6em}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.85em}
img.grid{image-rendering:pixelated;min-width:240px}
"""


def render_html(doc: Doc, title: str) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{e(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>"]
    for b in doc.blocks:
        if b.kind in ("h1", "h2", "h3"):
            anchor = safe_name(b.text.lower())
            out.append(f'<{b.kind} id="{anchor}">{e(b.text)}</{b.kind}>')
        elif b.kind == "p":
            out.append(f"<p>{e(b.text)}</p>")
        elif b.kind == "note":
            out.append(f'<p class="note">{e(b.text)}</p>')
        elif b.kind == "list":
            out.append(f"<{b.text}>" + "".join(f"<li>{e(i)}</li>" for i in b.items) + f"</{b.text}>")
        elif b.kind == "table":
            rows = ["<tr>" + "".join(f"<th>{e(h)}</th>" for h in b.headers) + "</tr>"]
            for row in b.items:
                rows.append("<tr>" + "".join(
                    f"<td><strong>{e(c.text)}</strong></td>" if c.bold else f"<td>{e(c.text)}</td>" for c in row
                ) + "</tr>")
            out.append("<table>" + "".join(rows) + "</table>")
        elif b.kind == "img":
            data = base64.b64encode(b.png).decode("ascii")
            css = ' class="grid"' if b.file.startswith("samples_") else ""
            out.append(f'<figure><img{css} alt="{e(b.text)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{e(b.text)}</figcaption></figure>")
        elif b.kind == "code":
            out.append(f"<pre>{e(b.text)}</pre>")
        elif b.kind == "details":
            out.append(f"<details><summary>{e(b.text)}</summary><pre>{e(b.items[0])}</pre></details>")
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"
