"""Every ``python`` code block in ``docs/*.md`` runs: a page's blocks, in order, as one script.

The pages use the DSN ``postgresql://localhost/postgres`` as a reader would; PGOPTIONS
points the unmodified code at a fresh schema. Snippets that must not run (shell commands,
settings files) use another language tag (``console``, ``ini``, ``text``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.conftest import ROOT, _reachable

DOCS_DSN = "postgresql://localhost/postgres"
BLOCK_RE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)


def pages_with_code() -> list[Path]:
    pages = sorted((ROOT / "docs").rglob("*.md"))
    return [p for p in pages if "_build" not in p.parts and BLOCK_RE.search(p.read_text())]


def page_script(page: Path) -> str:
    """The page's python blocks joined into one script."""
    return "\n\n".join(BLOCK_RE.findall(page.read_text()))


@pytest.fixture
def docs_schema(base_dsn: str) -> Iterator[tuple[str, str]]:
    """A fresh schema on the docs' DSN (or the test server's if that is unreachable)."""
    target = DOCS_DSN if _reachable(DOCS_DSN) else base_dsn
    schema = f"doc_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    yield target, schema
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE pid <> pg_backend_pid() AND query LIKE %s",
            (f"%{schema}%",),
        )
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def test_docs_have_runnable_pages() -> None:
    assert pages_with_code(), "docs/ has no page with a python example"


@pytest.mark.parametrize("page", pages_with_code(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_doc_page_runs(page: Path, docs_schema: tuple[str, str], tmp_path: Path) -> None:
    target, schema = docs_schema
    script = page_script(page)
    if target != DOCS_DSN:
        script = script.replace(DOCS_DSN, target)
    path = tmp_path / f"{page.stem.replace('-', '_')}_example.py"
    path.write_text(script)
    env = dict(os.environ)
    env["PGOPTIONS"] = f"-c search_path={schema}"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(tmp_path)])
    env["PYTHONUNBUFFERED"] = "1"
    done = subprocess.run(
        [sys.executable, path.name],
        cwd=tmp_path,
        env=env,
        timeout=90,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, f"{page.name} failed:\n{done.stdout}\n{done.stderr}"
