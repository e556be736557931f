"""Every Python example of the README runs as written, each in a fresh namespace."""
import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def test_usage_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "README.md has no python example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
