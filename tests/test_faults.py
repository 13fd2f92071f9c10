"""
Fault injection, counted (issue 7): malformed inputs handed to train.py and the loaders, and
faults injected while they run. Every case ends in a clear error -- an exception of a project
type (CheckpointError, DataError, ValueError, FloatingPointError) raised from project code with
a message naming the file, row, step or flag, a SystemExit with its message, or the OSError we
injected -- or in a documented skip (--on-bad-sample skip, --nan-policy skip); and no case loses
or corrupts a checkpoint: after each fault the previous one is intact and --resume works.

    malformed input: a bad file, row, image, flag, checkpoint folder or hub repo a user hands in
    injected fault:  something going wrong at run time -- a write that fails (full disk, failed
                     rename, Ctrl-C), a run's file damaged or deleted after it was written, a
                     NaN loss, an unpickler that must never run

Counted here: 38 malformed inputs and 27 injected faults, 65 cases; 0 of them are known gaps
(a gap would be marked xfail(strict=True) with the fix in the reason).

    area        inputs  faults  what
    data           6       0    bomb image, non-UTF-8 JSON, wrongly typed rows, all rows bad
    seqlen         3       0    over-long prompt (truncated), over-long answer, --max-len too small
    checkpoint     6      11    --init from another design / kind / config; damaged run files
    atomic         0      11    save_safetensors / save_json / save_training_state failing midway
    training       1       3    NaN loss (stop, skip, skip on the last step), --lr 1e30
    cli           13       0    bad flag combinations, in-process and as subprocesses
    security       9       2    pickles never loaded, hub downloads limited to allow_patterns

Covered elsewhere, not counted again: tests/test_data.py (16 malformed rows named or skipped by
load_conversations; non-UTF-8, invalid and non-list JSON files; broken, truncated and
decompression-bomb images at the load_image level), tests/test_model.py, test_vit.py,
test_qformer.py (strict loading: missing, unexpected, misshaped tensors, truncated safetensors,
wrong model types), tests/test_train.py (exact resume after SIGKILL and SIGTERM, --resume on
another design or an empty folder, stage 3 without stage 2 in-process, flags parse_args refuses).

Runs use tests/tiny.py's hub-layout backbones and train.main in this process (signal handlers
and thread count put back after each run), except the three CLI cases that check a subprocess
prints no traceback.
"""
import errno
import json
import os
import pathlib
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import traceback
import zlib
from collections import Counter
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tiny
import train
import training.checkpointing as checkpointing
import weights.checkpoint as checkpoint
from data.dataset import DataError
from evaluation.answerer import Answerer
from model import LLM
from qformer import QFormer
from text.tokenizer import load_tokenizer
from text.wordpiece import WordPieceTokenizer
from vit import ViT
from vlm import VLM
from weights.checkpoint import CheckpointError, save_json, save_safetensors

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = {p.resolve() for p in ROOT.rglob("*.py") if "tests" not in p.relative_to(ROOT).parts}
KIND_OF_DATA = {1: "captions", 2: "vqa", 3: "mc"}
STEPS, SAVE_EVERY = 4, 2  # the reference run: 4 steps, checkpoints after steps 2 and 4


# ----------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Case:
    area: str
    kind: str    # "input" (malformed input) | "fault" (injected fault)
    id: str
    gap: bool    # a known gap, xfail(strict=True)


REGISTRY: list[Case] = []


def case(kind, case_id, *values, gap="", marks=()):
    """One case of a parametrized test; gap = why it fails today and the fix (xfail, strict)."""
    assert kind in ("input", "fault"), kind
    marks = [*marks, *([pytest.mark.xfail(strict=True, reason=gap)] if gap else [])]
    return kind, bool(gap), pytest.param(*values, id=case_id, marks=marks)


def register(area, *cases):
    """Record one parametrized test's cases in REGISTRY; returns their pytest params."""
    for kind, gap, param in cases:
        REGISTRY.append(Case(area, kind, param.id, gap))
    return [param for _, _, param in cases]


# ----------------------------------------------------------------------------- helpers


def run(argv):
    """train.main in this process; afterwards the signal handlers and thread count it set are
    put back, so pytest's own Ctrl-C handling keeps working."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    threads = torch.get_num_threads()
    try:
        return train.main(argv)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        torch.set_num_threads(threads)


def expect_clear(call, exc_type, *needles, capsys=None):
    """call() must raise exc_type, from project code (a SystemExit prints no traceback, so it may
    come from argparse), with every needle in its message (for a SystemExit also in stderr)."""
    with pytest.raises(BaseException) as info:
        call()
    e = info.value
    where = traceback.extract_tb(e.__traceback__)[-1]
    trace = "".join(traceback.format_exception(e))[-2500:]
    assert isinstance(e, exc_type), f"expected {exc_type}, got:\n{trace}"
    if not isinstance(e, SystemExit):
        assert Path(where.filename).resolve() in PROJECT_FILES, \
            f"raised from {where.filename}:{where.lineno}, not project code:\n{trace}"
    message = str(e.code if isinstance(e, SystemExit) else e)
    if isinstance(e, SystemExit) and capsys is not None:
        message += capsys.readouterr().err
    missing = [n for n in needles if n not in message]
    assert not missing, f"{missing} not in the message: {message!r}"
    return e


def flags(assets, out, stage=1, adapter="iaa", steps=2, *extra, data=None, val=None, root=None,
          batch=4):
    files = assets["data"]
    kind = KIND_OF_DATA[stage]
    return ["--stage", str(stage), "--adapter", adapter, "--llm", str(assets["llm"]),
            "--vision", str(assets["vision"]), "--qformer", str(assets["qformer"]),
            "--data", str(data or files[f"{kind}_train"]),
            "--val-data", str(val or files[f"{kind}_val"]),
            "--image-root", str(root or files["image_root"]), "--out-dir", str(out),
            "--steps", str(steps), "--batch-size", str(batch), "--val-samples", "2",
            "--log-every", "1", "--dtype", "fp32", "--num-threads", "1", *extra]


def replace_flag(argv, flag, value=None):
    """argv with flag's value replaced, or (value None) the flag and its value removed."""
    argv = list(argv)
    i = argv.index(flag)
    if value is None:
        del argv[i:i + 2]
    else:
        argv[i + 1] = str(value)
    return argv


def trainer_step(run_dir: Path) -> int:
    return json.loads((run_dir / "trainer_state.json").read_text())["step"]


def assert_same_weights(a: Path, b: Path):
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:3]}"


def leftovers(folder: Path) -> list[str]:
    """Temporary files an atomic write may have left behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    base = tmp_path_factory.mktemp("assets")
    return {**tiny.write_backbones(base), "data": tiny.easyvqa_slices(base / "data", n=16)}


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    """An uninterrupted IAA stage-1 run (STEPS steps, checkpoints every SAVE_EVERY), and a
    1-step IAA stage-2 run initialised from it: the references the fault cases compare with."""
    out = tmp_path_factory.mktemp("reference")
    run(flags(assets, out, 1, "iaa", STEPS, "--save-every", str(SAVE_EVERY)))
    run(flags(assets, out, 2, "iaa", 1))
    return {"out": out, "stage1": out / "iaa" / "stage1", "stage2": out / "iaa" / "stage2"}


def copy_run(run_dir: Path, out: Path) -> Path:
    """A copy of a run dir under a new --out-dir (same adapter/stage layout)."""
    dest = out / run_dir.parent.name / run_dir.name
    shutil.copytree(run_dir, dest)
    return dest


# ----------------------------------------------------------------------------- data


def png_header(width, height) -> bytes:
    """A PNG that claims width x height greyscale pixels: Pillow reads the size from the header
    and refuses it as a decompression bomb before decoding anything."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) \
        + chunk(b"IEND", b"")


def good_rows(assets, root: Path, n=8) -> list[dict]:
    """n caption rows, their images copied under root."""
    rows = json.loads(Path(assets["data"]["captions_train"]).read_text())[:n]
    for row in rows:
        dest = root / row["image"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(assets["data"]["image_root"]) / row["image"], dest)
    return rows


def wrongly_typed(rows):
    return [{**rows[1], "id": [3]}, {**rows[2], "id": "conv", "conversations": "hi"},
            {**rows[3], "id": "img", "image": 7}]


def bad_data(assets, tmp_path, what):
    """(train json, image root, val json, rows to skip) for one kind of bad data."""
    root = tmp_path / "images"
    rows = good_rows(assets, root)
    val = tmp_path / "val.json"
    val.write_text(json.dumps(rows))
    path = tmp_path / f"{what}.json"
    if what == "bomb":
        (root / "bomb.png").write_bytes(png_header(40000, 40000))
        path.write_text(json.dumps(rows + [{**rows[0], "id": "bomb", "image": "bomb.png"}]))
        return path, root, val, 1
    if what == "latin1":
        rows[0]["conversations"][1]["value"] = "a red circle, très rouge"
        path.write_bytes(json.dumps(rows, ensure_ascii=False).encode("latin-1"))
        return path, root, val, None
    if what == "types":
        path.write_text(json.dumps(rows + wrongly_typed(rows)))
        return path, root, val, 3
    assert what == "all-bad"
    path.write_text(json.dumps(wrongly_typed(rows)))
    return path, root, val, 3


DATA_ERRORS = {  # (what, policy) -> exception type and what its message names
    ("bomb", "error"): (DataError, ["bomb.png", "DecompressionBomb"]),
    ("latin1", "skip"): (DataError, ["latin1.json", "not UTF-8"]),
    ("types", "error"): (DataError, ["types.json", "row 8", "id [3]", "id must be a string"]),
    ("all-bad", "skip"): (SystemExit, ["0 training samples", "fewer than one global batch"]),
}


@pytest.mark.parametrize("what, policy", register(
    "data",
    case("input", "bomb-image-error", "bomb", "error"),
    case("input", "bomb-image-skip", "bomb", "skip"),
    case("input", "non-utf8-json-even-with-skip", "latin1", "skip"),
    case("input", "wrongly-typed-rows-error", "types", "error"),
    case("input", "wrongly-typed-rows-skip", "types", "skip"),
    case("input", "every-row-bad-skip", "all-bad", "skip"),
))
def test_bad_training_data(assets, tmp_path, capsys, what, policy):
    path, root, val, n_bad = bad_data(assets, tmp_path, what)
    argv = flags(assets, tmp_path / "out", 1, "iaa", 3, "--on-bad-sample", policy, data=path,
                 val=val, root=root, batch=3)
    if (what, policy) in DATA_ERRORS:
        exc_type, needles = DATA_ERRORS[what, policy]
        expect_clear(lambda: run(argv), exc_type, *needles, capsys=capsys)
        return
    capsys.readouterr()
    run(argv)
    assert trainer_step(tmp_path / "out" / "iaa" / "stage1") == 3
    log = capsys.readouterr().out.splitlines()
    assert any(f"skipped {n_bad} bad row" in line and path.name in line for line in log), \
        f"no line reports the {n_bad} skipped rows of {path.name}"


# ----------------------------------------------------------------------------- sequence length

LONG_PROMPT = "What colour is the shape? " + "Look closely at the picture please. " * 60


def long_rows(assets, which):
    rows = json.loads(Path(assets["data"]["vqa_train"]).read_text())[:8]
    if which == "prompt":
        rows[0] = {**rows[0], "id": "long-prompt", "conversations": [
            {"from": "human", "value": "<image>\n" + LONG_PROMPT}, {"from": "gpt", "value": "red"}]}
    else:
        rows[0] = {**rows[0], "id": "long-answer", "conversations": [
            rows[0]["conversations"][0], {"from": "gpt", "value": "red " * 100}]}
    return rows


@pytest.mark.parametrize("which", register(
    "seqlen",
    case("input", "over-long-prompt-is-truncated", "prompt"),
))
def test_over_long_prompt_is_cut_and_keeps_its_answer(assets, tmp_path, which):
    data = tmp_path / "long.json"
    data.write_text(json.dumps(long_rows(assets, which)))
    max_len = 64
    threads = torch.get_num_threads()
    cfg, env, job = tiny.job_for(flags(assets, tmp_path, 2, "crome", 1, "--max-len", str(max_len),
                                       data=data, val=data))
    index = next(i for i, s in enumerate(job.samples) if s.id == "long-prompt")
    batch = job.batch([index])
    assert batch["input_ids"].shape == (1, max_len)  # cut to exactly max_len
    assert int(batch["image_mask"].sum()) == job.model.n_visual
    labels = batch["labels"][0]
    answer = labels[labels != -100].tolist()
    assert job.parts.tok.decode(answer) == "red<|im_end|>"
    assert batch["input_ids"][0, -len(answer):].tolist() == answer  # the answer closes the row
    sample = job.samples[index]  # the generation prompt (eval's batching) is cut the same way
    prompt = Answerer(job.parts, max_len=max_len).batch([sample.image], [sample.turns[0][0]])
    assert prompt["input_ids"].shape[1] <= max_len
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:  # and it trains and validates (the long row is in the validation set too)
        train.train(cfg, job, env)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        torch.set_num_threads(threads)
    assert trainer_step(tmp_path / "crome" / "stage2") == 1


@pytest.mark.parametrize("which, max_len, needles", register(
    "seqlen",
    case("input", "answer-longer-than-max-len", "answer", 64, ["long-answer", "--max-len"]),
    case("input", "max-len-below-markup-and-image", "prompt", 8, ["do not fit in max_len=8"]),
))
def test_example_that_cannot_fit_is_reported(assets, tmp_path, which, max_len, needles):
    data = tmp_path / "long.json"
    data.write_text(json.dumps(long_rows(assets, which)))
    argv = flags(assets, tmp_path, 2, "iaa", 1, "--max-len", str(max_len), data=data, val=data,
                 batch=8)
    expect_clear(lambda: run(argv), ValueError, *needles)
    assert not (tmp_path / "iaa" / "stage2" / "model.safetensors").exists()


# ----------------------------------------------------------------------------- checkpoints


def stage0_like(folder: Path) -> Path:
    """What a stage-0 run dir holds at its top: its config and the dual encoder's weights."""
    folder.mkdir(parents=True)
    save_json({"train": {"adapter": "crome", "stage": 0}, "vision": {}}, folder / "config.json")
    save_safetensors({"vision_proj.weight": torch.zeros(8, 32), "text_proj.weight": torch.zeros(8, 32),
                      "logit_scale": torch.zeros(())}, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize("source, stage, adapter, extra, needles", register(
    "checkpoint",
    case("input", "init-from-another-design", "iaa-stage1", 2, "crome", [],
         ["iaa/stage1", "holds a iaa model, not crome"]),
    case("input", "init-from-a-hub-model-folder", "llm", 2, "iaa", [], ["not a stage 1-3 run"]),
    case("input", "init-from-a-stage0-run", "stage0", 2, "crome", [], ["not a stage 1-3 run"]),
    case("input", "init-with-another-iaa-layers", "iaa-stage2", 3, "iaa", ["--iaa-layers", "4"],
         ["stage2/model.safetensors", "unexpected tensors: adapter.layers.4."]),
))
def test_init_from_the_wrong_checkpoint(assets, runs, tmp_path, source, stage, adapter, extra,
                                        needles):
    folder = {"iaa-stage1": runs["stage1"], "iaa-stage2": runs["stage2"], "llm": assets["llm"],
              "stage0": tmp_path / "stage0"}[source]
    if source == "stage0":
        stage0_like(folder)
    argv = flags(assets, tmp_path / "out", stage, adapter, 1, "--init", str(folder), *extra)
    expect_clear(lambda: run(argv), CheckpointError, *needles)
    assert not (tmp_path / "out" / adapter / f"stage{stage}").exists()


def truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def corrupt_header(path: Path):
    data = bytearray(path.read_bytes())
    data[8:16] = b"{garbage"
    path.write_bytes(bytes(data))


def optimizer_edit(edit):
    def apply(path: Path):
        tensors = load_file(path)
        edit(tensors)
        save_file(tensors, path)
    return apply


def misshape(tensors):
    key = next(k for k in sorted(tensors) if k.endswith(".exp_avg"))
    tensors[key] = torch.zeros(3)


DAMAGE = {
    "truncated-model": ("model.safetensors", truncate, ["model.safetensors", "truncated or corrupt"]),
    "corrupt-model-header": ("model.safetensors", corrupt_header,
                             ["model.safetensors", "truncated or corrupt"]),
    "missing-model": ("model.safetensors", Path.unlink, ["model.safetensors"]),
    "missing-optimizer": ("optimizer.safetensors", Path.unlink, ["optimizer.safetensors"]),
    "missing-trainer-state": ("trainer_state.json", Path.unlink, ["trainer_state.json missing"]),
    "missing-config": ("config.json", Path.unlink, ["config.json: missing"]),
    "trainer-state-not-json": ("trainer_state.json", lambda p: p.write_text('{"step": '),
                               ["trainer_state.json: not valid JSON"]),
    "trainer-state-without-step": ("trainer_state.json", lambda p: p.write_text("{}"),
                                   ["trainer_state.json", "step"]),
    "optimizer-moment-misshaped": ("optimizer.safetensors", optimizer_edit(misshape),
                                   ["optimizer.safetensors", "shape"]),
    "optimizer-without-rng-state": ("optimizer.safetensors",
                                    optimizer_edit(lambda t: t.pop("rng.torch")),
                                    ["optimizer.safetensors", "rng.torch"]),
}


@pytest.mark.parametrize("damage", register(
    "checkpoint",
    *[case("fault", name, name)
      for name in DAMAGE],
))
def test_resume_from_a_damaged_run(assets, runs, tmp_path, damage):
    """--resume (with 2 more steps to go) from a finished run one of whose files was damaged:
    a CheckpointError naming the file, and nothing else in the run dir is touched."""
    run_dir = copy_run(runs["stage1"], tmp_path)
    name, edit, needles = DAMAGE[damage]
    edit(run_dir / name)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    argv = flags(assets, tmp_path, 1, "iaa", STEPS + 2, "--save-every", str(SAVE_EVERY), "--resume")
    expect_clear(lambda: run(argv), CheckpointError, *needles)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


@pytest.mark.parametrize("what", register(
    "checkpoint",
    case("fault", "init-from-a-truncated-model", "truncated"),
    case("input", "resume-with-another-iaa-layers", "iaa-layers"),
    case("input", "qformer-folder-without-vocab", "no-vocab"),
))
def test_other_checkpoint_mismatches(assets, runs, tmp_path, what):
    if what == "truncated":
        prev = copy_run(runs["stage1"], tmp_path / "prev")
        truncate(prev / "model.safetensors")
        argv = flags(assets, tmp_path, 2, "iaa", 1, "--init", str(prev))
        needles = [str(prev / "model.safetensors"), "truncated or corrupt"]
    elif what == "iaa-layers":
        copy_run(runs["stage2"], tmp_path)
        argv = flags(assets, tmp_path, 2, "iaa", 2, "--iaa-layers", "4", "--resume")
        needles = ["stage2/model.safetensors", "unexpected tensors: adapter.layers.4."]
    else:
        qformer = tmp_path / "qformer"
        shutil.copytree(assets["qformer"], qformer)
        (qformer / "vocab.txt").unlink()
        argv = replace_flag(flags(assets, tmp_path, 1, "crome", 1), "--qformer", qformer)
        needles = [str(qformer), "no Q-Former WordPiece vocabulary", "--qformer-tokenizer"]
    expect_clear(lambda: run(argv), CheckpointError, *needles)


# ----------------------------------------------------------------------------- atomic writes

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def inject(monkeypatch, writer, how):
    """Make the next save_safetensors / save_json fail: `midway` writes half the file then hits
    a full disk, `interrupt` is Ctrl-C at the same point, `fsync` / `rename` fail afterwards."""
    if how in ("midway", "interrupt"):
        error = ENOSPC if how == "midway" else KeyboardInterrupt()
        if writer == "safetensors":
            def half(tensors, filename, metadata=None, real=checkpoint.save_file):
                real(tensors, filename, metadata=metadata)
                truncate(Path(filename))
                raise error
            monkeypatch.setattr(checkpoint, "save_file", half)
        else:
            def half(self, text, *args, real=pathlib.Path.write_text, **kwargs):
                real(self, text[:len(text) // 2], *args, **kwargs)
                raise error
            monkeypatch.setattr(pathlib.Path, "write_text", half)
        return type(error)

    def fail(*args, **kwargs):
        raise OSError(errno.EIO, f"Input/output error ({how} injected)")
    monkeypatch.setattr(os, "fsync" if how == "fsync" else "replace", fail)
    return OSError


@pytest.mark.parametrize("writer, how", register(
    "atomic",
    *[case("fault", f"{writer}-{how}", writer, how) for writer in ("safetensors", "json")
      for how in ("midway", "interrupt", "fsync", "rename")],
))
def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch, writer, how):
    path = tmp_path / ("model.safetensors" if writer == "safetensors" else "trainer_state.json")
    old, new = {"w": torch.arange(6.0)}, {"w": torch.ones(6), "extra": torch.zeros(2)}
    save = (lambda obj: save_safetensors(obj, path)) if writer == "safetensors" else \
        (lambda obj: save_json({k: v.tolist() for k, v in obj.items()}, path))
    save(old)
    before = path.read_bytes()
    error = inject(monkeypatch, writer, how)
    with pytest.raises(error):
        save(new)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []
    if writer == "safetensors":
        assert torch.equal(load_file(path)["w"], old["w"])
    else:
        assert json.loads(path.read_text()) == {"w": old["w"].tolist()}


@pytest.mark.parametrize("failing", register(
    "atomic",
    case("fault", "save-set-model-write-fails", "model.safetensors"),
    case("fault", "save-set-optimizer-write-fails", "optimizer.safetensors"),
    case("fault", "save-set-trainer-state-write-fails", "trainer_state.json"),
))
def test_failed_checkpoint_save_resumes_from_the_previous_one(assets, runs, tmp_path, monkeypatch,
                                                              failing):
    """The checkpoint after step 4 fails while writing `failing` (the disk is full): the run
    stops with that OSError, the step-2 checkpoint set stays consistent, and --resume from it
    ends exactly where the uninterrupted reference run did."""
    argv = flags(assets, tmp_path, 1, "iaa", STEPS, "--save-every", str(SAVE_EVERY))
    writes = Counter()

    def failing_on_the_second_save(real):
        def save(obj, path, *args, **kwargs):
            writes[Path(path).name] += 1
            if Path(path).name == failing and writes[failing] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            real(obj, path, *args, **kwargs)
        return save
    for name in ("save_safetensors", "save_json"):
        monkeypatch.setattr(checkpointing, name, failing_on_the_second_save(getattr(checkpointing, name)))
    with pytest.raises(OSError, match="No space left on device"):
        run(argv)
    monkeypatch.undo()
    run_dir = tmp_path / "iaa" / "stage1"
    assert trainer_step(run_dir) == SAVE_EVERY and leftovers(run_dir) == []
    run(argv + ["--resume"])
    assert trainer_step(run_dir) == STEPS
    assert_same_weights(run_dir, runs["stage1"])


# ----------------------------------------------------------------------------- training faults


def nan_at(monkeypatch, step):
    """The model's loss is NaN at training step `step`, counting loss calls: one before training
    (training.progress.count_flops), then one per step here."""
    calls, real = Counter(), VLM.forward

    def loss(self, batch):
        calls["n"] += 1
        value = real(self, batch)
        return value * float("nan") if calls["n"] == step + 2 else value
    monkeypatch.setattr(VLM, "forward", loss)


@pytest.mark.parametrize("policy, nan_step", register(
    "training",
    case("fault", "nan-loss-stops-and-keeps-the-checkpoint", "stop", 2),
    case("fault", "nan-loss-skipped", "skip", 1),
    case("fault", "nan-loss-skipped-on-the-last-step", "skip", STEPS - 1),
))
def test_nan_loss(assets, runs, tmp_path, monkeypatch, capsys, policy, nan_step):
    argv = flags(assets, tmp_path, 1, "iaa", STEPS, "--save-every", str(SAVE_EVERY),
                 "--nan-policy", policy)
    run_dir = tmp_path / "iaa" / "stage1"
    nan_at(monkeypatch, nan_step)
    if policy == "stop":
        expect_clear(lambda: run(argv), FloatingPointError, f"step {nan_step}: loss is nan",
                     f"last good checkpoint in {run_dir} is kept", "--nan-policy skip")
        monkeypatch.undo()
        assert trainer_step(run_dir) == SAVE_EVERY
        run(argv + ["--resume"])  # the kept checkpoint is good: the run ends as the reference did
        assert_same_weights(run_dir, runs["stage1"])
        return
    capsys.readouterr()
    run(argv)
    assert f"step {nan_step}: loss is nan; skipping this step" in capsys.readouterr().out
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [s for s in range(STEPS) if s != nan_step]
    assert trainer_step(run_dir) == STEPS


@pytest.mark.parametrize("lr", register(
    "training",
    case("input", "absurd-learning-rate", "1e30"),
))
def test_absurd_learning_rate_stops_at_the_first_non_finite_loss(assets, tmp_path, lr):
    argv = flags(assets, tmp_path, 1, "iaa", 3, "--lr", lr)
    expect_clear(lambda: run(argv), FloatingPointError, "step 1: loss is", "Lower --lr")


# ----------------------------------------------------------------------------- CLI

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def cli_argv(assets, tmp_path, what):
    base = flags(assets, tmp_path, 1, "iaa", 1)
    return {
        "no-image-root": replace_flag(base, "--image-root"),
        "batch-larger-than-data": replace_flag(base, "--batch-size", 100),
        "init-nowhere": flags(assets, tmp_path, 2, "iaa", 1, "--init", str(tmp_path / "nowhere")),
        "val-data-missing": replace_flag(base, "--val-data", tmp_path / "missing.json"),
        "image-root-not-a-folder": replace_flag(base, "--image-root", tmp_path / "nowhere"),
        "llm-nowhere": replace_flag(base, "--llm", "./nowhere"),
        "log-every-0": replace_flag(base, "--log-every", 0),
        "num-threads-negative": replace_flag(base, "--num-threads", -1),
        "device-cuda-without-cuda": base + ["--device", "cuda"],
        "device-unknown": base + ["--device", "gpu0"],
    }[what]


@pytest.mark.parametrize("what, exc_type, needles", register(
    "cli",
    case("input", "no-image-root", "no-image-root", SystemExit, ["--data needs --image-root"]),
    case("input", "batch-larger-than-data", "batch-larger-than-data", SystemExit,
         ["16 training samples is fewer than one global batch (100)", "--batch-size"]),
    case("input", "init-nowhere", "init-nowhere", CheckpointError,
         ["--init", "nowhere: model.safetensors missing"]),
    case("input", "val-data-missing", "val-data-missing", DataError, ["missing.json: cannot read"]),
    case("input", "image-root-not-a-folder", "image-root-not-a-folder", DataError,
         ["image root", "nowhere is not a folder"]),
    case("input", "llm-nowhere", "llm-nowhere", CheckpointError, ["./nowhere: no such folder"]),
    case("input", "log-every-0", "log-every-0", SystemExit, ["--log-every"]),
    case("input", "num-threads-negative", "num-threads-negative", SystemExit, ["--num-threads"]),
    case("input", "device-cuda-without-cuda", "device-cuda-without-cuda", SystemExit,
         ["--device"], marks=[NO_CUDA]),
    case("input", "device-unknown", "device-unknown", SystemExit, ["--device"]),
))
def test_bad_flags_end_in_one_clear_error(assets, tmp_path, capsys, what, exc_type, needles):
    expect_clear(lambda: run(cli_argv(assets, tmp_path, what)), exc_type, *needles, capsys=capsys)
    assert not (tmp_path / "iaa" / "stage1" / "model.safetensors").exists()


@pytest.mark.parametrize("what, code, needle", register(
    "cli",
    case("input", "subprocess-unknown-adapter", "unknown-adapter", 2, "invalid choice: 'lora'"),
    case("input", "subprocess-stage3-without-stage2", "stage3", 1,
         "stage 3 fine-tunes a stage-2 model: no checkpoint"),
    case("input", "subprocess-resume-with-nothing", "resume", 1, "--resume: no checkpoint in"),
))
def test_cli_prints_one_clear_line_not_a_traceback(assets, tmp_path, what, code, needle):
    argv = {"unknown-adapter": ["--adapter", "lora"],
            "stage3": flags(assets, tmp_path, 3, "iaa", 1),
            "resume": flags(assets, tmp_path, 1, "iaa", 1, "--resume")}[what]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert needle in done.stderr and done.returncode == code, (done.returncode, done.stderr[-3000:])


# ----------------------------------------------------------------------------- security


class Payload:
    """Unpickling this creates `marker`: proof that something ran a pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture
def no_unpickling(monkeypatch):
    """pickle.load(s) and torch.load record the call and fail; the list of calls."""
    calls = []

    def refuse(name):
        def call(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called: weights must never be unpickled")
        return call
    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse(f"{module.__name__}.{name}"))
    return calls


def pickle_only_folder(source: Path, folder: Path) -> Path:
    """source's config.json next to a pytorch_model.bin that runs code when unpickled."""
    folder.mkdir()
    shutil.copy(source / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(folder / "UNPICKLED")))
    return folder


LOADERS = {"llm": LLM.from_pretrained, "vision": ViT.from_pretrained,
           "qformer": QFormer.from_pretrained}


@pytest.mark.parametrize("component", register(
    "security", *[case("input", f"pickle-only-{c}-folder", c) for c in LOADERS]))
def test_pickle_only_folder_is_refused_unread(assets, tmp_path, no_unpickling, component):
    folder = pickle_only_folder(assets[component], tmp_path / component)
    expect_clear(lambda: LOADERS[component](folder), CheckpointError, str(folder),
                 "found no safetensors file")
    assert not (folder / "UNPICKLED").exists() and no_unpickling == []


PICKLE_NAMES = ("pytorch_model.bin", "model.pt", "model.pth", "model.ckpt", "weights.pkl",
                "optimizer.pt", "training_args.bin", "pytorch_model-00001-of-00002.bin")


@pytest.fixture
def fake_hub(assets, tmp_path, monkeypatch):
    """huggingface_hub.snapshot_download over local copies of the tiny backbones, each repo
    also holding a booby-trapped pytorch_model.bin: it records every call and, like the hub,
    copies only the files matching allow_patterns. No network."""
    repos = {f"hubtest/{c}": assets[c] for c in ("llm", "vision", "qformer")}
    calls = []

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns, kwargs))
        assert allow_patterns, f"{repo_id}: downloaded without allow_patterns"
        folder = tmp_path / "hub" / repo_id.replace("/", "--") / str(len(calls))
        folder.mkdir(parents=True)
        for path in repos[repo_id].iterdir():
            if any(fnmatch(path.name, p) for p in allow_patterns):
                shutil.copy(path, folder / path.name)
        if any(fnmatch("pytorch_model.bin", p) for p in allow_patterns):  # the repo's pickle
            (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(tmp_path / "UNPICKLED")))
        return str(folder)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def assert_only_safe_downloads(calls, tmp_path):
    for repo_id, patterns, _ in calls:
        fetched = [n for n in PICKLE_NAMES if any(fnmatch(n, p) for p in patterns)]
        assert not fetched, f"{repo_id}: allow_patterns {patterns} would download {fetched}"
        wildcards = [p for p in patterns if "*" in p]
        assert all(p.endswith((".safetensors", ".json")) for p in wildcards), patterns
    assert not (tmp_path / "UNPICKLED").exists()
    assert not list((tmp_path / "hub").rglob("*.bin"))


HUB_LOADERS = {
    "llm": ("hubtest/llm", LLM.from_pretrained),
    "llm-tokenizer": ("hubtest/llm", load_tokenizer),
    "vision": ("hubtest/vision", ViT.from_pretrained),
    "qformer": ("hubtest/qformer", QFormer.from_pretrained),
    "qformer-vocab": ("hubtest/qformer", WordPieceTokenizer.from_pretrained),
}


@pytest.mark.parametrize("loader", register(
    "security", *[case("input", f"hub-{name}-allow-patterns", name) for name in HUB_LOADERS]))
def test_hub_downloads_only_allowed_files(tmp_path, fake_hub, no_unpickling, loader):
    repo_id, load = HUB_LOADERS[loader]
    assert load(repo_id) is not None
    assert [c[0] for c in fake_hub] == [repo_id]
    assert_only_safe_downloads(fake_hub, tmp_path)
    assert no_unpickling == []


@pytest.mark.parametrize("adapter", register(
    "security", case("input", "hub-ids-end-to-end", "crome")))
def test_training_from_hub_ids_downloads_only_allowed_files(assets, tmp_path, fake_hub,
                                                            no_unpickling, adapter):
    argv = flags(assets, tmp_path / "out", 1, adapter, 1)
    for component in ("llm", "vision", "qformer"):
        argv = replace_flag(argv, f"--{component}", f"hubtest/{component}")
    run(argv)
    assert {c[0] for c in fake_hub} == {"hubtest/llm", "hubtest/vision", "hubtest/qformer"}
    assert_only_safe_downloads(fake_hub, tmp_path)
    assert no_unpickling == []


@pytest.mark.parametrize("stray", register(
    "security",
    case("fault", "resume-without-any-unpickler", None),
    case("fault", "resume-ignores-a-stray-optimizer-pickle", "optimizer.pt"),
))
def test_optimizer_state_loads_without_pickle(assets, runs, tmp_path, no_unpickling, stray):
    """--resume reads optimizer.safetensors (plain tensors: moments, steps, the RNG state) with
    every unpickler booby-trapped; a stray pickle in the run dir is never opened."""
    run_dir = copy_run(runs["stage1"], tmp_path)
    if stray:
        (run_dir / stray).write_bytes(pickle.dumps(Payload(tmp_path / "UNPICKLED")))
    with safe_open(run_dir / "optimizer.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "rng.torch" in keys and all(re.fullmatch(r"opt\.\d+\.\d+\.\w+", k)
                                       for k in keys - {"rng.torch"})
    run(flags(assets, tmp_path, 1, "iaa", STEPS + 1, "--save-every", str(SAVE_EVERY), "--resume"))
    assert trainer_step(run_dir) == STEPS + 1
    assert no_unpickling == [] and not (tmp_path / "UNPICKLED").exists()


# ----------------------------------------------------------------------------- the count


def documented_counts():
    table = {m["area"]: (int(m["inputs"]), int(m["faults"])) for m in re.finditer(
        r"^ {4}(?P<area>[a-z]+) +(?P<inputs>\d+) +(?P<faults>\d+) ", __doc__, re.M)}
    totals = re.search(r"(\d+) malformed inputs and (\d+) injected faults, (\d+) cases; (\d+) of "
                       r"them are known gaps", __doc__)
    return table, tuple(map(int, totals.groups()))


def test_counts_match_the_docstring():
    """The cases registered above are the ones the module docstring counts, area by area."""
    ids = [c.id for c in REGISTRY]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    table, (inputs, faults, total, gaps) = documented_counts()
    counted = {area: (sum(c.kind == "input" for c in REGISTRY if c.area == area),
                      sum(c.kind == "fault" for c in REGISTRY if c.area == area))
               for area in {c.area for c in REGISTRY}}
    assert counted == table
    kinds = Counter(c.kind for c in REGISTRY)
    assert (kinds["input"], kinds["fault"], len(REGISTRY)) == (inputs, faults, total)
    assert sum(c.gap for c in REGISTRY) == gaps
