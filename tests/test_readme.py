"""The README opens with the two commands and carries the current params reference."""

from __future__ import annotations

import re

from freezeflow.core.params import render_reference
from tests.conftest import REPO


def test_readme_opens_with_exactly_two_commands():
    text = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["make run", "make test"]


def test_params_reference_is_current():
    text = (REPO / "README.md").read_text()
    section = text.split("<!-- params:start -->")[1].split("<!-- params:end -->")[0].strip()
    assert section == render_reference().strip(), "run: python -m freezeflow.core.params and paste into README.md"
