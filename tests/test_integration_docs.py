"""The runnable examples of docs/integrations.md run as written."""

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"


def example(section: str) -> str:
    text = DOC.read_text().split(f"## {section}", 1)[1]
    return re.search(r"```python\n(.*?)```", text, flags=re.DOTALL).group(1)


@pytest.mark.parametrize("section, extra", [("Hugging Face `Trainer`", "transformers"), ("Lightning", "lightning")])
def test_the_documented_example_runs(tmp_path, monkeypatch, capsys, section, extra):
    pytest.importorskip(extra, reason=f"the {extra} extra is not installed")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example(section), f"docs/integrations.md ({section})", "exec"), namespace)  # noqa: S102
    sparse = namespace["sparse"]
    assert abs(sparse.masks.density() - 0.1) < 1e-3 and sparse.topology.num_updates >= 1
