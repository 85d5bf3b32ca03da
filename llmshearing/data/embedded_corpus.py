"""A small multi-domain text corpus from the Python installation itself (present on any machine).

Three domains of real text, written as a RedPajama-style folder (``<domain>/*.jsonl``):

| domain | text |
| --- | --- |
| ``code`` | source files of the standard library (every other file, in sorted order) |
| ``docstrings`` | module, class and function docstrings of the *other* files |
| ``reference`` | the language-reference / library topics that ``help()`` shows (``pydoc_data``) |

The standard-library files are divided between ``code`` and ``docstrings``, so the two domains share no
source file: a docstring is never also a line of a code document (in any split), and evaluating one domain
does not score text that training saw in the other. Each line's ``meta.file`` names its source.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from pathlib import Path

__all__ = ["build_embedded_corpus"]


def _stdlib_files(limit_chars: int) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if "test" in path.parts[-2:] or "site-packages" in path.parts:
            continue
        size = path.stat().st_size
        if size < 2000:
            continue
        files.append(path)
        total += size
        if total >= limit_chars:
            break
    return files


def build_embedded_corpus(output_dir: str | Path, max_chars_per_domain: int = 4_000_000) -> Path:
    """Write ``code``, ``docstrings`` and ``reference`` JSON-lines domains under ``output_dir``.

    Deterministic for a given Python installation. Returns ``output_dir``.
    """
    from pydoc_data.topics import topics

    out = Path(output_dir)
    docs: dict[str, list[tuple[str, str]]] = {"code": [], "docstrings": [], "reference": []}  # (text, origin)
    root = Path(sysconfig.get_paths()["stdlib"])
    # files alternate between the two domains (the budget is applied per domain below)
    for i, path in enumerate(_stdlib_files(1 << 62)):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (UnicodeDecodeError, SyntaxError):
            continue
        rel = str(path.relative_to(root))
        if i % 2 == 0:
            docs["code"].append((source, rel))
            continue
        strings = [
            ast.get_docstring(node)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        ]
        text = "\n\n".join(s for s in strings if s and len(s) > 40)
        if text:
            docs["docstrings"].append((text, rel))
    for name in sorted(topics):
        docs["reference"].append((topics[name], f"pydoc_data.topics:{name}"))
    for domain, texts in docs.items():
        budget, kept = max_chars_per_domain, []
        for t in texts:
            if budget <= 0:
                break
            kept.append(t)
            budget -= len(t[0])
        (out / domain).mkdir(parents=True, exist_ok=True)
        with open(out / domain / f"{domain}.jsonl", "w", encoding="utf-8") as fh:
            for i, (t, origin) in enumerate(kept):
                fh.write(json.dumps({"text": t, "meta": {"domain": domain, "doc": i, "file": origin}}) + "\n")
    return out
