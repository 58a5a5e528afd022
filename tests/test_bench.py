"""`python -m bench` measures each optimisation against its baseline in one process and prints one
table with ratios (here only its cheap sections: batched evaluation and int8 memory)."""

import pytest

from bench.__main__ import main, report


def test_bench_prints_one_table_with_ratios_and_peak_memory():
    out = report(quick=True, only=["eval", "int8"])

    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| optimisation | baseline |") and "peak memory" in rows[0]
    names = [row.split(" | ")[0] for row in rows[1:]]
    assert names == ["| evaluation, batch 64", "| int8 weights (toy, 2M params)"]
    for row in rows[1:]:
        ratio = row.split(" | ")[4]
        assert ratio.endswith("x") and float(ratio[:-1]) > 0
        assert " MiB / " in row
    assert "identical answers" in out and "no GPU" in out and "mode: --quick" in out


def test_an_unknown_section_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--only", "eval,nope"])
    assert "unknown section(s) nope" in capsys.readouterr().err
