"""The README's Python examples, run as written, so that they cannot drift from the code again.

The engine and model-core sections run here, each in a fresh interpreter in an empty directory
(they write `checkpoints/tiny` there, as they would in a user's); the client examples run against
a real server in `tests/test_client_contract.py`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.common import readme_blocks, run_example

pytestmark = pytest.mark.ray


@pytest.mark.parametrize("heading", ["Using the model core", "Generating with the engine"])
def test_the_readmes_python_examples_run(heading: str, tmp_path: Path) -> None:
    (code,) = readme_blocks(heading)
    out = run_example(code, tmp_path)
    assert (tmp_path / "checkpoints" / "tiny" / "config.json").is_file()  # the example's own checkpoint
    if heading == "Generating with the engine":  # it prints the first output's finish reason last
        assert out.split()[-1] in ("length", "stop"), out
