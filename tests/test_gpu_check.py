"""tools/gpu_check.py end to end on CPU (--dry-run: everything but CUDA), on the real offline
default, and tools/report.py's GPU table from its result. Two step rows (a design with a
Q-Former and one without) keep it short: every row runs the same code, and
tests/test_compile.py trains every design."""
import json

from tools import gpu_check, report


def test_dry_run_writes_every_part_and_the_report_reads_it(tmp_path, capsys):
    result = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--adapters", "crome", "iaa"])
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert [r["adapter"] for r in saved["steps"]] == ["crome", "iaa"]
    for row in saved["steps"]:
        assert "error" not in row, row
        assert row["ms_per_step"] > 0 and 0 < row["mfu"] < 1 and row["peak_mb"] > 0
        assert (row["dtype"], row["compiled"], row["batch"]) == ("fp32", False, 2)
    job = saved["main_job"]
    assert job["exit_code"] == 0, job
    assert job["validation"]["n"] == 8 and "yesno_balanced_accuracy" in job["validation"]
    assert job["eval"]["open_ended"]["n"] == 8
    assert "skipped" in saved["ddp"]
    assert (tmp_path / "gpu_check.md").read_text().startswith("# GPU check: cpu (dry run)")
    table = report.gpu_table(tmp_path / "gpu_check.json")
    assert table.count("\n| ") == 1 + 2   # the header and one row per adapter
    assert "| CROME (fp32) | 2 |" in table and "dry run on CPU" in table
