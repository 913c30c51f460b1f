"""The README's and docs' example outputs are what the code prints: each marked block (`<!-- example: mua ... -->`)
is run again on the stored run in tests/data/doc_run.json and compared. When one drifts, re-render them all with
`python scripts/doc_examples.py`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("doc_examples", ROOT / "scripts" / "doc_examples.py")
doc_examples = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(doc_examples)


def test_readme_and_docs_examples_are_what_the_code_prints():
    found = doc_examples.examples()
    assert {cmd for _, cmd in found} >= {"mua fit", "mua transfer --to full-ft", "mua transfer --to full-ft --json"}
    drift = doc_examples.refresh(check=True)
    assert drift == [], "\n\n".join(drift) + "\n\nre-render them: python scripts/doc_examples.py"


def test_a_block_that_differs_is_caught_and_rewritten(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text(
        "before\n<!-- example: mua theory -->\n```console\n$ mua theory\nstale\n```\n<!-- /example -->\nafter\n"
    )
    assert len(doc_examples.refresh([doc], check=True)) == 1
    assert "stale" in doc.read_text()  # --check writes nothing
    doc_examples.refresh([doc])
    text = doc.read_text()
    assert "stale" not in text and "B:1" in text and text.startswith("before\n") and text.endswith("after\n")
    assert doc_examples.refresh([doc], check=True) == []
