"""The README's code examples, run by the tests as they are written there."""

from __future__ import annotations

import re
import types
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLE_UPSTREAM = "http://127.0.0.1:8080/v1"  # the upstream the examples name; tests point it at a fake


def readme_example(heading: str) -> str:
    """The first ```python block after ``heading`` in the README."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n{heading}\n")
    match = re.compile(r"```python\n(.*?)```", re.S).search(text, start)
    assert match is not None, f"no python block after {heading!r} in README.md"
    return match.group(1)


def load_readme_example(heading: str, upstream_url: str) -> types.ModuleType:
    """The README's example under ``heading`` as a module, its upstream pointed at ``upstream_url``."""
    source = readme_example(heading)
    assert EXAMPLE_UPSTREAM in source, "the example names its upstream; the test points it at a fake"
    module = types.ModuleType("readme_example")
    exec(compile(source.replace(EXAMPLE_UPSTREAM, upstream_url), f"README.md ({heading})", "exec"), module.__dict__)
    return module
