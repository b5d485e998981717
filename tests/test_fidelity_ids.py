"""Every pipeline (S) or official-defect (B) id that the code cites is defined in
docs/fidelity.md, and no code cites a specification outside the repository."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [
    *(sorted((ROOT / d).rglob("*.py")) for d in ("toco", "models", "datasets", "scripts")),
    ROOT / "train.py",
    ROOT / "evaluate.py",
    ROOT / "predict.py",
]
ID = re.compile(r"\b(S\d(?:\.\d)?|B\d{1,2})\b")
DEFINED = re.compile(r"^\| (S\d(?:\.\d)?|B\d{1,2}) \|", re.M)


def prose(path: Path) -> str:
    """The comments and string literals of a Python file (where ids are cited)."""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return "\n".join(t.string for t in tokens if t.type in (tokenize.COMMENT, tokenize.STRING))


def sources() -> list[Path]:
    out: list[Path] = []
    for item in SOURCES:
        out.extend(item if isinstance(item, list) else [item])
    return out


def test_every_cited_id_is_defined():
    defined = set(DEFINED.findall((ROOT / "docs" / "fidelity.md").read_text()))
    assert {"S2.1", "B1", "B18"} <= defined
    cited = {(m, p.relative_to(ROOT)) for p in sources() for m in ID.findall(prose(p))}
    missing = sorted(f"{i} ({p})" for i, p in cited if i not in defined)
    assert not missing, "ids cited but not defined in docs/fidelity.md: " + ", ".join(missing)
    assert len({i for i, _ in cited}) >= 10  # the walk reads docstrings and comments


def test_no_reference_to_an_outside_spec():
    outside = re.compile(r"\bspec(?: section)? \d|toco_spec|seeds_spec|\.\./shared")
    hits = [str(p.relative_to(ROOT)) for p in sources() if outside.search(p.read_text())]
    assert not hits, f"references to a specification outside the repository: {hits}"
