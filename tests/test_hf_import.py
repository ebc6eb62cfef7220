"""`--model.init_from=hf:PATH`: a Llama made and saved by transformers itself starts an fp8lab run
with transformers' logits, trains, resumes from its own checkpoints, and exports back bit for
bit after 0 steps; what fp8lab cannot import is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tokenizers import Tokenizer

from fp8lab.cli import main
from fp8lab.config import load_config
from fp8lab.data.tokenizer import train_bpe
from fp8lab.train.build import build
from fp8lab.train.logs import read_jsonl
from helpers import TINY

transformers = pytest.importorskip("transformers", reason="transformers is a test extra: pip install -e '.[test]'")
safetensors_torch = pytest.importorskip("safetensors.torch")

SEQ = 32
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # with head dim 16: all three bands
TEXT = ("The quick brown fox jumps over the lazy dog while the cat watches. Ünïcödé text, numbers 12345 and "
        "code: def f(x): return x * 2. ")


def make_hf_llama(folder, *, tie: bool, rope: dict | None = None, seed: int = 0, tokenizer: bytes | None = None,
                  dtype: torch.dtype = torch.float32):
    """A tiny LlamaForCausalLM made and saved by transformers (safetensors in `dtype`), norms
    perturbed so that every weight matters, plus `tokenizer` as tokenizer.json."""
    cfg = transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie, rope_parameters=rope,
        bos_token_id=None, eos_token_id=0, pad_token_id=None)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.to(dtype).save_pretrained(folder)
    if tokenizer is not None:
        (folder / "tokenizer.json").write_bytes(tokenizer)
    return model


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """{name: folder} of transformers-made models sharing one BPE tokenizer, and data prepared
    through the folder with `fp8lab prepare --tokenizer FOLDER`."""
    root = tmp_path_factory.mktemp("hf")
    texts = [f"{i}: {TEXT * (1 + i % 3)}" for i in range(120)]
    tok = train_bpe(texts=texts, vocab_size=300).json_bytes
    folders = {}
    for name, tie, rope, dtype in (("untied", False, None, torch.float32), ("tied", True, None, torch.float32),
                                   ("llama3", False, LLAMA3, torch.float32), ("bf16", True, None, torch.bfloat16)):
        folders[name] = root / name
        make_hf_llama(folders[name], tie=tie, rope=rope, seed=len(folders), tokenizer=tok, dtype=dtype)
    (root / "corpus").mkdir()
    (root / "corpus" / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    data = root / "data"
    assert main(["prepare", "-i", str(root / "corpus"), "-o", str(data), "--tokenizer", str(folders["untied"]),
                 "--seq-len", str(SEQ), "--val-fraction", "0.1", "--progress", "off"]) == 0
    return {**folders, "data": data, "root": root}


def overrides(hf, name: str, **extra) -> dict[str, str]:
    model_keys = {k: v for k, v in TINY.items() if not k.startswith("model.")}
    return {**model_keys, "data.path": str(hf["data"]), "model.init_from": f"hf:{hf[name]}", "train.steps": "2",
            "precision.compute_dtype": "fp32", "checkpoint.interval": "0", **extra}


def cli(values: dict[str, str], run_dir) -> list[str]:
    return ["train", *(f"--{k}={v}" for k, v in values.items()), "--run-dir", str(run_dir)]


def read_safetensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(safetensors_torch.load_file(f))
    return out


@pytest.mark.parametrize("name", ["untied", "tied", "llama3"])
def test_imported_model_gives_transformers_logits(hf, name):
    parts = build(load_config(None, overrides(hf, name)))
    assert parts.model_args.tie_embeddings == (name == "tied")
    assert (parts.model_args.rope_scaling is not None) == (name == "llama3")
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf[name]).eval()
    tokens = torch.randint(0, 320, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = parts.model(tokens), ref(tokens).logits
    # fp8lab's RoPE tables are computed in fp64 and HF's in fp32: equal to fp32 rounding.
    assert (ours - theirs).abs().max().item() <= 1e-4
    parts.loader.close()


@pytest.mark.parametrize("name", ["untied", "tied", "llama3", "bf16"])
def test_zero_steps_exports_the_original_weights_bit_for_bit(hf, name, tmp_path):
    run, out = tmp_path / "run", tmp_path / "out"
    assert main(cli(overrides(hf, name, **{"train.steps": "0"}), run)) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 0
    dtype = "bf16" if name == "bf16" else "fp32"  # bf16 weights go through fp32 masters and back exactly
    assert main(["export", str(run), "--out", str(out), "--dtype", dtype]) == 0
    original, exported = read_safetensors(hf[name]), read_safetensors(out)
    assert original.keys() == exported.keys()
    for key in original:
        assert original[key].dtype == exported[key].dtype and torch.equal(original[key], exported[key]), key
    theirs, ours = (json.loads((d / "config.json").read_text()) for d in (hf[name], out))
    for key in ("hidden_size", "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings",
                "eos_token_id", "rms_norm_eps"):
        assert ours[key] == theirs[key], key
    assert ours["rope_parameters"] == theirs["rope_parameters"]
    # The run kept the model's own tokenizer, and the export carries it.
    assert (out / "tokenizer.json").read_bytes() == (hf[name] / "tokenizer.json").read_bytes()


def test_import_trains_and_resumes_from_its_checkpoint_not_the_folder(hf, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(hf["untied"], folder)
    run = tmp_path / "run"
    values = {**overrides(hf, "untied"), "model.init_from": f"hf:{folder}", "train.steps": "2"}
    assert main(cli(values, run)) == 0
    losses = [r["loss"] for r in read_jsonl(run / "metrics.jsonl")]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    # The weights come from the checkpoint on resume: the folder's safetensors are not read again.
    (folder / "model.safetensors").unlink()
    assert main(cli({**values, "train.steps": "3"}, run)) == 0
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]


def _hf_copy(hf, tmp_path, name="untied"):
    folder = tmp_path / "bad"
    shutil.copytree(hf[name], folder)
    return folder


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _edit_weights(folder, fn):
    tensors = safetensors_torch.load_file(folder / "model.safetensors")
    fn(tensors)
    safetensors_torch.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


BAD = {
    "no config.json": (lambda f: (f / "config.json").unlink(), "has no config.json"),
    "not llama": (lambda f: _edit_config(f, model_type="mistral", architectures=["MistralForCausalLM"]),
                  "model_type='mistral' is not supported"),
    "attention bias": (lambda f: _edit_config(f, attention_bias=True), "attention_bias=True is not supported"),
    "yarn rope": (lambda f: _edit_config(f, rope_parameters={"rope_type": "yarn", "factor": 4.0}),
                  "rope_type='yarn' is not supported"),
    "missing tensor": (lambda f: _edit_weights(f, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
                       "tensor model.layers.1.mlp.up_proj.weight is missing"),
    "misshaped tensor": (lambda f: _edit_weights(f, lambda t: t.update(
        {"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)})),
        "model.layers.0.self_attn.k_proj.weight has shape (16, 64), the config says (32, 64)"),
    "other tokenizer": (lambda f: (f / "tokenizer.json").write_text(
        train_bpe(texts=["other text entirely"] * 5, vocab_size=270).json_bytes.decode()),
        "was tokenized with another tokenizer than"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_folder_is_one_line_exit_2_nothing_written(hf, tmp_path, capsys, case):
    edit, message = BAD[case]
    folder = _hf_copy(hf, tmp_path)
    edit(folder)
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(cli({**overrides(hf, "untied"), "model.init_from": f"hf:{folder}"}, run)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not run.exists()


@pytest.mark.parametrize("extra,message", [
    ({"model.dim": "128"}, "model.dim=128 cannot be combined with model.init_from"),
    ({"model.init_from": "s3://bucket/model"}, "expected hf:PATH"),
    ({"data.path": "embedded"}, "is byte-level, the model at"),
])
def test_bad_combination_is_one_line_exit_2_nothing_written(hf, tmp_path, capsys, extra, message):
    run = tmp_path / "run"
    values = {**overrides(hf, "untied"), **extra}
    capsys.readouterr()
    assert main(cli(values, run)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not run.exists()


def test_a_run_on_tokenized_data_exports_the_datas_tokenizer(hf, tmp_path):
    run, out = tmp_path / "run", tmp_path / "out"
    values = {**TINY, "data.path": str(hf["data"]), "train.steps": "1", "precision.compute_dtype": "fp32"}
    assert main(cli(values, run)) == 0
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert (out / "tokenizer.json").read_bytes() == (hf["data"] / "tokenizer.json").read_bytes()
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 0
    # The ids the data was prepared with: no BOS or EOS added by the exported tokenizer.
    prepared = Tokenizer.from_file(str(hf["data"] / "tokenizer.json")).encode(TEXT, add_special_tokens=False).ids
    assert tok(TEXT)["input_ids"] == prepared
