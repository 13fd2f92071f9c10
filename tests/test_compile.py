"""The CUDA path's two ingredients, proven on CPU for every design and baseline: the training
step under torch.compile gives eager's losses and stops recompiling once the varying sequence
length is dynamic; the bf16 path (frozen LLM stored in bf16, trainable parts fp32, autocast)
trains close to fp32 and saves fp32 weights.

The default run compiles every design with the aot_eager backend (dynamo's graph capture,
guards, recompiles and AOT autograd, without code generation: seconds per design) and CROME,
the largest graph, with inductor as the GPU does; `pytest -m slow` compiles every design with
inductor (minutes each on 2 cores). Inductor draws dropout's random numbers as eager does
(fallback_random), so compiled and eager losses can agree to rounding. A 2-layer LLM keeps
compile time, which grows with depth, down."""
import functools
import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny
import train
from vlm import ADAPTERS

STEPS = 6


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    base = tmp_path_factory.mktemp("assets")
    return {"llm": tiny.write_llm(base / "llm", layers=2), "vision": tiny.write_vision(base / "vision"),
            "qformer": tiny.write_qformer(base / "qformer"),
            "data": tiny.easyvqa_slices(base / "data", n=48)}


@pytest.fixture
def main():
    """train.main in this process, from a fresh torch.compile state; afterwards the signal
    handlers and thread count it set are put back."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    threads = torch.get_num_threads()
    torch._dynamo.reset()
    yield train.main
    torch._dynamo.reset()
    for s, h in handlers.items():
        signal.signal(s, h)
    torch.set_num_threads(threads)


def flags(assets, out_dir, design, *extra):
    data = assets["data"]
    return ["--stage", "2", "--adapter", design, "--iaa-layers", "2",
            "--llm", str(assets["llm"]), "--vision", str(assets["vision"]),
            "--qformer", str(assets["qformer"]), "--data", str(data["vqa_train"]),
            "--val-data", str(data["vqa_val"]), "--image-root", str(data["image_root"]),
            "--out-dir", str(out_dir), "--steps", str(STEPS), "--batch-size", "4",
            "--val-samples", "4", "--log-every", "1", "--num-threads", "1", *extra]


def logged(out_dir: Path, design: str) -> list[dict]:
    lines = (out_dir / design / "stage2" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


@pytest.fixture
def backend(request, monkeypatch):
    """train.py's torch.compile with the backend the test asks for, RNG as eager's."""
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=request.param))


COMPILED = [pytest.param(d, "aot_eager", id=f"{d}-aot_eager") for d in ADAPTERS] + \
    [pytest.param(d, "inductor", id=f"{d}-inductor",
                  marks=[] if d == "crome" else pytest.mark.slow) for d in ADAPTERS]


@pytest.mark.parametrize("design, backend", COMPILED, indirect=["backend"])
def test_compiled_training_matches_eager_and_stops_recompiling(assets, tmp_path, main, design,
                                                                backend):
    main(flags(assets, tmp_path / "eager", design, "--compile", "no", "--dtype", "fp32"))
    main(flags(assets, tmp_path / "compiled", design, "--compile", "yes", "--dtype", "fp32"))
    eager, compiled = logged(tmp_path / "eager", design), logged(tmp_path / "compiled", design)
    assert [r["step"] for r in compiled] == list(range(STEPS))
    for a, b in zip(eager, compiled):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-4), (a, b)
    # step 0 compiles one graph (no graph break); the next batch's other length recompiles it
    # once with that dimension dynamic; after that no batch shape compiles anything
    graphs = [r["compiled_graphs"] for r in compiled]
    assert graphs == [1] + [2] * (STEPS - 1), graphs
    assert "compiled_graphs" not in eager[0]


@pytest.mark.parametrize("design", ADAPTERS)
def test_bf16_trains_close_to_fp32_and_saves_fp32(assets, tmp_path, main, design):
    main(flags(assets, tmp_path / "fp32", design, "--compile", "no", "--dtype", "fp32"))
    main(flags(assets, tmp_path / "bf16", design, "--compile", "no", "--dtype", "bf16"))
    fp32, bf16 = logged(tmp_path / "fp32", design), logged(tmp_path / "bf16", design)
    for a, b in zip(fp32, bf16):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2), (a, b)
    run = tmp_path / "bf16" / design / "stage2"
    assert {v.dtype for v in load_file(run / "model.safetensors").values()} == {torch.float32}
    assert json.loads((run / "config.json").read_text())["train"]["dtype"] == "bf16"


@pytest.mark.parametrize("design", ADAPTERS)
def test_bf16_stores_the_frozen_llm_in_bf16_and_what_trains_in_fp32(assets, tmp_path, design):
    cfg, env, job = tiny.job_for(flags(assets, tmp_path, design, "--dtype", "bf16"))
    frozen_llm = {p.dtype for p in job.model.llm.parameters() if not p.requires_grad}
    assert frozen_llm == (set() if design == "full" else {torch.bfloat16})  # MWA's own train
    assert {p.dtype for p in job.trainable()} == {torch.float32}
