"""Sections of a generated Markdown file kept between marker comments, so that one section
is rewritten without regenerating the file (``studies.py``, ``scale.py``, ``report.py``)."""

from __future__ import annotations

import json
from pathlib import Path


def replace_marked(text: str, begin: str, end: str, block: str) -> str | None:
    """``text`` with everything from ``begin`` through ``end`` replaced by ``block`` (which
    carries its own markers), or ``None`` when ``text`` lacks either marker."""
    if begin not in text or end not in text:
        return None
    head, _, rest = text.partition(begin)
    return head + block + rest.partition(end)[2]


def splice_section(path: Path, title: str, begin: str, end: str, section: str) -> None:
    """Replace the section of ``path`` between ``begin`` and ``end`` by ``section``, or append
    it under a ``## title`` heading when the file lacks the markers."""
    text = path.read_text()
    block = f"{begin}\n{section}\n{end}"
    path.write_text(replace_marked(text, begin, end, block) or text.rstrip()
                    + f"\n\n## {title}\n\n" + block + "\n")


def record(result: dict, row: dict, out: str | None) -> None:
    """One measured ``row`` of a benchmark script: kept in ``result["rows"]``, printed as
    JSON, and ``result`` written to ``out`` at once (a long run keeps what it measured)."""
    result["rows"].append(row)
    print(json.dumps(row), flush=True)
    if out:
        Path(out).write_text(json.dumps(result, indent=1))


def combined(result: dict, earlier: list[Path]) -> dict:
    """``result`` (a benchmark script's JSON) after the rows of the runs in ``earlier``
    (``--no-run --combine``): every run's commands in order, each once, and each row once
    (a result combined before holds the earlier runs' rows already)."""
    if not earlier:
        return result
    runs = [json.loads(path.read_text()) for path in earlier] + [result]
    commands = [c for run in runs for c in run.get("commands") or [run["command"]]]
    unique = {json.dumps(row, sort_keys=True): row for run in runs for row in run["rows"]}
    return {**result, "commands": list(dict.fromkeys(commands)), "rows": list(unique.values())}


def publish(result: dict, markdown: str, out: str | None, splice: Path | None,
            title: str, begin: str, end: str) -> None:
    """The end of a benchmark script: its table printed, kept in ``result`` and written with
    it to ``out`` (JSON), and spliced into ``splice`` (Markdown) between its markers."""
    result["markdown"] = markdown
    print(markdown)
    if out:
        Path(out).write_text(json.dumps(result, indent=1))
    if splice:
        splice_section(splice, title, begin, end, markdown)


def cpu() -> str:
    """The CPU a table's figures come from, with the vector instructions PyTorch uses on it
    ("AMD EPYC, AVX512"): the figures of different machines are not comparable, and a
    session's machine may change between runs."""
    import torch

    from bscompress.deploy.latency import cpu_model

    return f"{cpu_model()}, {torch.backends.cpu.get_cpu_capability()}"
