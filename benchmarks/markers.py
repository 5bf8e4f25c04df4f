"""Sections of a generated Markdown file kept between marker comments, so that one section
is rewritten without regenerating the file (``studies.py``, ``scale.py``, ``report.py``)."""

from __future__ import annotations


def replace_marked(text: str, begin: str, end: str, block: str) -> str | None:
    """``text`` with everything from ``begin`` through ``end`` replaced by ``block`` (which
    carries its own markers), or ``None`` when ``text`` lacks either marker."""
    if begin not in text or end not in text:
        return None
    head, _, rest = text.partition(begin)
    return head + block + rest.partition(end)[2]
