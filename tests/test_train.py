"""train.py end to end on tiny backbones in the hub layouts (tests/tiny.py) and slices of the real
easy-vqa files: every design through stages 1 -> 2 -> 3, stage 0's hub-layout outputs, exact
resume after SIGKILL and after SIGTERM (real subprocesses), DDP and FSDP (torchrun, gloo) against
gradient accumulation, activation checkpointing, label masking on real rows with the real SmolLM2
tokenizer, and the flag parser.

Every run passes --num-threads 1: on a shared 2-core machine torch's default thread pool
oversubscribes the cores and a tiny step takes ~20x longer."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.flop_counter import sdpa_backward_flop_count

import eval as ev
import tiny
import train
from weights.offline import minilm_folder, smollm2_folder
from data.collate import encode_conversation, encode_example, pad_batch, vlm_batch
from data.dataset import load_conversations
from model import LLM
from qformer import QFormer
from text.wordpiece import WordPieceTokenizer
from text.tokenizer import load_tokenizer
from image_processor import ImageProcessor
from vit import ViT
from training.config import (TrainConfig, missing_runs, needs_offline_towers, parse_args, resolve,
                             run_name, stage0_config, tower_config)
import precision
from training.parallel import checkpoint_activations_
from training.presets import PRESETS
from training.progress import ATTENTION_FLOPS
from training.stages import stage_data
from weights.checkpoint import CheckpointError
from vlm import ADAPTERS, DESIGNS, TRAINABLE, VLMConfig, load_run, saved_components

ROOT = Path(__file__).resolve().parents[1]
STAGE_DATA = {1: "captions", 2: "vqa", 3: "mc"}
RUN_FILES = ("config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json",
             "metrics.jsonl", "loss.png", "result.json")
LR = 1e-3


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    base = tmp_path_factory.mktemp("assets")
    return {**tiny.write_backbones(base), "data": tiny.easyvqa_slices(base / "data", n=48)}


def flags(assets, out_dir, stage=1, adapter="crome", steps=2, *extra, batch_size=4, dtype="fp32"):
    data = assets["data"]
    kind = STAGE_DATA[stage]
    return ["--stage", str(stage), "--adapter", adapter, "--llm", str(assets["llm"]),
            "--vision", str(assets["vision"]), "--qformer", str(assets["qformer"]),
            "--data", str(data[f"{kind}_train"]), "--val-data", str(data[f"{kind}_val"]),
            "--image-root", str(data["image_root"]), "--out-dir", str(out_dir),
            "--steps", str(steps), "--batch-size", str(batch_size), "--val-samples", "4",
            "--log-every", "1", "--dtype", dtype, "--lr", str(LR), "--num-threads", "1", *extra]


@pytest.fixture
def main():
    """train.main in this process; afterwards the signal handlers and thread count it set are
    put back, so pytest's own Ctrl-C handling keeps working."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    threads = torch.get_num_threads()
    yield train.main
    for s, h in handlers.items():
        signal.signal(s, h)
    torch.set_num_threads(threads)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> logged loss; a step logged twice (re-run after a resume) keeps its last record."""
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model.safetensors")


def assert_same_tensors(a: dict, b: dict, atol=0.0):
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.allclose(a[k], b[k], rtol=0, atol=atol)]
    assert not bad, f"{len(bad)} tensors differ beyond {atol}, e.g. {bad[:4]}: max |diff| " \
                    f"{max((a[k] - b[k]).abs().max().item() for k in bad):.3g}"


def check_run_dir(run_dir: Path, design: str, stage: int, steps: int):
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), f"{run_dir}: {name} missing"
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["train"]["adapter"], config["train"]["stage"]) == (design, stage)
    assert config["vlm"]["adapter"] == design
    assert json.loads((run_dir / "trainer_state.json").read_text())["step"] == steps
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == steps and 0 < result["trainable_params"] < result["total_params"]
    rows = records(run_dir)
    assert [r["step"] for r in rows if "loss" in r] == list(range(steps))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    assert any("val" in r and r["val"]["n"] == 4 for r in rows)
    state = weights(run_dir)
    assert {k.split(".", 1)[0] for k in state} == set(saved_components(design, stage))
    assert not [k for k in state if k.startswith(("llm.", "vision."))]
    return state


# ----------------------------------------------------------------------------- stages 1 -> 2 -> 3


@pytest.mark.parametrize("design", DESIGNS)
def test_stages_chain_and_hand_over_weights(assets, tmp_path, design, main, capsys):
    steps = 2
    saved = {}
    for stage in (1, 2, 3):
        main(flags(assets, tmp_path, stage, design, steps))
        run_dir = tmp_path / design / f"stage{stage}"
        saved[stage] = check_run_dir(run_dir, design, stage, steps)
        log = capsys.readouterr().out
        if stage > 1:
            previous = tmp_path / design / f"stage{stage - 1}" / "model.safetensors"
            assert f"from {previous}" in log, log
    trained = json.loads((tmp_path / design / "stage1" / "result.json").read_text())
    assert trained["trainable_params"] == sum(v.numel() for v in saved[1].values())
    # stage 2 trains every stage-1 component: it starts from stage 1's weights, so after two
    # AdamW steps (each moves a weight by about lr) it is close to them, but not equal
    for k, v in saved[1].items():
        assert (saved[2][k] - v).abs().max() <= 3 * steps * LR, k
    assert any(not torch.equal(saved[2][k], v) for k, v in saved[1].items())
    # stage 3 trains only the adapter; everything else it saves is stage 2's, bit for bit
    assert TRAINABLE[design][3] == ("adapter",)
    assert_same_tensors({k: v for k, v in saved[3].items() if not k.startswith("adapter.")},
                        {k: v for k, v in saved[2].items() if not k.startswith("adapter.")})
    assert any(not torch.equal(saved[3][k], saved[2][k]) for k in saved[3] if k.startswith("adapter."))


def test_baselines_train_what_they_claim(assets, tmp_path, main):
    """llava: the connector alone over a frozen LLM; full: LLaVA-1.5's recipe, the LLM unfrozen
    in stage 2, saved in the run and loaded back by eval (its text path is what changed)."""
    main(flags(assets, tmp_path, 2, "llava", 2))
    check_run_dir(tmp_path / "llava" / "stage2", "llava", 2, 2)
    main(flags(assets, tmp_path, 2, "full", 2, "--lr-llm", "1e-3"))
    state = weights(tmp_path / "full" / "stage2")
    assert {k.split(".", 1)[0] for k in state} == {"projector", "llm"}
    base = LLM.from_pretrained(str(assets["llm"])).state_dict()
    moved = [k for k, v in base.items() if not torch.equal(state[f"llm.{k}"], v)]
    assert len(moved) == len(base), f"LLM weights that did not train: {set(base) - set(moved)}"
    parts = load_run(tmp_path / "full" / "stage2", bf16=False)
    assert_same_tensors({f"llm.{k}": v for k, v in parts.model.llm.state_dict().items()},
                        {k: v for k, v in state.items() if k.startswith("llm.")})


@pytest.mark.parametrize("design", ["crome", "llava"])
def test_shared_prefix_runs_once_with_the_same_loss_and_gradients(assets, tmp_path, design):
    """The rows' common chat opening runs once, without gradient (vlm.VLM.forward): the loss
    and every gradient equal those of the whole sequence. Only where nothing trainable
    touches text positions: not IAA (its own embedding and layers), MWA (adapters in the
    blocks) or full fine-tuning's stage 2."""
    _, _, job = tiny.job_for(flags(assets, tmp_path, 2, design, 1))
    batch, model = job.batch([0, 1, 2, 3]), job.model.train()
    assert model.prefix_is_frozen() and batch["shared_prefix"] >= 4

    def loss_and_grads(shared):
        torch.manual_seed(0)                       # the same dropout masks
        model.zero_grad()
        loss = model(dict(batch, shared_prefix=shared))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    loss, grads = loss_and_grads(0)
    shared_loss, shared_grads = loss_and_grads(batch["shared_prefix"])
    torch.testing.assert_close(shared_loss, loss)
    assert shared_grads.keys() == grads.keys() and grads
    for name, g in grads.items():
        torch.testing.assert_close(shared_grads[name], g, rtol=1e-4, atol=1e-7, msg=name)
    for other, stage in (("iaa", 2), ("mwa", 2), ("full", 2)):
        assert not tiny.job_for(flags(assets, tmp_path, stage, other, 1))[2].model.prefix_is_frozen()
    assert tiny.job_for(flags(assets, tmp_path, 1, "full", 1))[2].model.prefix_is_frozen()


def test_stage3_without_stage2_exits_clearly(assets, tmp_path, main):
    with pytest.raises(SystemExit, match="stage 3 fine-tunes a stage-2 model: no checkpoint"):
        main(flags(assets, tmp_path, 3, "iaa"))
    assert not (tmp_path / "iaa" / "stage3" / "model.safetensors").exists()


def test_bf16_run_keeps_trainable_weights_in_fp32(assets, tmp_path, main, capsys):
    main(flags(assets, tmp_path, 2, "iaa", 2, dtype="bf16"))
    assert "starting from fresh adapters" in capsys.readouterr().out  # no stage-1 run there
    state = check_run_dir(tmp_path / "iaa" / "stage2", "iaa", 2, 2)
    assert {v.dtype for v in state.values()} == {torch.float32}
    config = json.loads((tmp_path / "iaa" / "stage2" / "config.json").read_text())
    assert config["train"]["dtype"] == "bf16"


# ----------------------------------------------------------------------------- stage 0


def caption_flags(assets, out_dir, *extra) -> list[str]:
    data = assets["data"]
    return ["--out-dir", str(out_dir), "--num-threads", "1", "--batch-size", "4",
            "--data", str(data["captions_train"]), "--val-data", str(data["captions_val"]),
            "--image-root", str(data["image_root"]), "--log-every", "1", *extra]


def train_tower(assets, out_dir, *extra):
    """A short tower run in out_dir/stage0/tower, what stage 0 starts from -> its Job."""
    cfg, env, job = tiny.job_for(["--task", "tower", "--steps", "2", "--val-samples", "4",
                                  *caption_flags(assets, out_dir, *extra)])
    train.train(cfg, job, env)
    return job


def test_the_tower_trains_the_vit_alone_upright_then_turned(assets, tmp_path):
    """The tower run (stage 0's first part): the ViT, the two projections and the temperature
    train on the class token against every caption, no Q-Former pass; the first --upright-steps
    batches show the images as they are, later ones turned (the same rows, the same angles);
    validation scores both views."""
    cfg, _, job = tiny.job_for(["--task", "tower", "--upright-steps", "1", *caption_flags(assets, tmp_path)])
    assert (cfg.stage, cfg.steps, cfg.upright_steps, cfg.lr_vision) == (0, 2000, 1, 1e-3)  # its own
    stage0 = resolve(parse_args(["--stage", "0"]))                                      # defaults
    assert (stage0.steps, stage0.upright_steps, stage0.lr_vision) == (400, 0, 3e-4)
    assert set(job.saved_keys) == {"logit_scale"} | {
        k for k in job.model.state_dict() if k.startswith(("vision.", "cls_proj.", "text_proj."))}
    upright, turned = job.batch([0, 1], step=0), job.batch([0, 1], step=1)
    assert torch.equal(upright["pixels"], job.batch([0, 1], step=0)["pixels"])
    assert torch.equal(turned["pixels"], job.batch([0, 1], step=5)["pixels"])
    assert not torch.equal(upright["pixels"], turned["pixels"])
    calls = []
    job.model.qformer.register_forward_hook(lambda *a: calls.append(1))
    job.model(turned).backward()
    assert not calls                                     # the captions were pooled beforehand
    assert job.model.vision.patch_embed.weight.grad is not None
    assert set(job.validate()) == {"caption_top1_class_token", "caption_top1_class_token_turned", "n"}


def test_stage0_starts_from_the_tower_and_refuses_other_folders(assets, tmp_path, capsys):
    tower = train_tower(assets, tmp_path)
    assert "stage 0 | tower | 2 steps" in capsys.readouterr().out
    _, _, job = tiny.job_for(["--stage", "0", "--steps", "1", *caption_flags(assets, tmp_path)])
    assert_same_tensors(job.model.vision.state_dict(), tower.model.vision.state_dict())
    assert torch.equal(job.model.cls_proj.weight, tower.model.cls_proj.weight)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"train": {"task": "vqa", "stage": 2}}))
    (tmp_path / "other" / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a tower run"):
        tiny.job_for(["--stage", "0", "--init", str(tmp_path / "other"), *caption_flags(assets, tmp_path)])


def test_missing_runs_are_the_tower_then_stage0_once_each(tmp_path):
    cfg = resolve(parse_args(["--out-dir", str(tmp_path)]))
    names = lambda runs: [run_name(dataclasses.asdict(r)) for r in runs]  # noqa: E731
    assert names(missing_runs(cfg)) == ["stage 0 tower", "crome stage 0"]
    stage0 = resolve(parse_args(["--stage", "0", "--out-dir", str(tmp_path)]))
    assert names(missing_runs(stage0)) == ["stage 0 tower"]
    (tmp_path / "stage0" / "tower").mkdir(parents=True)
    (tmp_path / "stage0" / "tower" / "result.json").write_text("{}")
    assert names(missing_runs(cfg)) == ["crome stage 0"] and missing_runs(stage0) == []
    (tmp_path / "stage0" / "qformer").mkdir()
    (tmp_path / "stage0" / "qformer" / "model.safetensors").write_bytes(b"")
    assert missing_runs(cfg) == []


def test_stage0_writes_hub_layout_towers_that_load_back(assets, tmp_path, main):
    train_tower(assets, tmp_path)
    cfg, env, job = tiny.job_for(["--stage", "0", "--steps", "2", "--val-samples", "8",
                                  "--dtype", "fp32", *caption_flags(assets, tmp_path)])
    before = {k: v.clone() for k, v in job.model.state_dict().items()}
    train.train(cfg, job, env)
    out = tmp_path / "stage0"
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        assert (out / "vision" / name).is_file()
    for name in ("config.json", "model.safetensors", "vocab.txt"):
        assert (out / "qformer" / name).is_file()

    vision = ViT.from_pretrained(out / "vision")
    assert_same_tensors(vision.state_dict(), job.model.vision.state_dict())
    qformer = QFormer.from_pretrained(out / "qformer")
    assert_same_tensors(qformer.state_dict(), job.model.qformer.state_dict())
    assert ImageProcessor.from_hf(json.loads((out / "vision" / "preprocessor_config.json").read_text())) \
        == ImageProcessor.clip(job.model.vision.config.image_size)
    assert WordPieceTokenizer.from_pretrained(out / "qformer").encode("a red circle") \
        == WordPieceTokenizer.from_pretrained(minilm_folder()).encode("a red circle")

    # what trained moved and is in the run's checkpoint; the MiniLM text way stayed frozen
    after = job.model.state_dict()
    trainable = {n for n, p in job.model.named_parameters() if p.requires_grad}
    assert set(weights(out)) == trainable
    assert all(not torch.equal(after[k], before[k]) for k in trainable if k.startswith("vision."))
    assert not torch.equal(after["qformer.query_tokens"], before["qformer.query_tokens"])
    assert {"itm_head.weight", "itm_head.bias"} <= trainable   # BLIP-2's ITM trains the head
    frozen = [k for k in after if k not in trainable]
    assert "qformer.word_embeddings.weight" in frozen
    assert all(torch.equal(after[k], before[k]) for k in frozen)
    rows = records(out)
    assert [r["step"] for r in rows if "loss" in r] == [0, 1]
    assert [r["val"]["n"] for r in rows if "val" in r] == [8]
    assert [set(r["val"]) for r in rows if "val" in r] == [
        {"caption_top1_queries", "caption_top1_class_token", "caption_top1_queries_turned",
         "caption_top1_class_token_turned", "itm_accuracy", "n"}]


def test_stage0_without_itm_is_contrastive_only(assets, tmp_path):
    """--no-itm: no matching head, no statements in the batch, no itm_accuracy (the stage 0
    before ITM); the flag reaches the stage 0 a stage-2 run trains first."""
    train_tower(assets, tmp_path)
    cfg, env, job = tiny.job_for(["--stage", "0", "--steps", "1", "--val-samples", "4", "--no-itm",
                                  *caption_flags(assets, tmp_path)])
    assert job.model.itm_head is None
    assert not {"itm_ids", "itm_mask", "itm_labels"} & set(job.batch([0, 1]))
    assert set(job.validate()) == {"caption_top1_queries", "caption_top1_class_token",
                                   "caption_top1_queries_turned", "caption_top1_class_token_turned", "n"}
    assert not stage0_config(resolve(parse_args(["--stage", "2", "--no-itm"]))).itm
    assert stage0_config(resolve(parse_args(["--stage", "2"]))).itm


# ----------------------------------------------------------------------------- resume

# train.py in a subprocess that sends itself a real signal as step `at` begins (so where the run
# stops does not depend on timing): SIGKILL is a crash, SIGTERM a polite stop.
SIGNAL_AT_STEP = """\
import os, signal, sys
import train
at, sig = int(sys.argv[1]), getattr(signal, sys.argv[2])
def lr_factor(step, steps, warmup, original=train.lr_factor):
    if step == at:
        os.kill(os.getpid(), sig)
    return original(step, steps, warmup)
train.lr_factor = lr_factor
train.main(sys.argv[3:])
"""


def run_until_signal(args, at, sig):
    return subprocess.run([sys.executable, "-c", SIGNAL_AT_STEP, str(at), sig, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("design", ["crome", "mwa"])
def test_resume_after_sigkill_matches_an_uninterrupted_run(assets, tmp_path, design, main, capsys):
    """Stage 2 (CROME's Q-Former and MWA's adapters train with dropout: the RNG state must be
    restored too). B saves every 3 steps and is killed as step 4 begins, after logging step 3."""
    main(flags(assets, tmp_path / "a", 2, design, 6, "--save-every", "0"))
    b = flags(assets, tmp_path / "b", 2, design, 6, "--save-every", "3")
    crashed = run_until_signal(b, 4, "SIGKILL")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    run_a, run_b = tmp_path / "a" / design / "stage2", tmp_path / "b" / design / "stage2"
    assert json.loads((run_b / "trainer_state.json").read_text())["step"] == 3
    assert sorted(losses(run_b)) == [0, 1, 2, 3]
    assert not (run_b / "loss.png").exists()

    capsys.readouterr()
    main(b + ["--resume"])
    assert f"resumed {run_b} at step 3" in capsys.readouterr().out
    assert losses(run_b) == losses(run_a)
    assert_same_tensors(weights(run_b), weights(run_a))
    assert_same_tensors(load_file(run_b / "optimizer.safetensors"),
                        load_file(run_a / "optimizer.safetensors"))


def test_sigterm_saves_exits_130_and_resumes_exactly(assets, tmp_path, main, capsys):
    main(flags(assets, tmp_path / "a", 2, "iaa", 6, "--save-every", "0"))
    b = flags(assets, tmp_path / "b", 2, "iaa", 6, "--save-every", "0")
    stopped = run_until_signal(b, 1, "SIGTERM")
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    run_a, run_b = tmp_path / "a" / "iaa" / "stage2", tmp_path / "b" / "iaa" / "stage2"
    assert "SIGTERM: saved a checkpoint at step 2" in stopped.stdout
    assert json.loads((run_b / "trainer_state.json").read_text())["step"] == 2
    assert sorted(losses(run_b)) == [0, 1]

    capsys.readouterr()
    main(b + ["--resume"])
    assert f"resumed {run_b} at step 2" in capsys.readouterr().out
    assert losses(run_b) == losses(run_a)
    assert_same_tensors(weights(run_b), weights(run_a))


def test_resume_refuses_another_design_or_an_empty_dir(assets, tmp_path, main):
    main(flags(assets, tmp_path, 1, "iaa", 2))
    os.rename(tmp_path / "iaa", tmp_path / "mwa")
    with pytest.raises(train.CheckpointError, match="holds iaa stage 1, not mwa stage 1"):
        main(flags(assets, tmp_path, 1, "mwa", 2, "--resume"))
    with pytest.raises(train.CheckpointError, match="no checkpoint in"):
        main(flags(assets, tmp_path, 1, "crome", 2, "--resume"))


# ----------------------------------------------------------------------------- DDP


def test_ddp_two_processes_equal_one_process_with_accumulation(assets, tmp_path, main):
    """torchrun, 2 CPU processes (gloo) x batch 2 vs 1 process x batch 2 x 2 accumulation: the
    same global batches (train.batch_indices), so the same losses and weights."""
    steps = 3
    ddp_args = flags(assets, tmp_path / "ddp", 1, "crome", steps, "--grad-accum", "1", batch_size=2)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "train.py", *ddp_args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "global batch 4 = 2 per device x 1 accumulation x 2 processes" in done.stdout

    main(flags(assets, tmp_path / "one", 1, "crome", steps, "--grad-accum", "2", batch_size=2))
    run_ddp, run_one = tmp_path / "ddp" / "crome" / "stage1", tmp_path / "one" / "crome" / "stage1"
    a, b = losses(run_ddp), losses(run_one)
    assert sorted(a) == sorted(b) == list(range(steps))
    assert all(abs(a[s] - b[s]) <= 1e-5 + 1e-9 for s in a), (a, b)  # logged rounded to 5 decimals
    assert_same_tensors(weights(run_ddp), weights(run_one), atol=1e-5)
    assert len(records(run_ddp)) == steps + 1  # only rank 0 writes: one line per step + validation


# ----------------------------------------------------------------------------- FSDP, activation checkpointing

# train.py under torchrun, every process exiting at once as step `at` begins: a crashed job.
EXIT_AT_STEP = """\
import os, sys
sys.path.insert(0, os.getcwd())
import train
at = int(sys.argv[1])
def lr_factor(step, steps, warmup, original=train.lr_factor):
    if step == at:
        os._exit(1)
    return original(step, steps, warmup)
train.lr_factor = lr_factor
train.main(sys.argv[2:])
"""


def torchrun(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_fsdp_two_processes_resumed_equal_one_process_with_accumulation(assets, tmp_path, main):
    """IAA stage 2 sharded with FSDP2 over 2 CPU processes (gloo), with activation
    checkpointing, crashed as step 3 begins and resumed from its step-2 checkpoint, against 1
    process x 2 accumulation without either: the same losses, trained weights and AdamW state
    (checkpoints hold full tensors, whatever the sharding). The root unit holds frozen and
    trainable parameters together (the LLM's embedding, IAA's own)."""
    steps = 4
    fsdp = flags(assets, tmp_path / "fsdp", 2, "iaa", steps, "--shard", "fsdp",
                 "--activation-checkpointing", "--save-every", "2", batch_size=2)
    script = tmp_path / "exit_at_step.py"
    script.write_text(EXIT_AT_STEP)
    crashed = torchrun(tmp_path, str(script), "3", *fsdp)
    assert crashed.returncode != 0
    run_fsdp = tmp_path / "fsdp" / "iaa" / "stage2"
    assert json.loads((run_fsdp / "trainer_state.json").read_text())["step"] == 2
    done = torchrun(tmp_path, "train.py", *fsdp, "--resume")
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert f"resumed {run_fsdp} at step 2" in done.stdout
    assert "x 2 processes (fsdp) |" in done.stdout and "activation checkpointing" in done.stdout

    main(flags(assets, tmp_path / "one", 2, "iaa", steps, "--grad-accum", "2", batch_size=2))
    run_one = tmp_path / "one" / "iaa" / "stage2"
    a, b = losses(run_fsdp), losses(run_one)
    assert sorted(a) == sorted(b) == list(range(steps))
    assert all(abs(a[s] - b[s]) <= 1e-5 + 1e-9 for s in a), (a, b)  # logged rounded to 5 decimals
    assert_same_tensors(weights(run_fsdp), weights(run_one), atol=1e-5)
    opt_fsdp, opt_one = (load_file(r / "optimizer.safetensors") for r in (run_fsdp, run_one))
    assert_same_tensors(opt_fsdp, opt_one, atol=1e-5)


@pytest.mark.parametrize("design", DESIGNS)
def test_activation_checkpointing_gives_the_same_loss_and_gradients(assets, tmp_path, design):
    """Stage 2 (CROME's Q-Former, IAA's insertion layers and MWA's adapters train; MWA's with
    dropout): one forward and backward with every block checkpointed gives the loss and every
    gradient exactly, while keeping fewer tensors for the backward pass (the blocks' own
    activations; the logits at the answers stay)."""
    _, _, job = tiny.job_for(flags(assets, tmp_path, 2, design, 1))
    batch = job.batch(list(range(4)))

    def loss_and_grads():
        kept = []
        torch.manual_seed(0)
        with saved_tensors_hooks(lambda t: kept.append(t.numel() * t.element_size()) or t,
                                 lambda t: t):
            loss = job.model(batch)
        loss.backward()
        grads = {n: p.grad for n, p in job.model.named_parameters() if p.grad is not None}
        for p in job.trainable():
            p.grad = None
        return loss, grads, sum(kept)

    loss, grads, kept = loss_and_grads()
    checkpoint_activations_(job.model)
    loss_ac, grads_ac, kept_ac = loss_and_grads()
    assert loss_ac.item() == loss.item()
    assert grads and grads.keys() == grads_ac.keys()
    assert_same_tensors(grads_ac, grads)
    assert kept_ac < kept, (kept_ac, kept)


def test_fsdp_refuses_compile_and_the_small_encoders(capsys):
    for argv, message in ((["--shard", "fsdp", "--compile", "yes"], "--shard fsdp runs eagerly"),
                          (["--shard", "fsdp", "--stage", "0"], "stage 0 and retrieval"),
                          (["--shard", "fsdp", "--task", "retrieval", "--adapter", "mwa"],
                           "stage 0 and retrieval")):
        with pytest.raises(SystemExit):
            train.parse_args(argv)
        assert message in capsys.readouterr().err
    # compile's auto is on for CUDA, but not with FSDP
    assert resolve(TrainConfig(device="cuda")).compile == "yes"
    assert resolve(TrainConfig(device="cuda", shard="fsdp")).compile == "no"


# ----------------------------------------------------------------------------- hub Q-Formers (CROME)


@pytest.fixture(scope="module")
def hub_qformers(tmp_path_factory):
    base = tmp_path_factory.mktemp("hub_qformers")
    return {"instructblip": tiny.write_instructblip(base / "instructblip"),
            "blip2": tiny.write_blip2(base / "blip2", text_way=False),
            "blip2_text": tiny.write_blip2(base / "blip2_text", text_way=True),
            "bert": tiny.write_bert(base / "bert"),
            "wide": tiny.write_instructblip(base / "wide", vision_width=48)}


def crome_loss(job) -> torch.Tensor:
    loss = job.model(job.batch([0, 1, 2]))
    loss.backward()
    assert torch.isfinite(loss)
    return loss


def test_crome_trains_on_an_instructblip_folder_and_its_qformer_tokenizer(assets, hub_qformers,
                                                                           tmp_path, main):
    folder = hub_qformers["instructblip"]
    assert (folder / "qformer_tokenizer" / "tokenizer.json").is_file()
    assert not (folder / "vocab.txt").exists()   # the folder's tokenizer.json is the LLM's
    main(flags(assets, tmp_path, 2, "crome", 2, "--qformer", str(folder)))
    run = tmp_path / "crome" / "stage2"
    check_run_dir(run, "crome", 2, 2)
    backbones = json.loads((run / "config.json").read_text())["backbones"]
    assert (backbones["qformer"], backbones["qformer_tokenizer"]) == (str(folder), None)
    parts = load_run(run, bf16=False)
    minilm = WordPieceTokenizer.from_pretrained(minilm_folder())
    question = "What colour is the shape, and is it naïve?"
    assert parts.wordpiece.encode(question) == minilm.encode(question)



def test_crome_on_one_instructblip_repo_as_vision_tower_and_qformer(assets, hub_qformers, tmp_path,
                                                                    main):
    """--vision and --qformer name the same InstructBLIP folder (as the README's hub block does),
    so the Q-Former reads the EVA tower it was trained on, preprocessed as BlipImageProcessor
    does; stage 2 trains and eval.py loads and scores the run."""
    folder = str(hub_qformers["instructblip"])
    main(flags(assets, tmp_path, 2, "crome", 2, "--vision", folder, "--qformer", folder,
               "--pixel-shuffle", "2"))   # the tiny tower's 2x2 patch grid
    run = tmp_path / "crome" / "stage2"
    check_run_dir(run, "crome", 2, 2)
    backbones = json.loads((run / "config.json").read_text())["backbones"]
    assert backbones["vision"] == backbones["qformer"] == folder
    parts = load_run(run, bf16=False)
    assert parts.model.vision.config.family == "blip" and parts.processor == ImageProcessor.blip(32)
    results = ev.main(["--checkpoint", str(run), "--data", str(assets["data"]["vqa_val"]),
                       "--image-root", str(assets["data"]["image_root"]), "--limit", "3",
                       "--max-new-tokens", "3", "--out", str(tmp_path / "eval"), "--num-threads", "1"])
    assert results["metrics"]["n"] == 3


def test_the_qformer_reads_exactly_transformers_instructblip_vision_output(assets, hub_qformers,
                                                                           tmp_path):
    """Pixels as transformers' InstructBlipProcessor makes them; the Q-Former gets the tower's
    last layer after its post_layernorm (LAVIS's ln_vision), the projector the select_layer
    patches, as LLaVA reads them."""
    folder = hub_qformers["instructblip"]
    argv = flags(assets, tmp_path, 2, "crome", 1, "--vision", str(folder), "--qformer", str(folder),
                 "--pixel-shuffle", "1")
    _, _, job = tiny.job_for(argv)
    job.model.cfg.select_layer = -2
    batch = job.batch([0, 1, 2])
    images = [Image.open(job.samples[i].image).convert("RGB") for i in range(3)]
    processor = transformers.InstructBlipProcessor.from_pretrained(folder).image_processor
    assert torch.equal(batch["pixels"], processor(images, return_tensors="pt").pixel_values)
    seen = {}
    for name in ("qformer", "projector"):
        getattr(job.model, name).register_forward_pre_hook(
            lambda module, args, name=name: seen.setdefault(name, args[0]))
    ref = transformers.InstructBlipForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        job.model(batch)
        out = ref.vision_model(pixel_values=batch["pixels"], output_hidden_states=True)
    assert (seen["qformer"] - out.last_hidden_state).abs().max() <= 1e-5
    assert (seen["projector"] - out.hidden_states[-2][:, 1:]).abs().max() <= 1e-5
    assert not torch.allclose(out.hidden_states[-2], out.hidden_states[-1], atol=1e-2)

def test_a_blip2_qformer_with_a_text_way_needs_qformer_tokenizer(assets, hub_qformers, tmp_path):
    argv = flags(assets, tmp_path, 2, "crome", 1, "--qformer", str(hub_qformers["blip2_text"]))
    with pytest.raises(CheckpointError, match="pass --qformer-tokenizer") as error:
        tiny.job_for(argv)
    assert "\n" not in str(error.value)
    _, _, job = tiny.job_for(argv + ["--qformer-tokenizer", str(minilm_folder())])
    assert job.config["backbones"]["qformer_tokenizer"] == str(minilm_folder().resolve())
    assert "instr_ids" in job.batch([0])
    crome_loss(job)


def test_a_blip2_qformer_without_a_text_way_reads_no_instruction(assets, hub_qformers, tmp_path):
    argv = flags(assets, tmp_path, 2, "crome", 1, "--qformer", str(hub_qformers["blip2"]))
    _, _, job = tiny.job_for(argv)
    assert job.parts.wordpiece is None and "instr_ids" not in job.batch([0])
    crome_loss(job)
    with pytest.raises(ValueError, match="has no text way"):
        tiny.job_for(argv + ["--qformer-tokenizer", str(minilm_folder())])


def test_a_bert_folder_initialises_the_qformer_at_the_vision_width(assets, hub_qformers, tmp_path):
    argv = flags(assets, tmp_path, 2, "crome", 1, "--qformer", str(hub_qformers["bert"]))
    _, _, job = tiny.job_for(argv)
    qformer = job.model.qformer
    assert qformer.config.encoder_hidden_size == tiny.VIT["hidden_size"]
    assert qformer.layers[0].cross_attn.key.weight.shape[1] == tiny.VIT["hidden_size"]
    again = tiny.job_for(argv)[2].model.qformer   # the fresh parts are the same every build
    assert_same_tensors(qformer.state_dict(), again.state_dict())
    crome_loss(job)


def test_a_vision_qformer_width_mismatch_names_both_widths(assets, hub_qformers, tmp_path):
    argv = flags(assets, tmp_path, 2, "crome", 1, "--qformer", str(hub_qformers["wide"]))
    with pytest.raises(ValueError, match=r"features are 32 wide.*reads 48-wide") as error:
        tiny.job_for(argv)
    assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------- LLaVA-format rows


def mixed_rows(vqa_file: Path) -> list[dict]:
    """Two easy-vqa rows, one made two-turn, and two text-only rows (no "image", as in
    llava_v1_5_mix665k), one of them two-turn."""
    first, second = json.loads(vqa_file.read_text())[:2]
    more = [{"from": "human", "value": "And is it big?"}, {"from": "gpt", "value": "no"}]
    chat = [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "blue"}]
    return [first, dict(second, conversations=second["conversations"] + more),
            {"id": "text", "conversations": chat},
            {"id": "text2", "conversations": chat + more}]


@pytest.fixture(scope="module")
def mixed_file(assets, tmp_path_factory):
    path = tmp_path_factory.mktemp("mixed") / "mixed.json"
    path.write_text(json.dumps(mixed_rows(assets["data"]["vqa_train"])))
    return path


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_a_batch_of_image_and_text_only_rows_trains_every_design(assets, mixed_file, tmp_path,
                                                                 adapter):
    argv = flags(assets, tmp_path, 2, adapter, 1, "--data", str(mixed_file))
    _, _, job = tiny.job_for(argv)
    batch = job.batch([0, 1, 2, 3])
    n_visual = job.model.n_visual
    assert batch["image_mask"].sum(1).tolist() == [n_visual, n_visual, 0, 0]
    assert batch["pixels"].shape[0] == 2
    spans = [len(runs(row.tolist(), labelled=True)) for row in batch["labels"]]
    assert spans == [1, 2, 1, 2]
    loss = job.model(batch)
    loss.backward()
    assert torch.isfinite(loss)
    for name, (params, _) in job.param_groups.items():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), name
    job.model.zero_grad()
    text_only = job.batch([2, 3])
    assert "pixels" not in text_only and not text_only["image_mask"].any()
    # a batch of text-only rows alone trains too (it crashed where only visual modules train):
    # every trainable weight gets a gradient, zero for the projector, which it never reached
    loss = job.model(text_only)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in job.trainable())
    assert all(not p.grad.any() for p in job.model.projector.parameters())


# ----------------------------------------------------------------------------- labels on real rows

SYSTEM = "Answer the question about the image in a word or two."
N_VISUAL = 8


@pytest.fixture(scope="module")
def smollm2():
    return load_tokenizer(smollm2_folder())


@pytest.fixture(scope="module")
def vqa_rows(assets):
    samples, _ = load_conversations(assets["data"]["vqa_train"], assets["data"]["image_root"])
    return samples[:12]


def test_labels_cover_only_the_answer_and_end_of_turn(smollm2, vqa_rows):
    end = smollm2.token_id("<|im_end|>")
    assert smollm2.stop_ids[0] == end
    for sample in vqa_rows:
        question, answer = sample.turns[0]
        e = encode_example(smollm2, SYSTEM, question, answer, N_VISUAL)
        assert len(e.input_ids) == len(e.image_mask) == len(e.labels)
        labelled = [i for i, label in enumerate(e.labels) if label != -100]
        n_answer = len(smollm2.encode(answer)) + 1
        assert labelled == list(range(len(e.labels) - n_answer, len(e.labels)))  # the tail only
        assert [e.input_ids[i] for i in labelled] == [e.labels[i] for i in labelled]
        assert e.labels[-1] == end
        assert smollm2.decode([e.labels[i] for i in labelled]) == answer + "<|im_end|>"

        ones = [i for i, m in enumerate(e.image_mask) if m]
        assert len(ones) == N_VISUAL and ones == list(range(ones[0], ones[0] + N_VISUAL))
        head = smollm2.decode(e.input_ids[:ones[0]])
        assert head == f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
        assert all(e.input_ids[i] == 0 for i in ones)
        rest = smollm2.decode(e.input_ids[ones[-1] + 1:labelled[0]])
        assert rest == f"\n{question}<|im_end|>\n<|im_start|>assistant\n"

        prompt = encode_example(smollm2, SYSTEM, question, None, N_VISUAL)
        assert prompt.input_ids == e.input_ids[:labelled[0]] and set(prompt.labels) == {-100}


# Today's token ids of two single-turn easy-vqa rows, pinned before multi-turn conversations
# and text-only rows were added: the single-turn path must stay byte-identical.
HEAD = [1, 9690, 198, 2, 198, 1, 4093, 198]                       # system + user header
ASSISTANT = [2, 198, 1, 520, 9531, 198]                            # end of turn + assistant header
PINNED_QUESTIONS = [[198, 5588, 2380, 314, 260, 14973, 47],            # "\nwhat color is the triangle?"
                    [198, 26802, 451, 2443, 441, 2127, 253, 7842, 47]]  # "\ndoes this image not ..."
PINNED_ANSWERS = [[16591, 2], [10407, 2]]                          # "blue", "yes" + <|im_end|>


def test_single_turn_ids_are_pinned(smollm2):
    parts = SimpleNamespace(model=SimpleNamespace(cfg=SimpleNamespace(system_prompt=""), n_visual=4),
                            tok=smollm2, wordpiece=None)
    questions = ["what color is the triangle?", "does this image not contain a circle?"]
    pixels = lambda images: torch.zeros(len(images), 3, 2, 2)  # noqa: E731
    train = vlm_batch(parts, pixels, ["a", "b"], questions, ["blue", "yes"])
    prompts = [HEAD + [0] * 4 + q + ASSISTANT for q in PINNED_QUESTIONS]
    rows = [p + a for p, a in zip(prompts, PINNED_ANSWERS)]
    assert train["input_ids"].tolist() == [rows[0] + [0, 0], rows[1]]
    assert train["labels"].tolist() == [[-100] * 25 + [16591, 2, -100, -100],
                                        [-100] * 27 + [10407, 2]]
    assert train["image_mask"].long().tolist() == [[0] * 8 + [1] * 4 + [0] * 17] * 2
    generate = vlm_batch(parts, pixels, ["a", "b"], questions)
    assert generate["input_ids"].tolist() == [[0, 0] + prompts[0], prompts[1]]
    assert generate["attn_mask"].tolist() == [[0, 0] + [1] * 25, [1] * 27]
    assert generate["image_mask"].long().tolist() == [[0] * 10 + [1] * 4 + [0] * 13,
                                                      [0] * 8 + [1] * 4 + [0] * 15]
    assert set(generate["labels"].flatten().tolist()) == {-100}


CONVERSATION = [("what color is the shape?", "red"), ("and its shape?", "a circle"),
                ("Is it <|im_end|> big?", "no")]   # special-token text in a question stays text


def runs(labels, labelled: bool) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of positions that are (or are not) labelled."""
    marks = [(label != -100) == labelled for label in labels] + [False]
    starts = [i for i, m in enumerate(marks) if m and (i == 0 or not marks[i - 1])]
    return [(i, next(j for j in range(i, len(marks)) if not marks[j])) for i in starts]


def decode_with_image(tok, e, start, end) -> str:
    """Positions start..end decoded, the visual positions written as <image>."""
    pieces, i = [], start
    while i < end:
        j = i
        while j < end and e.image_mask[j] == e.image_mask[i]:
            j += 1
        pieces.append("<image>" if e.image_mask[i] else tok.decode(e.input_ids[i:j]))
        i = j
    return "".join(pieces)


def chat(tok, turns, image=True, generation=False) -> str:
    messages = [{"role": "system", "content": SYSTEM}]
    for k, (question, answer) in enumerate(turns):
        messages.append({"role": "user", "content": f"<image>\n{question}" if image and k == 0
                         else question})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    return tok.render_chat(messages, add_generation_prompt=generation)


def test_every_assistant_turn_is_labelled_and_only_prompts_and_markup_are_not(smollm2):
    e = encode_conversation(smollm2, SYSTEM, CONVERSATION, N_VISUAL)
    spans = runs(e.labels, labelled=True)
    assert len(spans) == len(CONVERSATION)
    for (start, end), (_, answer) in zip(spans, CONVERSATION):
        assert e.labels[start:end] == e.input_ids[start:end]
        assert smollm2.decode(e.labels[start:end]) == answer + "<|im_end|>"
    prompts = [decode_with_image(smollm2, e, start, end) for start, end in runs(e.labels, False)]
    header = "<|im_end|>\n<|im_start|>assistant\n"
    assert prompts == [f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n<image>\n"
                       f"{CONVERSATION[0][0]}{header}"] + \
        [f"\n<|im_start|>user\n{question}{header}" for question, _ in CONVERSATION[1:]]
    assert decode_with_image(smollm2, e, 0, len(e.labels)) == chat(smollm2, CONVERSATION)[:-1]
    assert sum(e.image_mask) == N_VISUAL
    # the system's, and per turn the question's and the answer's: none from the question's text
    assert e.input_ids.count(smollm2.token_id("<|im_end|>")) == 1 + 2 * len(CONVERSATION)


def test_history_turns_are_teacher_forced_and_later_turns_dropped_when_too_long(smollm2):
    full = encode_conversation(smollm2, SYSTEM, CONVERSATION, N_VISUAL)
    last = runs(full.labels, labelled=True)[-1]
    scored = encode_conversation(smollm2, SYSTEM, CONVERSATION, N_VISUAL, label_history=False)
    assert scored.input_ids == full.input_ids and runs(scored.labels, True) == [last]
    asked = CONVERSATION[:-1] + [(CONVERSATION[-1][0], None)]
    prompt = encode_conversation(smollm2, SYSTEM, asked, N_VISUAL, label_history=False)
    assert prompt.input_ids == full.input_ids[:last[0]] and set(prompt.labels) == {-100}
    second_end = runs(full.labels, labelled=True)[1][1]
    cut = encode_conversation(smollm2, SYSTEM, CONVERSATION, N_VISUAL, max_len=len(full.labels) - 1)
    assert cut.input_ids == full.input_ids[:second_end] and len(runs(cut.labels, True)) == 2
    with pytest.raises(ValueError, match="earlier turns and the question"):
        encode_conversation(smollm2, SYSTEM, asked, N_VISUAL, max_len=last[0] - 1)
    with pytest.raises(ValueError, match="earlier turns and the question"):  # a scored answer
        encode_conversation(smollm2, SYSTEM, CONVERSATION, N_VISUAL, max_len=len(full.labels) - 1,
                            label_history=False)


def test_a_text_only_row_has_no_visual_positions(smollm2):
    for turns in (CONVERSATION[:1], CONVERSATION):
        e = encode_conversation(smollm2, SYSTEM, turns, 0)
        assert not any(e.image_mask) and len(runs(e.labels, labelled=True)) == len(turns)
        assert smollm2.decode(e.input_ids) == chat(smollm2, turns, image=False)[:-1]


def test_truncation_cuts_the_question_never_the_answer(smollm2, vqa_rows):
    question, answer = vqa_rows[0].turns[0]
    full = encode_example(smollm2, SYSTEM, question, answer, N_VISUAL)
    n_question = len(smollm2.encode("\n" + question))
    fixed = len(full.input_ids) - n_question  # markup + image + answer + end
    for keep in (n_question - 1, 3, 1):
        cut = encode_example(smollm2, SYSTEM, question, answer, N_VISUAL, max_len=fixed + keep)
        assert len(cut.input_ids) == fixed + keep
        n_label = sum(label != -100 for label in cut.labels)
        assert cut.labels[-n_label:] == full.labels[-n_label:]
        assert smollm2.decode(cut.labels[-n_label:]) == answer + "<|im_end|>"
        assert cut.image_mask == full.image_mask[:len(cut.image_mask)]
        assert cut.input_ids[-n_label - 5:] == full.input_ids[-n_label - 5:]  # header + answer kept
    assert encode_example(smollm2, SYSTEM, question, answer, N_VISUAL, max_len=fixed + n_question) == full
    for impossible in (fixed - 1, 3):
        with pytest.raises(ValueError, match="do not fit in max_len"):
            encode_example(smollm2, SYSTEM, question, answer, N_VISUAL, max_len=impossible)


def test_pad_batch_right_for_training_left_for_generation(smollm2, vqa_rows):
    rows = [encode_example(smollm2, SYSTEM, s.turns[0][0], s.turns[0][1], N_VISUAL) for s in vqa_rows[:4]]
    lengths = [len(r.input_ids) for r in rows]
    assert len(set(lengths)) > 1, "pick rows of different lengths"
    T = max(lengths)
    right, left = pad_batch(rows), pad_batch(rows, left=True)
    assert "attn_mask" not in right and left["attn_mask"].shape == (4, T)
    for batch in (right, left):
        assert batch["input_ids"].shape == batch["labels"].shape == batch["image_mask"].shape == (4, T)
        assert batch["image_mask"].dtype == torch.bool
        assert batch["image_mask"].sum(1).tolist() == [N_VISUAL] * 4
    for i, (r, n) in enumerate(zip(rows, lengths)):
        assert right["input_ids"][i, :n].tolist() == r.input_ids
        assert right["labels"][i, :n].tolist() == r.labels
        assert set(right["labels"][i, n:].tolist()) <= {-100}
        assert set(right["input_ids"][i, n:].tolist()) <= {0}
        assert left["input_ids"][i, T - n:].tolist() == r.input_ids
        assert left["image_mask"][i, T - n:].tolist() == [bool(m) for m in r.image_mask]
        assert left["attn_mask"][i].tolist() == [0] * (T - n) + [1] * n
        assert not left["image_mask"][i, :T - n].any()


# ----------------------------------------------------------------------------- flags


def test_parse_args_types_and_booleans():
    cfg = train.parse_args(["--stage", "3", "--adapter", "mwa", "--lr", "3e-4", "--steps", "7",
                            "--grad-accum", "2", "--resume"])
    assert (cfg.stage, cfg.adapter, cfg.lr, cfg.steps, cfg.grad_accum, cfg.resume) == \
        (3, "mwa", 3e-4, 7, 2, True)
    assert train.parse_args([]).resume is False
    assert train.parse_args(["--resume", "--no-resume"]).resume is False
    assert train.parse_args([]) == TrainConfig()


def test_chat_format_flag_reaches_the_tokenizer_and_the_run_config():
    """--chat-format picks the LLM's chat format (auto: from its template); the run's "vlm"
    config carries it to load_run, and run directories written before it load as auto."""
    assert train.parse_args([]).chat_format == "auto"
    assert train.parse_args(["--chat-format", "vicuna"]).chat_format == "vicuna"
    vcfg = VLMConfig.from_dict(VLMConfig(chat_format="llama2").to_dict())
    assert vcfg.chat_format == "llama2"
    old = VLMConfig().to_dict()
    del old["chat_format"]
    assert VLMConfig.from_dict(old).chat_format == "auto"
    assert load_tokenizer(smollm2_folder(), "plain").render_chat(
        [{"role": "user", "content": "hi"}]) == "user: hi\n\nassistant:"


@pytest.mark.parametrize("argv, message", [
    (["--adapter", "lora"], "argument --adapter: invalid choice: 'lora'"),
    (["--stage", "5"], "argument --stage: invalid choice: 5"),
    (["--dtype", "fp16"], "argument --dtype: invalid choice"),
    (["--chat-format", "alpaca"], "argument --chat-format: invalid choice: 'alpaca'"),
    (["--steps", "ten"], "argument --steps: invalid int value"),
    (["--batch-size", "-1"], "--batch-size and --steps must be >= 0"),
    (["--grad-accum", "0"], "--grad-accum >= 1"),
    (["--lr-vision", "-0.001"], "--lr-vision must be >= 0"),
    (["--stage", "1", "--negated-share", "0.25"], "--negated-share applies to easy-vqa's stage 2"),
    (["--negated-share", "1"], "--negated-share applies to easy-vqa's stage 2"),
    (["--negated-share", "0.25", "--data", "x.json", "--image-root", "."], "--negated-share applies"),
    (["--resume=yes"], "ignored explicit argument"),
    (["--stage", "0", "--vision", "openai/clip-vit-base-patch16", "--qformer", "Salesforce/blip2-opt-2.7b"],
     "the tower and stage 0 pretrain the offline vision tower"),
])
def test_parse_args_refuses_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- prerequisites


def test_a_hub_vision_tower_needs_no_stage0_outside_crome(assets, tmp_path, main, capsys):
    """--adapter iaa --vision <a CLIP folder>: the default --qformer offline is CROME's alone,
    so no stage 0 trains first (the run starts in its own directory, and stage0/ never exists)."""
    argv = flags(assets, tmp_path, 2, "iaa", 1)
    argv[argv.index("--qformer"):argv.index("--qformer") + 2] = []   # the default: offline
    main(argv)
    out = capsys.readouterr().out
    assert "training it first" not in out and not (tmp_path / "stage0").exists()
    assert out.lstrip().startswith(("no stage-1 checkpoint", "stage 2 | iaa")), out[:300]
    config = json.loads((tmp_path / "iaa" / "stage2" / "config.json").read_text())
    assert config["backbones"]["qformer"] is None


def test_a_run_starts_from_the_same_weights_whether_or_not_stage0_trained_first(monkeypatch,
                                                                                main):
    """On a fresh machine main trains stage 0 before the run asked for; the run's random
    initialisation must not depend on that (main seeds right before each build_job)."""
    draws = []

    def build_job(cfg, env):
        draws.append((run_name(dataclasses.asdict(cfg)), torch.rand(4)))  # what a model's init draws
        return cfg.stage

    def fake_train(cfg, job, env):
        torch.rand(1000)                              # training draws random numbers too
        return {"stage": job}

    monkeypatch.setattr(train, "check_prerequisites", lambda cfg: None)
    monkeypatch.setattr(train, "build_job", build_job)
    monkeypatch.setattr(train, "train", fake_train)
    for ready in (False, True):
        monkeypatch.setattr(train, "missing_runs", lambda cfg, ready=ready: [] if ready else
                            [tower_config(stage0_config(cfg)), stage0_config(cfg)])
        main(["--stage", "2", "--num-threads", "1"])
    assert [name for name, _ in draws] == ["stage 0 tower", "crome stage 0", "crome stage 2",
                                           "crome stage 2"]
    assert torch.equal(draws[2][1], draws[3][1])


def test_stage3_without_stage2_fails_before_any_training(assets, tmp_path, main, capsys):
    """With the offline vision tower missing too: the stage-3 prerequisite is reported at once,
    not after training stage 0."""
    argv = [a if a != str(assets["vision"]) else "offline" for a in flags(assets, tmp_path, 3, "mwa", 1)]
    with pytest.raises(SystemExit, match="stage 3 fine-tunes a stage-2 model"):
        main(argv)
    assert not (tmp_path / "stage0").exists()
    assert "stage 0" not in capsys.readouterr().out


@pytest.mark.parametrize("argv, needs", [
    ([], True),                                                        # CROME, offline default
    (["--adapter", "iaa", "--vision", "clip"], False),
    (["--adapter", "mwa", "--vision", "clip", "--qformer", "blip2"], False),
    (["--adapter", "crome", "--vision", "clip"], True),                # its Q-Former is offline
    (["--adapter", "crome", "--vision", "clip", "--qformer", "blip2"], False),
    (["--adapter", "llava"], True),                                    # the offline ViT
    (["--stage", "0"], False),                                         # stage 0 is the tower
    (["--task", "retrieval", "--adapter", "mwa"], True),               # stage 0's dual encoder
    (["--task", "retrieval", "--adapter", "mwa", "--init", "somewhere"], False),
])
def test_which_runs_need_the_offline_towers(argv, needs):
    assert needs_offline_towers(resolve(train.parse_args(argv))) is needs


def test_config_is_resolved_once_and_frozen():
    cfg = resolve(train.parse_args(["--stage", "3", "--device", "cpu"]))
    assert (cfg.steps, cfg.batch_size, cfg.compile) == (200, 16, "no")
    assert cfg.dtype == precision.default_dtype(torch.device("cpu"))
    assert resolve(cfg) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 1
    assert resolve(train.parse_args(["--task", "retrieval", "--adapter", "mwa"])).steps == 0  # one epoch


@pytest.mark.parametrize("bf16_speedup, dtype", [(4.0, "bf16"), (1.2, "fp32"), (0.5, "fp32")])
def test_auto_dtype_on_cpu_is_bf16_where_its_matmuls_are_measured_faster(monkeypatch,
                                                                        bf16_speedup, dtype):
    peaks = {"fp32": 1e11, "bf16": bf16_speedup * 1e11}
    monkeypatch.setattr(precision, "cpu_peak_flops", lambda kind, threads: peaks[kind])
    assert resolve(train.parse_args(["--device", "cpu"])).dtype == dtype
    assert resolve(train.parse_args(["--device", "cpu", "--dtype", "fp32"])).dtype == "fp32"


def test_every_flag_has_help(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata["help"], f.name
        assert "--" + f.name.replace("_", "-") in text


def test_stage2_on_easyvqa_validates_on_balanced_yes_no_too(assets, tmp_path, main):
    """Without --data, stage 2 validates on easy-vqa's validation questions and on its balanced
    yes/no subset (data.easyvqa.balanced_yesno), where a question-only model gets 50%."""
    argv = flags(assets, tmp_path, 2, "mwa", 1)
    for name in ("--data", "--val-data", "--image-root"):
        del argv[argv.index(name):argv.index(name) + 2]
    cfg, env, job = tiny.job_for(argv)
    result = job.validate()
    assert result["n"] == 4 and 0.0 <= result["yesno_balanced_accuracy"] <= 1.0


def test_easyvqa_stage2_trains_on_balanced_rows_and_random_views_on_request(assets, tmp_path):
    """Without --data, stage 2 trains on vqa-balanced_train (yes/no balanced per template);
    --no-balance-yesno trains on every row. --augment trains on random views of the images: the
    same rows give the same views (resume repeats them), and the pixels differ from the plain
    ones; the stage 0 trained first does not take it over (it turns every image instead)."""
    assert resolve(parse_args([])).augment is False
    assert stage0_config(resolve(parse_args(["--augment"]))).augment is False
    assert stage_data(resolve(parse_args([]))).train.name == "vqa-balanced_train.json"
    assert stage_data(resolve(parse_args(["--no-balance-yesno"]))).train.name == "vqa_train.json"
    stage3 = stage_data(resolve(parse_args(["--stage", "3"])))   # the choice task, not letters
    assert (stage3.train.name, stage3.val.name, stage3.balanced_val) == \
        ("choice_train.json", "choice_val.json", None)
    argv = flags(assets, tmp_path, 2, "mwa", 1)
    for name in ("--data", "--val-data", "--image-root"):
        del argv[argv.index(name):argv.index(name) + 2]
    _, _, job = tiny.job_for(argv + ["--augment"])
    _, _, plain = tiny.job_for(argv)
    assert job.samples[0].id == plain.samples[0].id
    assert torch.equal(job.batch([0, 1])["pixels"], job.batch([0, 1])["pixels"])
    assert not torch.equal(job.batch([0, 1])["pixels"], plain.batch([0, 1])["pixels"])


# ----------------------------------------------------------------------------- paper-scale flags


def visual_feature_check(job):
    """The projector reads the ViT layer the config names: with CROME's fresh adapter (its
    shared up-projection is zero, so it starts as the identity) the image tokens are exactly
    projector(vision(pixels, select_layer)) without the class token."""
    model, batch = job.model, job.batch([0])
    with torch.no_grad():
        visual = model.visual_tokens(batch["pixels"], batch["instr_ids"], batch["instr_mask"])
        feats = model.vision(batch["pixels"], select_layer=model.cfg.select_layer)[:, 1:]
        assert torch.equal(visual[:, :model.n_image_tokens], model.projector(feats))
    return batch


def test_paper_scale_flags_reach_the_model_and_reload_with_it(assets, tmp_path, main):
    argv = flags(assets, tmp_path, 2, "crome", 1, "--select-layer", "-2", "--pad-to-square",
                 "--max-instruction-len", "6", "--lr-adapter", "5e-4", "--max-len", "200")
    cfg, _, job = tiny.job_for(argv)
    assert (cfg.select_layer, cfg.pad_to_square, cfg.max_instruction_len, cfg.max_len) == \
        (-2, True, 6, 200)
    assert job.model.cfg.select_layer == -2 and job.parts.processor.pad_to_square
    assert visual_feature_check(job)["instr_ids"].shape[1] == 6   # questions are longer
    wide = Image.new("RGB", (40, 20), (255, 0, 0))                # padded with the mean colour
    assert job.parts.processor([wide])[0, :, 0, 0].abs().max() < 0.02
    assert {name: lr for name, (_, lr) in job.param_groups.items()} == \
        {"projector": LR, "qformer": cfg.lr_qformer, "qformer_proj": LR, "adapter": 5e-4}
    main(argv)
    run = tmp_path / "crome" / "stage2"
    saved = json.loads((run / "config.json").read_text())
    assert (saved["vlm"]["select_layer"], saved["vlm"]["pad_to_square"],
            saved["vlm"]["max_instruction_len"], saved["train"]["lr_adapter"]) == (-2, True, 6, 5e-4)
    parts = load_run(run, bf16=False)
    assert (parts.model.cfg.select_layer, parts.model.cfg.max_instruction_len) == (-2, 6)
    assert parts.processor.pad_to_square is True


def test_paper_scale_flags_default_to_the_offline_setting(assets, tmp_path):
    """Unset, nothing changes: layer -1, 32 instruction tokens, --lr for the adapter, and the
    padding the vision folder's preprocessor_config asks for (recorded as found); a run
    directory written before pad_to_square existed reads it as unset."""
    cfg, _, job = tiny.job_for(flags(assets, tmp_path, 2, "crome", 1))
    assert (cfg.select_layer, cfg.max_instruction_len, cfg.lr_adapter, cfg.pad_to_square) == \
        (-1, 32, LR, None)
    assert job.config["vlm"]["pad_to_square"] is False and job.param_groups["adapter"][1] == LR
    visual_feature_check(job)
    old = VLMConfig().to_dict()
    del old["pad_to_square"]
    assert VLMConfig.from_dict(old).pad_to_square is None
    assert train.parse_args(["--no-pad-to-square"]).pad_to_square is False


# ----------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_every_preset_resolves_without_the_network(name, stage):
    """Config resolution only (no download): every value is a flag's, has a source, and lands
    in the config; the examples fit the image tokens with room for text; hub backbones need no
    stage 0."""
    cfg = resolve(train.parse_args(["--preset", name, "--stage", str(stage), "--device", "cpu"]))
    chosen = PRESETS[name]
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(chosen.values(stage)) <= names
    assert all(chosen.sources(stage).values())
    assert {k: getattr(cfg, k) for k in chosen.values(stage)} == chosen.values(stage)
    assert cfg.preset == name and cfg.lr_adapter > 0
    assert cfg.max_len >= chosen.image_tokens.value + 1024
    assert not needs_offline_towers(cfg)
    assert f"`{name}`" in (ROOT / "README.md").read_text()   # the preset table names it


def test_flags_given_override_a_preset_and_the_stage_picks_its_values():
    argv = ["--preset", "llava15-7b", "--lr", "5e-4", "--no-pad-to-square", "--select-layer", "-1"]
    cfg = train.parse_args(argv + ["--stage", "1"])
    assert (cfg.lr, cfg.pad_to_square, cfg.select_layer) == (5e-4, False, -1)
    assert (cfg.adapter, cfg.max_len, cfg.batch_size, cfg.steps) == ("full", 2048, 32, 2180)
    stage2 = train.parse_args(["--stage", "2"] + argv)          # flag order does not matter
    assert (stage2.lr, stage2.lr_llm, stage2.batch_size) == (5e-4, 2e-5, 16)
    assert train.parse_args(["--preset", "llava15-7b", "--stage", "2"]).lr == 2e-5


def test_an_unknown_preset_names_the_known_ones_and_help_lists_them(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--preset", "llava15"])
    assert exit_info.value.code == 2
    assert f"unknown preset 'llava15'; known: {', '.join(PRESETS)}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--preset", "llava15-7b", "--help"])
    text = capsys.readouterr().out
    assert all(name in text.split("presets (--preset NAME", 1)[1] for name in PRESETS)
    assert "(default: lmsys/vicuna-7b-v1.5)" in " ".join(text.split())   # the preset's values


@pytest.mark.parametrize("name", ["crome-vicuna7b", "iaa8-llama3-8b"])
def test_a_preset_on_tiny_backbones_reaches_the_model(assets, tmp_path, main, name):
    """The preset with its backbones, data and schedule overridden by tiny stand-ins: its
    paper-scale knobs reach the model, the processor and the optimizer, and load_run rebuilds
    them. (SmolLM2's tokenizer stands in for the LLM's, so its own chat format.)"""
    argv = ["--preset", name, *flags(assets, tmp_path, 2, PRESETS[name].values(2)["adapter"], 1,
                                     "--chat-format", "auto")]
    cfg, _, job = tiny.job_for(argv)
    model = job.model
    assert (model.cfg.select_layer, model.cfg.shuffle, cfg.max_len, cfg.weight_decay) == \
        (-2, 1, 2048, 0.0)
    assert job.parts.processor.pad_to_square
    assert model.n_image_tokens == (tiny.VIT["image_size"] // tiny.VIT["patch_size"]) ** 2
    lrs = {name: lr for name, (_, lr) in job.param_groups.items()}
    assert lrs["adapter"] == 2e-5 and lrs["projector"] == LR   # preset's; --lr given
    if name.startswith("crome"):
        assert model.cfg.max_instruction_len == 128 and lrs["qformer"] == 2e-5
        visual_feature_check(job)
        main(argv)
        parts = load_run(tmp_path / "crome" / "stage2", bf16=False)
        assert (parts.model.cfg.select_layer, parts.model.cfg.shuffle,
                parts.model.cfg.max_instruction_len, parts.processor.pad_to_square) == \
            (-2, 1, 128, True)
    else:
        assert len(model.adapter.layers) == 8


def test_attention_flops_count_grouped_query_attention_as_full_heads():
    """count_flops' formulas for CUDA's attention kernels (ATTENTION_FLOPS): 9 query heads over
    3 shared key / value heads cost what 9 full heads cost, forward and backward."""
    q, kv, full = (2, 9, 5, 64), (2, 3, 7, 64), (2, 9, 7, 64)
    forward = ATTENTION_FLOPS[torch.ops.aten._scaled_dot_product_efficient_attention]
    backward = ATTENTION_FLOPS[torch.ops.aten._scaled_dot_product_flash_attention_backward]
    assert forward(q, kv, kv) == 2 * (2 * 2 * 9 * 5 * 7 * 64)   # scores, then scores @ v
    assert backward(q, q, kv, kv) == sdpa_backward_flop_count(q, q, full, full) > forward(q, kv, kv)
