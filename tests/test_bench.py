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

    assert 0.7 * EPOCHS[stage] <= steps * batch / images <= 1.3 * EPOCHS[stage]


def _run(step: float, first: float, cache: float, fixed: float, images: int):
    from bench.toy_training import PathRun

    return PathRun(step, step, first, first, [], cache, cache, fixed, fixed, steps=10, images=images)


def test_the_main_job_row_charges_steps_caches_and_compiles_as_the_main_job_pays_them():
    """Per repeat: steps x step time, each cache's fixed cost once per run and the rest per image,
    the first run's compile cold (the first repeat's), later runs' warm (the last repeat's)."""
    from bench.common import Row, Timing
    from bench.toy_training import MAIN_JOB, main_job_row

    def stage_row(stage, base_runs, fast_runs):
        row = Row(stage, "", Timing(wall=[r.wall for r in base_runs]), Timing(wall=[r.wall for r in fast_runs]))
        row.extra = {"stage": stage, "runs": {True: base_runs, False: fast_runs}}
        return row

    s1 = stage_row(
        "stage1", [_run(0.3, 0.1, 0, 0, 128)] * 2, [_run(0.1, 40, 2.0, 0.5, 128), _run(0.1, 1, 2.5, 0.5, 128)]
    )
    s2 = stage_row("stage2", [_run(0.3, 0.1, 0, 0, 48)] * 2, [_run(0.1, 2, 1.0, 0.2, 48), _run(0.2, 1.5, 1.0, 0.2, 48)])
    row = main_job_row([s1, s2])

    j1, j2 = MAIN_JOB["stage1"], MAIN_JOB["stage2"]
    fast_0 = (
        0.1 * j1.steps + 0.5 + 1.5 / 128 * j1.images + 40 + 0.1 * j2.steps + 0.2 * 2 + 0.8 / 48 * j2.images + 2 + 1.5
    )
    fast_1 = (
        0.1 * j1.steps + 0.5 + 2.0 / 128 * j1.images + 40 + 0.2 * j2.steps + 0.2 * 2 + 0.8 / 48 * j2.images + 2 + 1.5
    )
    assert row.fast.wall == pytest.approx([fast_0, fast_1]) and row.fast.cpu == pytest.approx([fast_0, fast_1])
    assert row.base.wall == pytest.approx([0.3 * (j1.steps + j2.steps) + 0.1 + 0.1 * 2] * 2)
    assert row.ratio == pytest.approx(row.base.wall[0] / fast_0)
