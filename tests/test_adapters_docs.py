"""Every ```python example of docs/adapters/*.md runs (each page's blocks in order, one namespace)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests._adapters_support import one_thread  # noqa: F401

DOCS = Path(__file__).resolve().parent.parent / "docs" / "adapters"
NEEDS = {"timm.md": "timm", "smp.md": "segmentation_models_pytorch", "monai.md": "monai", "plain.md": "torchvision"}
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def test_every_page_has_an_example() -> None:
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    assert pages == ["index.md", "monai.md", "plain.md", "smp.md", "timm.md"]
    assert all(BLOCK.search((DOCS / page).read_text()) for page in pages)


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_examples_run(page: str) -> None:
    if page in NEEDS:
        pytest.importorskip(NEEDS[page])
    namespace: dict[str, object] = {"__name__": f"docs_{page[:-3]}"}
    for index, block in enumerate(BLOCK.findall((DOCS / page).read_text())):
        exec(compile(block, f"{DOCS / page}:block{index}", "exec"), namespace)  # noqa: S102
