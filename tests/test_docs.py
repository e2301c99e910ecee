"""The README stays short and every relative link in README.md and docs/*.md resolves.

A link `[text](target)` or `![alt](target)` whose target is not a URL must name a file that
exists (relative to the Markdown file), and a `#anchor` (alone or after a `.md` file) must be
the GitHub slug of a heading in that file. GitHub's slug: the heading's rendered text,
lower-cased, every character that is not a letter, digit, space, `-` or `_` dropped, spaces
turned into `-`; the n-th repeat of a slug gets `-n`.
"""

from __future__ import annotations

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_MAX_LINES = 250

_FENCE = re.compile(r"^\s*(```|~~~)")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def markdown_files() -> list[str]:
    docs = os.path.join(ROOT, "docs")
    pages = sorted(os.path.join(docs, f) for f in os.listdir(docs) if f.endswith(".md"))
    return [os.path.join(ROOT, "README.md")] + pages + [os.path.join(ROOT, "tpu_scripts", "README.md")]


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def slug(heading: str) -> str:
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links -> their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.replace("`", "").replace("*", "")
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    with open(path, encoding="utf-8") as f:
        lines = prose_lines(f.read())
    for line in lines:
        m = _HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        lines = prose_lines(f.read())
    text = "\n".join(re.sub(r"`[^`]*`", "", line) if "](" not in line else line for line in lines)
    return [m.group(1) for m in _LINK.finditer(text)]


def broken_links(path: str) -> list[str]:
    bad = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = path if not file_part else os.path.normpath(
            os.path.join(os.path.dirname(path), file_part))
        if not os.path.exists(dest):
            bad.append(f"{target} (no file {os.path.relpath(dest, ROOT)})")
            continue
        if anchor and dest.endswith(".md") and anchor not in anchors(dest):
            bad.append(f"{target} (no heading #{anchor} in {os.path.relpath(dest, ROOT)})")
    return bad


def test_slug_follows_github():
    assert slug("Memory and compute of the paper's 7B run (XLA's own accounting)") == \
        "memory-and-compute-of-the-papers-7b-run-xlas-own-accounting"
    assert slug("TFDS / ArrayRecord data (TPU slices), without TensorFlow") == \
        "tfds--arrayrecord-data-tpu-slices-without-tensorflow"
    assert slug("`srft-jax analyze`") == "srft-jax-analyze"
    assert slug("A real model offline: SmolLM2-135M-Instruct") == \
        "a-real-model-offline-smollm2-135m-instruct"


def test_broken_links_are_reported(tmp_path):
    (tmp_path / "b.md").write_text("# Title\n\n## A section: with `code`\n")
    (tmp_path / "a.md").write_text(
        "[ok](b.md#a-section-with-code) [ok](#top) [url](https://example.com/x.md)\n"
        "[bad anchor](b.md#nope) [no file](c.md) ![no image](pic.png)\n"
        "```\n[inside a fence](d.md)\n```\n# Top\n")
    assert broken_links(str(tmp_path / "a.md")) == [
        "b.md#nope (no heading #nope in " + os.path.relpath(str(tmp_path / "b.md"), ROOT) + ")",
        "c.md (no file " + os.path.relpath(str(tmp_path / "c.md"), ROOT) + ")",
        "pic.png (no file " + os.path.relpath(str(tmp_path / "pic.png"), ROOT) + ")"]


def test_readme_is_short():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        n = len(f.read().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines, at most {README_MAX_LINES}"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(path):
    bad = broken_links(path)
    assert bad == [], "broken links in " + os.path.relpath(path, ROOT) + ": " + "; ".join(bad)


def test_readme_links_every_docs_page():
    readme = os.path.join(ROOT, "README.md")
    linked = {os.path.normpath(os.path.join(ROOT, t.partition("#")[0]))
              for t in links(readme) if t.partition("#")[0]}
    pages = [p for p in markdown_files()[1:] if p not in linked]  # docs pages, tpu_scripts/README.md
    assert pages == [], f"docs pages the README does not link: {pages}"
