"""End to end on hub layouts: the README's "Hub models" block, run as it stands.

The block is the design matrix. bash expands it (a `python` function stands in for the
interpreter and hands back each command's arguments), and each chain of commands runs here, in
this process, in a folder where every hub repo id the block names is a folder holding a tiny
stand-in that transformers wrote in that repo's layout and patch grid (STANDINS), LLaVA's file
names hold small LLaVA-format files cut from easy-vqa, and images/ is easy-vqa's image folder.
The only change to a command is the tiny scale appended to it (TRAIN_SCALE, EVAL_SCALE): a
README command that does not run fails here, and a repo the block names without a stand-in is
an error that says so.

The covering (test_the_block_covers_every_design_and_layout checks it): every design and
baseline goes through stages 1 -> 2 -> 3 and then eval.py, CROME three times, once per kind of
Q-Former (BERT; InstructBLIP with qformer_tokenizer/ and its own EVA tower as --vision; BLIP-2
OPT, no text way, its own tower). The LLM layouts rotate over the seven chains (Llama with
SmolLM2's byte-level BPE and ChatML template in tokenizer_config.json; Qwen2 with q/k/v biases,
an embedding padded past its byte-level BPE and its template in chat_template.jinja; Llama-2
with a SentencePiece-style tokenizer.json and Llama-2-chat's template), and so do the vision
layouts (full CLIPModel at 14 x 14 and 24 x 24 patches, full SiglipModel at 14 x 14, the EVA
towers of BLIP-2 OPT and InstructBLIP at 16 x 16). Each design and each layout is covered at
least once, not each pairing: IAA on Llama-2, say, is not run.

Every data file mixes image rows, multi-turn rows and text-only rows (no "image"). After each
stage (check_stage, check_rows): the run directory's files; the trainable weights are exactly
vlm.TRAINABLE's components, each of them moved, and so did every trainable weight that the
run's batches reach, while every other weight and buffer is bitwise unchanged; the stage started
from the previous stage's saved weights, and its model.safetensors holds what it now has; every
assistant turn of every row is labelled with its answer; a text-only row is the LLM's chat
template as transformers renders and tokenizes it; a batch of text-only rows runs the LLM path
alone (the vision tower never runs, the visual modules get zero gradients). After eval.py
(check_eval): its JSON, markdown and PNG, every turn scored (multi_turn, open-ended, multiple
choice), and a frozen LLM's text-only perplexity equal to the base LLM's.
"""
import functools
import json
import shlex
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import eval as ev
import tiny
import train
from data.dataset import load_conversations, turn_samples
from evaluation.scoring import is_multiple_choice
from training.config import parse_args
from training.stages import build_job
from vlm import ADAPTERS, TRAINABLE

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- tests/test_e2e.py runs the next block -->"
TRAIN_SCALE = ["--steps", "2", "--batch-size", "2", "--log-every", "1", "--num-threads", "1"]
EVAL_SCALE = ["--max-new-tokens", "4", "--num-threads", "1"]
RUN_FILES = ("config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json",
             "metrics.jsonl", "loss.png", "result.json")

# Each hub repo the block may name -> (its layout, a writer of its tiny stand-in). The towers
# keep the repo's patch grid (224 px / 16 = 14; 336 / 14 = 24; 224 / 14 = 16), so a
# --pixel-shuffle that does not divide the real grid fails here too; and the EVA towers (with
# their Q-Formers) are wider than the CLIP and SigLIP ones (48 against 32, as ViT-g's 1408
# against 768 or 1024), so a BLIP Q-Former paired with another repo's tower fails too.
STANDINS = {
    "HuggingFaceTB/SmolLM2-360M-Instruct": ("llama", tiny.write_llm),
    "Qwen/Qwen2-0.5B-Instruct": ("qwen2", tiny.write_qwen2),
    "meta-llama/Llama-2-7b-chat-hf": ("llama2-sentencepiece", tiny.write_llama2),
    "openai/clip-vit-base-patch16": ("clip", lambda f: tiny.write_clip(f, 56, 4)),
    "openai/clip-vit-large-patch14-336": ("clip", lambda f: tiny.write_clip(f, 48, 2)),
    "google/siglip-base-patch16-224": ("siglip", lambda f: tiny.write_siglip(f, 56, 4)),
    "Salesforce/instructblip-vicuna-7b": (
        "instructblip", lambda f: tiny.write_instructblip(f, 48, image_size=32, patch_size=2)),
    "Salesforce/blip2-opt-2.7b": ("blip2-opt", lambda f: tiny.write_blip2(
        f, text_way=False, image_size=32, patch_size=2, vision_width=48)),
    "google-bert/bert-base-uncased": ("bert", tiny.write_bert),
}
LAYOUTS = {"llm": {"llama", "qwen2", "llama2-sentencepiece"},
           "vision": {"clip", "siglip", "instructblip", "blip2-opt"},
           "qformer": {"bert", "instructblip", "blip2-opt"}}
SHIM = "python() { printf '%s\\0' \"$@\"; printf '\\036\\0'; }\n"   # each argument, then \x1e


def readme_commands() -> list[list[str]]:
    """The marked block's commands as bash expands them: [script, arguments...] each."""
    text = (ROOT / "README.md").read_text()
    assert MARK in text, f"README.md lost the block marked {MARK}"
    block = text.split(MARK, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", SHIM + block], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    commands, current = [], []
    for arg in done.stdout.split("\0")[:-1]:
        if arg == "\x1e":
            commands.append(current)
            current = []
        else:
            current.append(arg)
    return commands


def chains(commands) -> list[list[list[str]]]:
    """The commands cut after each eval.py."""
    out, current = [], []
    for command in commands:
        assert command[0] in ("train.py", "eval.py"), command
        current.append(command)
        if command[0] == "eval.py":
            out.append(current)
            current = []
    assert not current, f"commands after the last eval.py: {current}"
    return out


CHAINS = chains(readme_commands())


def chain_id(chain) -> str:
    return ev.parse_args(chain[-1][1:]).checkpoint.removesuffix("/stage3")


def hub_flags(cfg) -> dict:
    """role -> the hub repo a train config names (CROME's Q-Former only: the others read none)."""
    return {"llm": cfg.llm, "vision": cfg.vision} | ({"qformer": cfg.qformer}
                                                     if cfg.adapter == "crome" else {})


# ----------------------------------------------------------------------------- the stand-ins


def rows(path, n, more=(), text_only=True) -> list[dict]:
    """The first n rows of an easy-vqa file, the first `len(more)` of them given more turns
    (more: [(question, answer), ...] per row), and text-only rows (one of them two-turn)."""
    out = json.loads(Path(path).read_text())[:n]
    for row, extra in zip(out, more):
        row["conversations"] += [{"from": who, "value": text} for question, answer in extra
                                 for who, text in (("human", question), ("gpt", answer))]
    chat = [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "blue"},
            {"from": "human", "value": "And a shape?"}, {"from": "gpt", "value": "a circle"}]
    if text_only:
        out += [{"id": "text-1", "conversations": chat[:2]},
                {"id": "text-2", "conversations": chat}]
    return out


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The folder the block runs in: stand-ins at the repo ids, LLaVA's file names, images/."""
    base = tmp_path_factory.mktemp("hub")
    for repo, (_, write) in STANDINS.items():
        write(base / repo)
    data = tiny.easyvqa_slices(base / "easyvqa", n=8)
    (base / "images").symlink_to(data["image_root"], target_is_directory=True)
    files = {  # stage 1 captions; stage 2 VQA; stage 3 and the test: multiple choice and VQA
        "blip_laion_cc_sbu_558k.json": rows(data["captions_train"], 6, [[("Its colour?", "red")]]),
        "llava_v1_5_mix665k.json": rows(data["vqa_train"], 6, [
            [("What shape is it?", "circle")], [("Is it red?", "no"), ("Is it blue?", "yes")]]),
        "task_train.json": rows(data["mc_train"], 6, [[("What shape is it?", "circle")]]),
        "task_test.json": rows(data["mc_test"], 3) + rows(data["vqa_test"], 3, [
            [("What shape is it?", "circle"), ("Is it red?", "no")]], text_only=False),
    }
    for name, content in files.items():
        (base / name).write_text(json.dumps(content))
    return base


@pytest.fixture
def main(monkeypatch, hub):
    """train.main in the hub folder, each run's Job and its weights before training recorded;
    afterwards the signal handlers and thread count it set are put back."""
    monkeypatch.chdir(hub)
    built = []

    def recording_build_job(cfg, env):
        job = build_job(cfg, env)
        built.append((cfg, job, {k: v.clone() for k, v in job.model.state_dict().items()}))
        return job

    monkeypatch.setattr(train, "build_job", recording_build_job)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    threads = torch.get_num_threads()

    def run(argv):
        built.clear()
        train.main(argv)
        assert len(built) == 1, "a hub run trained something first (stage 0?)"
        return built[0]
    yield run
    for s, h in handlers.items():
        signal.signal(s, h)
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- the block


def test_the_block_covers_every_design_and_layout():
    seen, designs = {role: set() for role in LAYOUTS}, []
    for chain in CHAINS:
        configs = [parse_args(command[1:]) for command in chain[:-1]]
        assert [c.stage for c in configs] == [1, 2, 3], chain_id(chain)
        first = configs[0]
        assert all(hub_flags(c) == hub_flags(first) and (c.adapter, c.out_dir) ==
                   (first.adapter, first.out_dir) for c in configs), chain_id(chain)
        assert ev.parse_args(chain[-1][1:]).checkpoint == f"{first.out_dir}/{first.adapter}/stage3"
        designs.append(first.adapter)
        for role, repo in hub_flags(first).items():
            assert repo in STANDINS, f"the README names {repo}: give it a stand-in in STANDINS"
            seen[role].add(STANDINS[repo][0])
    assert sorted(set(designs)) == sorted(ADAPTERS)
    assert seen == LAYOUTS


def test_train_py_docstring_hub_example_is_a_readme_command():
    """train.py's usage lines that name hub backbones are commands of the tested block."""
    lines = train.__doc__.replace("\\\n", " ").splitlines()
    hub = [shlex.split(line, comments=True)[1:] for line in lines
           if line.strip().startswith("python train.py") and "--llm" in line]
    assert hub and all(command in readme_commands() for command in hub), hub


@pytest.mark.parametrize("chain", CHAINS, ids=chain_id)
def test_readme_chain(chain, main):
    saved = {}
    for command in chain:
        if command[0] == "train.py":
            cfg, job, before = main(command[1:] + TRAIN_SCALE)
            saved[cfg.stage] = check_stage(cfg, job, before, saved.get(cfg.stage - 1))
            check_rows(cfg, job)
        else:
            check_eval(command[1:], ev.main(command[1:] + EVAL_SCALE))
    assert sorted(saved) == [1, 2, 3]


# ----------------------------------------------------------------------------- the checks


def check_stage(cfg, job, before: dict, previous: dict | None) -> dict:
    """The run directory, what trained against vlm.TRAINABLE, and the hand-over from the
    previous stage -> the saved weights."""
    run = Path(cfg.out_dir) / cfg.adapter / f"stage{cfg.stage}"
    for name in RUN_FILES:
        assert (run / name).is_file(), f"{run}: {name} missing"
    assert json.loads((run / "trainer_state.json").read_text())["step"] == cfg.steps
    model, where = job.model, f"{cfg.adapter} stage {cfg.stage}"
    components = TRAINABLE[cfg.adapter][cfg.stage]
    trainable = {id(p) for c in components for p in getattr(model, c).parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == trainable, where
    for name, p in model.named_parameters():   # (a weight shared by two modules: its first name)
        if id(p) not in trainable:
            assert torch.equal(p, before[name]), f"{where}: frozen {name} changed"
    reached = reached_by_the_runs_batches(cfg, job)
    for component in components:
        moved = {id(p) for name, p in getattr(model, component).named_parameters()
                 if not torch.equal(p, before[f"{component}.{name}"])}
        assert moved, f"{where}: {component} did not train"
        missed = [name for name, p in getattr(model, component).named_parameters()
                  if id(p) in reached - moved]
        assert not missed, f"{where}: {component} got gradients but did not move: {missed}"
    for name, b in model.named_buffers():
        assert torch.equal(b, before[name]), f"{where}: buffer {name} changed"
    state, expected = load_file(run / "model.safetensors"), model.trainable_state()
    assert state.keys() == expected.keys(), where
    assert all(torch.equal(state[k], expected[k].cpu()) for k in state), where
    for k, v in (previous or {}).items():   # it started from the previous stage's weights
        assert torch.equal(before[k], v), f"{where}: {k} did not start from the previous stage"
    return state


def loss_of(cfg, model, batch):
    """The model's loss in the run's own precision: bf16 autocast where the run trained in bf16
    (precision.default_dtype picks it on CPUs with fast bf16)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.dtype == "bf16"):
        return model(batch)


def reached_by_the_runs_batches(cfg, job) -> set[int]:
    """ids of the trainable weights that the run's own batches (train.batch_indices) give a
    gradient. The others may stay put: e.g. the Q-Former's last text FFN, whose output nothing
    reads, or MWA's image-way adapter in the last block, whose image positions nothing reads."""
    model = job.model
    model.train()
    model.zero_grad()
    for step in range(cfg.steps):
        batch = job.batch(train.batch_indices(len(job.samples), cfg.batch_size, step, cfg.seed, 0, 1))
        loss_of(cfg, model, batch).backward()
    reached = {id(p) for p in job.trainable() if p.grad is not None and p.grad.any()}
    model.zero_grad()
    return reached


@functools.cache
def reference_tokenizer(folder):
    return transformers.AutoTokenizer.from_pretrained(folder)


def labelled_runs(labels) -> list[list[int]]:
    runs, current = [], []
    for label in labels.tolist() + [-100]:
        if label != -100:
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    return runs


def check_rows(cfg, job):
    """Every assistant turn of every row labelled; a batch of text-only rows: the LLM path."""
    model, tok = job.model, job.parts.tok
    end = tok.decode([tok.stop_ids[0]])
    for i, sample in enumerate(job.samples):
        batch = job.batch([i])
        runs = labelled_runs(batch["labels"][0])
        assert [tok.decode(r).replace(end, "").strip() for r in runs] == \
            [answer for _, answer in sample.turns], sample.id
        n_visual = 0 if sample.image is None else model.n_visual
        assert int(batch["image_mask"].sum()) == n_visual, sample.id
    assert any(len(s.turns) > 1 for s in job.samples)
    text = [i for i, s in enumerate(job.samples) if s.image is None]
    # a text-only row is the LLM's own chat template, as transformers renders and tokenizes it
    reference = reference_tokenizer(job.config["backbones"]["llm"])
    for i in text:
        messages = [{"role": "system", "content": model.cfg.system_prompt}]
        for question, answer in job.samples[i].turns:
            messages += [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]
        whole = reference(reference.apply_chat_template(messages, tokenize=False),
                          add_special_tokens=False).input_ids
        ids = job.batch([i])["input_ids"][0].tolist()
        assert whole[:len(ids)] == ids and not reference.decode(whole[len(ids):]).strip()
    batch = job.batch(text)
    assert text and "pixels" not in batch and not batch["image_mask"].any()
    ran = []
    hook = model.vision.register_forward_hook(lambda *args: ran.append(True))
    model.train()
    model.zero_grad()
    loss = loss_of(cfg, model, batch)
    loss.backward()
    hook.remove()
    assert torch.isfinite(loss) and not ran
    visual = {"projector", "qformer", "qformer_proj", *(["adapter"] if cfg.adapter == "crome" else [])}
    llm_path = []
    for component in TRAINABLE[cfg.adapter][cfg.stage]:
        for p in getattr(model, component).parameters():
            assert p.grad is not None, component
            if component in visual:
                assert not p.grad.any(), f"{component} got a gradient from text-only rows"
            else:
                llm_path.append(p)
    assert not llm_path or any(p.grad.any() for p in llm_path)
    model.zero_grad()


def check_eval(argv, results):
    """The output files, and every turn of every row scored."""
    args = ev.parse_args(argv)
    prefix = Path(args.checkpoint) / f"eval_{Path(args.data).stem}"
    for ext in (".json", ".md", ".png"):
        assert prefix.with_name(prefix.name + ext).is_file(), f"{prefix}{ext} missing"
    assert json.loads(prefix.with_name(prefix.name + ".json").read_text()) == \
        json.loads(json.dumps(results))
    samples = load_conversations(args.data, args.image_root)[0]
    turns, multi = turn_samples(samples), [s for s in samples if len(s.turns) > 1]
    n_choice = sum(map(is_multiple_choice, turns))
    m = results["metrics"]
    assert m["n"] == len(turns) == len(results["predictions"]) and 0 < n_choice < len(turns)
    assert (m["multi_turn"]["rows"], m["multi_turn"]["n"]) == \
        (len(multi), sum(len(s.turns) for s in multi))
    assert m["open_ended"]["n"] == len(turns) - n_choice
    assert set(m["multiple_choice"]) == {"letter_extraction", "letter_likelihood",
                                         "option_likelihood"}
    assert m["multiple_choice"]["letter_likelihood"]["n"] == n_choice
    records = results["predictions"]
    assert [(r["id"], r.get("turn")) for r in records] == \
        [(s.id, s.extra.get("turn")) for s in turns]
    assert [r["image"] is None for r in records] == [s.image is None for s in turns]
    adapter = json.loads((Path(args.checkpoint) / "config.json").read_text())["train"]["adapter"]
    if args.text_ppl:
        ppl = m["text_ppl"]
        assert all(v > 1 for k, v in ppl.items() if k != "corpus_sentences")
        if adapter in ("crome", "iaa", "llava"):   # the frozen LLM's text path is the base LLM
            assert ppl["text_only"] == ppl["base_llm"]
        assert ("multimodal_workflow" in ppl) == (adapter == "iaa")
