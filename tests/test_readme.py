"""The README's PyTorch example runs as written."""
import re
from pathlib import Path

import pytest

pytest.importorskip("torch")


def test_readme_torch_example():
    text = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"## Using MSA from PyTorch\n\n```python\n(.*?)```", text, re.S).group(1)
    ns = {}
    exec(compile(block, "README.md", "exec"), ns)
    out, out2 = ns["out"], ns["out2"]
    assert out.shape == (1024, 8, 64) and ns["lse"].shape == (1024, 8)
    assert (out.float() - out2.float()).abs().max().item() == 0.0
