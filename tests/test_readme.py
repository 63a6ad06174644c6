"""The README's functional-API snippet runs as written."""

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def test_functional_api_snippet_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    snippet = next(b for b in blocks if "hira.build_index" in b)
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert scope["out"].shape == (1, 8, 1, 64)
