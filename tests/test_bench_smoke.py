"""Smoke run of the benchmark harness on the tiny components: every table and row is produced and well formed."""

import math

import pytest

from bench.report import GOALS
from bench.run import main

PIPELINE_KEYS = [
    "img2img",
    "diffedit",
    "deltadeno",
    "deltadeno_no_bias",
    "deltadeno_mask_image",
    "deltadeno_normal_as_negative",
]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("bench") / "report.md"
    results = main(
        [
            "--tiny",
            "--threads", "1",
            "--steps", "4",
            "--repeats", "1",
            "--warmup", "0",
            "--unet-repeats", "1",
            "--layer-sample-seconds", "0",
            "--memory-timeout", "120",
            "--output", str(output),
        ]
    )
    return results, output.read_text(encoding="utf-8")


def table_rows(report: str, header_start: str) -> list[list[str]]:
    """Return the body rows of the Markdown table whose header starts with `header_start`, split into cells."""
    lines = report.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_bench_results_have_every_pipeline(bench_run):
    results, _ = bench_run
    assert [row["key"] for row in results["pipelines"]] == PIPELINE_KEYS
    for row in results["pipelines"]:
        assert len(row["samples"]) == 1
        assert math.isfinite(row["median_s"])
        assert row["median_s"] > 0
        assert row["memory"]["resting_mib"] > 0
        assert row["memory"]["peak_mib"] >= row["memory"]["resting_mib"]


def test_bench_pipeline_table(bench_run):
    _, report = bench_run
    rows = table_rows(report, "| configuration")
    assert len(rows) == len(PIPELINE_KEYS)
    for row in rows:
        assert len(row) == 9
        for cell in (row[1], row[3], row[4], row[5], row[6], row[7]):
            assert math.isfinite(float(cell)), row
    assert rows[0][3] == "1.00"
    assert rows[0][6] == "1.000"


def test_bench_attention_table(bench_run):
    results, report = bench_run
    rows = table_rows(report, "| what")
    # The tiny UNet has cross-attention at two resolutions, then two UNet-call rows.
    assert len(results["layers"]) == 2
    assert len(rows) == len(results["layers"]) + 2
    for row in rows:
        assert len(row) == 7
        assert math.isfinite(float(row[6])), row
    assert rows[0][0] == "16x16 layer"
    assert rows[1][0] == "8x8 layer"


def test_bench_goal_table(bench_run):
    _, report = bench_run
    rows = table_rows(report, "| goal")
    assert [row[0] for row in rows] == [goal[0] for goal in GOALS]
    for row in rows:
        assert row[3] in ("met", "missed"), row
        assert math.isfinite(float(row[2])), row


def test_bench_report_names_command_and_versions(bench_run):
    _, report = bench_run
    assert "python -m bench.run --tiny --threads 1" in report
    for name in ("torch", "diffusers", "transformers", "CPU", "Date"):
        assert name in report
