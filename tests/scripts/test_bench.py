"""scripts/bench.py's arguments are checked before any model loads or compiles."""

from __future__ import annotations

import pytest

from pallax.scripts import bench


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--prefill", "-5"], "--prefill -5"),
        (["--new-tokens", "1"], "--new-tokens 1"),
        (["--repeats", "0"], "--repeats 0"),
    ],
)
def test_bad_arguments_are_refused(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2
    assert match in capsys.readouterr().err
