"""The README's fine-tuning walk-through, end to end and in one process: a Llama folder saved by
transformers (examples/finetune/setup.py), chat data prepared with its tokenizer and template,
an FP8 run started from the folder with the document mask, stopped and resumed to the same
losses, exported, and loaded and run by transformers with the logits fp8lab computes."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from fp8lab.cli import main
from fp8lab.config import load_config
from fp8lab.data import open_dataset
from fp8lab.train.build import build
from fp8lab.train.checkpoint import list_complete, read_model_tensors
from fp8lab.train.logs import read_jsonl
from fp8lab.train.trainer import Trainer
from helpers import REPO

transformers = pytest.importorskip("transformers", reason="transformers is a test extra: pip install -e '.[test]'")


def _setup_module():
    spec = importlib.util.spec_from_file_location("finetune_setup", REPO / "examples" / "finetune" / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    assert _setup_module().main(["--out", str(root), "--examples", "600"]) == 0
    assert main(["prepare", "-i", str(root / "chat.jsonl"), "--format", "chat", "--tokenizer",
                 str(root / "tiny-llama"), "--seq-len", "64", "--val-fraction", "0.05", "--out",
                 str(root / "data"), "--progress", "off"]) == 0
    return root


def _config(work, **extra):
    values = {"model.init_from": f"hf:{work / 'tiny-llama'}", "data.path": str(work / "data"), "data.seq_len": "64",
              "data.micro_batch_size": "4", "data.document_mask": "true", "train.steps": "6",
              "train.eval_interval": "0", "train.eval_batches": "1", "train.threads": "2",
              "optim.warmup_steps": "1", "optim.lr": "2e-3", "checkpoint.interval": "2",
              "precision.recipe": "fp8-rowwise", "logging.progress": "off"}
    return load_config(None, values | {k: str(v) for k, v in extra.items()})


def test_the_data_puts_loss_on_the_assistant_only(work):
    ds = open_dataset(work / "data", verify="full")
    tok = transformers.AutoTokenizer.from_pretrained(work / "tiny-llama")
    split = ds.split("train")
    windows, flags = split.gather([0]), split.gather_flags([0])
    text = tok.decode([t for t, f in zip(windows[0], flags[0]) if f & 1])
    # Every loss token is an answer ("a + b = c") or the end of the assistant's turn.
    answers = [part for part in text.split("<|eot_id|>") if part.strip("<|end_of_text|>")]
    assert answers and all(" + " in a and " = " in a for a in answers), text
    assert "What is" not in text and "<|start_header_id|>" not in text


def test_an_fp8_finetune_resumes_exactly_and_exports_what_transformers_runs(work, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    Trainer(_config(work), full).run()
    assert Trainer(_config(work, **{"debug.stop_at_step": 3}), part).run() == {"stopped_at": 3}
    Trainer(_config(work), part).run()
    losses = [r["loss"] for r in read_jsonl(full / "metrics.jsonl")]
    assert losses == [r["loss"] for r in read_jsonl(part / "metrics.jsonl")] and len(losses) == 6
    assert losses[-1] < losses[0]

    out = tmp_path / "export"
    assert main(["export", str(part), "--out", str(out), "--dtype", "fp32"]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 30?"}], add_generation_prompt=True,
                                     tokenize=False)
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    cfg = _config(work, **{"precision.recipe": "bf16", "precision.compute_dtype": "fp32"})
    plain = build(cfg, fresh=False).model
    step, path = list_complete(part)[-1]
    assert step == 6
    weights = {k.removeprefix("model."): v for k, v in read_model_tensors(path).items()}
    plain.load_state_dict(weights, strict=False)  # a tied output weight is stored once
    with torch.no_grad():
        ours, theirs = plain(ids), model(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    n = ids.shape[1]
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)  # may stop early at EOS
    assert n < generated.shape[1] <= n + 4 and (generated[:, :n] == ids).all()
    assert generated[0, n] == ours[0, -1].argmax()  # greedy: the token fp8lab's logits pick
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == tok.convert_tokens_to_ids("<|end_of_text|>")
