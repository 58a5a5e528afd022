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


@pytest.mark.parametrize("stage, steps", [("stage1", 15), ("stage1", 60), ("stage2", 15), ("stage2", 60)])
def test_the_toy_training_bench_steps_are_whole_batches_of_the_main_job(stage, steps):
    """An incomplete batch at each epoch's end would make the bench's steps cheaper than the main job's."""
    from bench.toy_training import EPOCHS, images_for
    from mmalign.config import load_config
    from mmalign.toy.run import CONFIGS, STAGE_CONFIGS

    batch = load_config(CONFIGS / STAGE_CONFIGS[stage]).train.batch_size
    images = images_for(batch, steps, EPOCHS[stage])

    assert images % batch == 0
    assert 0.7 * EPOCHS[stage] <= steps * batch / images <= 1.3 * EPOCHS[stage]
