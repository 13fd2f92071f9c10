"""MWA's paper setting (train.py --task retrieval, training.stages.retrieval_job; eval.py on stage-0 and
retrieval runs): on a stage-0 run of 2 steps over slices of easy-vqa, --adapter mwa trains only
the MWA modules (every other weight bit-identical) and --adapter full trains every weight; the
default is one epoch; resume is exact; eval writes R@K that agree with validate(); recall_at_k
with several right candidates and ties; the flags refuse a VQA design for retrieval."""
import json
import re
import signal

import pytest
import torch
from safetensors.torch import load_file

import eval as ev
import tiny
import train
from dual_encoder import load_retrieval_run
from evaluation.scoring import recall_at_k


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """As in test_train: one thread, and train.main's signal handlers put back afterwards."""
    threads = torch.get_num_threads()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    torch.set_num_threads(1)
    yield
    for s, h in handlers.items():
        signal.signal(s, h)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny.easyvqa_slices(tmp_path_factory.mktemp("data"), n=48)


def flags(data, out_dir, *extra):
    return ["--data", str(data["captions_train"]), "--val-data", str(data["captions_val"]),
            "--image-root", str(data["image_root"]), "--out-dir", str(out_dir),
            "--dtype", "fp32", "--num-threads", "1", "--log-every", "1", *extra]


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """An out_dir holding a 2-step stage-0 run (on a 2-step tower run)."""
    out = tmp_path_factory.mktemp("runs")
    train.main(flags(data, out, "--task", "tower", "--steps", "2", "--batch-size", "4"))
    train.main(flags(data, out, "--stage", "0", "--steps", "2", "--batch-size", "4"))
    return out


def retrieval_flags(data, runs, adapter, *extra):
    return flags(data, runs, "--task", "retrieval", "--adapter", adapter, *extra)


def train_job(argv):
    """train.train on a retrieval Job built here; -> (job, weights before, weights after)."""
    cfg, env, job = tiny.job_for(argv)
    before = {k: v.clone() for k, v in job.model.state_dict().items()}
    train.train(cfg, job, env)
    return job, before, job.model.state_dict()


def n_trainable(job) -> int:
    return sum(p.numel() for p in job.trainable())


def test_mwa_trains_only_its_modules_for_one_epoch_by_default(data, runs, capsys):
    job, before, after = train_job(retrieval_flags(data, runs, "mwa", "--batch-size", "16"))
    run = runs / "retrieval" / "mwa"
    steps = len(job.samples) // 16
    assert steps >= 2 and json.loads((run / "trainer_state.json").read_text())["step"] == steps
    trainable = {n for n, p in job.model.named_parameters() if p.requires_grad}
    assert trainable and all(re.search(r"\.(adapter|enhancer)\.", k) for k in trainable)
    assert any("ffn_text.adapter" in k for k in trainable)  # the text way has adapters too
    assert set(load_file(run / "model.safetensors")) == trainable
    assert [k for k in after if k not in trainable and not torch.equal(after[k], before[k])] == []
    assert [k for k in trainable if torch.equal(after[k], before[k])] == []
    n_all = sum(p.numel() for p in job.model.parameters())
    header = f"trainable {n_trainable(job):,} of {n_all:,} parameters " \
             f"({100 * n_trainable(job) / n_all:.2f}%)"
    assert header in capsys.readouterr().out
    assert 0 < n_trainable(job) < 0.1 * n_all


def test_full_fine_tuning_trains_every_weight(data, runs):
    job, before, after = train_job(retrieval_flags(data, runs, "full", "--steps", "2",
                                                     "--batch-size", "4"))
    assert n_trainable(job) == sum(p.numel() for p in job.model.parameters())
    assert [k for k in after if torch.equal(after[k], before[k])] == []
    saved = load_file(runs / "retrieval" / "full" / "model.safetensors")
    assert set(saved) == set(after) and "qformer.word_embeddings.weight" in saved


def test_resume_matches_an_uninterrupted_run(data, runs, tmp_path, monkeypatch):
    """The MWA adapters train with dropout, so the RNG state must come back too."""
    args = ("--steps", "4", "--batch-size", "4", "--init", str(runs / "stage0"))
    train.main(retrieval_flags(data, tmp_path / "a", "mwa", *args, "--save-every", "0"))
    b = retrieval_flags(data, tmp_path / "b", "mwa", *args, "--save-every", "2")

    def crash_at_step_2(step, steps, warmup, original=train.lr_factor):
        if step == 2:
            raise RuntimeError("crash")
        return original(step, steps, warmup)

    monkeypatch.setattr(train, "lr_factor", crash_at_step_2)
    with pytest.raises(RuntimeError, match="crash"):
        train.main(b)
    monkeypatch.undo()
    run_a, run_b = tmp_path / "a" / "retrieval" / "mwa", tmp_path / "b" / "retrieval" / "mwa"
    assert json.loads((run_b / "trainer_state.json").read_text())["step"] == 2
    train.main(b + ["--resume"])
    loss = lambda run: [json.loads(line).get("loss") for line in  # noqa: E731
                        (run / "metrics.jsonl").read_text().splitlines()]
    assert loss(run_b) == loss(run_a)
    a, b = load_file(run_a / "model.safetensors"), load_file(run_b / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_writes_recall_that_agrees_with_validation(data, runs):
    run = runs / "retrieval" / "full"
    if not (run / "model.safetensors").exists():
        train_job(retrieval_flags(data, runs, "full", "--steps", "2", "--batch-size", "4"))
    results = ev.main(["--checkpoint", str(run), "--split", "val", "--num-threads", "1"])
    metrics = results["metrics"]
    last_val = [json.loads(line)["val"] for line in (run / "metrics.jsonl").read_text().splitlines()
                if "val" in json.loads(line)][-1]
    for way in ("image_to_text", "text_to_image"):
        assert set(metrics[way]) == {"R@1", "R@5", "R@10"}
        assert metrics[way] == last_val[way]  # same model, same rows, same scoring
    assert metrics["trainable_fraction"] == 1.0
    assert "| image_to_text / R@1 |" in (run / "eval_retrieval_val.md").read_text()
    assert (run / "eval_retrieval_val.png").is_file()
    saved = json.loads((run / "eval_retrieval_val.json").read_text())
    assert len(saved["predictions"]) == metrics["n_images"]

    zero_shot = ev.main(["--checkpoint", str(runs / "stage0"), "--data", str(data["captions_val"]),
                         "--image-root", str(data["image_root"]), "--num-threads", "1"])["metrics"]
    assert zero_shot["trainable_params"] == 0 and zero_shot["n_images"] == metrics["n_images"]
    model = load_retrieval_run(runs / "stage0")[0]
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_recall_at_k_with_several_right_candidates_and_ties():
    sim = torch.tensor([[0.9, 0.5, 0.5, 0.1],    # best right (0.5) behind 0.9 and a tied wrong one: rank 3
                        [0.2, 0.8, 0.8, 0.3]])   # two right ones tied at the top: rank 1
    truth = torch.tensor([[False, True, False, True],
                          [False, True, True, False]])
    assert recall_at_k(sim, truth, ks=(1, 2, 3)) == {"R@1": 0.5, "R@2": 0.5, "R@3": 1.0}
    scores = torch.randn(6, 5).round(decimals=1)  # ties likely
    index = torch.tensor([0, 4, 2, 2, 1, 3])
    assert recall_at_k(scores, index, ks=(1, 2, 3)) == \
        recall_at_k(scores, torch.nn.functional.one_hot(index, 5).bool(), ks=(1, 2, 3))
    with pytest.raises(ValueError, match="no right candidate"):
        recall_at_k(sim, torch.zeros(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("argv, message", [
    (["--task", "retrieval", "--adapter", "crome"],
     "--task retrieval trains --adapter mwa or --adapter full (full fine-tuning), not crome"),
    (["--task", "retrieval"], "not crome"),  # the VQA default design does not carry over
    (["--task", "retrieval", "--adapter", "llava"], "not llava"),
    (["--task", "itm"], "argument --task: invalid choice: 'itm'"),
])
def test_bad_flags_exit_clearly(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_init_must_be_a_stage0_run(data, runs, tmp_path):
    with pytest.raises(train.CheckpointError, match="no model.safetensors; retrieval starts from"):
        train.main(retrieval_flags(data, runs, "mwa", "--steps", "1", "--init", str(tmp_path)))
