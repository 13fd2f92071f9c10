"""tools/report.py: the README's tables come from run directories, cell by cell."""
import json

from tools import report


def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_vqa_row_reads_each_number_from_its_file(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "blind_baseline", lambda: {
        "accuracy": 0.5, "accuracy_color": 0.1, "accuracy_shape": 0.3, "accuracy_yes/no": 0.8})
    s2, s3 = tmp_path / "iaa" / "stage2", tmp_path / "iaa" / "stage3"
    write(s2 / "result.json", {"trainable_params": 250, "total_params": 1000, "wall_s": 61.4})
    (s2 / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 0, "loss": 2.0, "samples_per_s": 1.0, "tokens_per_s": 10.0},
        {"step": 1, "loss": 1.0, "samples_per_s": 3.25, "tokens_per_s": 123.4},
        {"step": 1, "val": {"accuracy": 0.1}}]) + "\n")
    write(s2 / "eval_test.json", {"metrics": {
        "n": 40, "open_ended": {"accuracy": 0.9123, "accuracy_color": 1.0, "accuracy_shape": 0.95,
                                "accuracy_yes/no": 0.875},
        "text_ppl": {"base_llm": 60.126, "text_only": 60.126}}})
    write(s2 / "eval_mc_test.json", {"metrics": {"multiple_choice": {
        "option_likelihood": {"accuracy": 0.8}}}})
    table = report.vqa_table(tmp_path)
    row = next(line for line in table.splitlines() if line.startswith("| IAA-8 "))
    assert row == ("| IAA-8 | 250 (25.0%) | 61 s | 3.2 | 123 | 91.2% (100.0% / 95.0% / 87.5%) | "
                   "80.0% | 60.13 -> 60.13 |")
    crome = next(line for line in table.splitlines() if line.startswith("| CROME "))
    assert crome.count(" - ") >= 5                 # no run: dashes, not zeros
    assert "| question only (blind), the whole test split | 0 |" in table
    assert "50.0% (10.0% / 30.0% / 80.0%)" in table
    assert "Test rows per evaluation: 40;" in table


def test_looking_row_puts_each_accuracy_beside_the_question_only_one(tmp_path):
    s2 = tmp_path / "mwa" / "stage2"
    write(s2 / "result.json", {"trainable_params": 1, "total_params": 2, "wall_s": 300.2})
    (s2 / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 0, "loss": 2.0}, {"step": 0, "val": {"yesno_balanced_accuracy": 0.75}}]) + "\n")
    write(s2 / "eval_test.json", {"metrics": {
        "open_ended": {"accuracy": 0.9, "accuracy_color": 1.0, "accuracy_shape": 0.8,
                       "accuracy_yes/no": 0.95}, "question_only": {"accuracy": 0.68}}})
    write(s2 / "eval_yesno-balanced_test.json", {"metrics": {
        "open_ended": {"accuracy": 0.625}, "question_only": {"accuracy": 0.5}}})
    table = report.looking_table(tmp_path)
    assert table.splitlines()[2:] == [
        "| MWA | 300 s | 90.0% (100.0% / 80.0% / 95.0%) | 68.0% | 62.5% | 50.0% | 75.0% |"]


def test_stage3_row_shows_the_gain_on_its_task_and_the_cost_on_stage2(tmp_path):
    s2, s3 = tmp_path / "crome" / "stage2", tmp_path / "crome" / "stage3"
    oe = lambda acc: {"metrics": {"open_ended": {"accuracy": acc}}}  # noqa: E731
    write(s3 / "result.json", {"wall_s": 500.4})
    write(s2 / "eval_choice_test.json", oe(0.1))
    write(s3 / "eval_test.json", oe(0.95))
    write(s2 / "eval_test.json", oe(0.98))
    write(s3 / "eval_vqa_test.json", oe(0.975))
    write(s2 / "eval_yesno-balanced_test.json", oe(0.97))
    write(tmp_path / "iaa" / "stage2" / "eval_test.json", oe(0.5))     # no stage 3: no row
    assert report.stage3_table(tmp_path).splitlines()[2:] == [
        "| CROME | 500 s | 10.0% -> 95.0% (+85.0 points) | 98.0% -> 97.5% (-0.5 points) | "
        "97.0% -> - |"]


def test_retrieval_rows_and_loss_figure(tmp_path):
    write(tmp_path / "stage0" / "eval_retrieval_test.json", {"metrics": {
        "image_to_text": {"R@1": 0.9, "R@5": 1.0, "R@10": 1.0},
        "text_to_image": {"R@1": 0.5, "R@5": 0.75, "R@10": 1.0},
        "trainable_params": 0, "trainable_fraction": 0.0}})
    run = tmp_path / "retrieval" / "mwa"
    write(run / "eval_retrieval_test.json", {"metrics": {
        "image_to_text": {"R@1": 0.95, "R@5": 1.0, "R@10": 1.0},
        "text_to_image": {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0},
        "trainable_params": 35, "trainable_fraction": 0.035}})
    (run / "metrics.jsonl").write_text(json.dumps({"step": 9, "loss": 0.5, "elapsed_s": 44.4,
                                                   "samples_per_s": 71.0}) + "\n")
    rows = report.retrieval_table(tmp_path).splitlines()
    assert rows[2] == "| zero-shot (stage 0, frozen) | 0 | - | - | 90.0% / 100.0% / 100.0% | 50.0% / 75.0% / 100.0% |"
    assert rows[3] == "| MWA | 35 (3.5%) | 44 s | 71.0 | 95.0% / 100.0% / 100.0% | 100.0% / 100.0% / 100.0% |"
    assert rows[4].startswith("| full fine-tuning | - |")
    curves = tmp_path / "mwa" / "stage2" / "metrics.jsonl"
    curves.parent.mkdir(parents=True)
    curves.write_text("".join(json.dumps({"step": i, "loss": 3.0 / (i + 1)}) + "\n" for i in range(5)))
    report.figures(tmp_path, tmp_path / "docs")
    assert (tmp_path / "docs" / "loss_stage2.png").is_file()
    assert not (tmp_path / "docs" / "loss_stage3.png").exists()
