"""`fp8lab export`: a run's checkpoint as a Hugging Face Llama folder that transformers loads
offline with fp8lab's logits; the q/k row permutation; the byte tokenizer as tokenizer.json;
tied and untied round trips (export -> init_from -> export) bit for bit; bad inputs."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from fp8lab.cli import main
from fp8lab.data.tokenizer import ByteTokenizer
from fp8lab.interop.hf_llama import args_to_config, config_to_args, half_to_interleaved, interleaved_to_half
from fp8lab.interop.hf_tokenizer import byte_tokenizer, byte_tokenizer_json, is_byte_tokenizer
from fp8lab.models.llama import ModelArgs, RopeScaling, Transformer
from fp8lab.train.checkpoint import list_complete, load_model_weights, read_model_tensors, read_state
from helpers import TINY, tree_digest

safetensors_torch = pytest.importorskip("safetensors.torch")

TEXTS = ["plain ascii", "Grüße, naïve café — 日本語のテキスト 🙂", "tabs\tand\nnewlines\r\n", ""]


def _run_args(run_dir, **extra) -> list[str]:
    # TINY with 4 query / 2 kv heads (head dim 16); threads left alone: this runs inside pytest.
    # With model.init_from the folder's config sets the shape: no model.* key but that one.
    values = {**TINY, "model.n_heads": "4", "model.n_kv_heads": "2", "train.steps": "3",
              "precision.compute_dtype": "fp32", "checkpoint.interval": "0", **extra}
    if "model.init_from" in extra:
        values = {k: v for k, v in values.items() if not k.startswith("model.") or k == "model.init_from"}
    return ["train", *(f"--{k}={v}" for k, v in values.items()), "--run-dir", str(run_dir)]


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(safetensors_torch.load_file(f))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two byte-level runs on the embedded corpus: untied in fp8-tensorwise (emulated), tied in
    the bf16 recipe (fp32 compute); each exported in fp32."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for name, extra in (("fp8", {"precision.recipe": "fp8-tensorwise"}),
                        ("tied", {"model.tie_embeddings": "true", "checkpoint.interval": "1"})):
        run = root / name
        assert main(_run_args(run, **extra)) == 0
        # The untied export is sharded (a tiny threshold), so import reads an index too.
        shard = ["--max-shard-size", "100KB"] if name == "fp8" else []
        assert main(["export", str(run), "--out", str(root / f"{name}-hf"), "--dtype", "fp32", *shard]) == 0
        out[name], out[f"{name}-hf"] = run, root / f"{name}-hf"
    return out


def test_rope_permutation_and_inverse_are_exact():
    w = torch.randn(4 * 16, 64)
    half = interleaved_to_half(w, 4)
    assert not torch.equal(half, w) and torch.equal(half_to_interleaved(half, 4), w)
    # Within a head, the even rows (first of each rotated pair) become the first half.
    assert torch.equal(half[:8], w[0:16:2]) and torch.equal(half[8:16], w[1:16:2])


# config.json as transformers 4.x wrote them (Meta's Llama 3.2 1B; Llama 2 7B; an old linear-scaled one).
LLAMA32_1B = {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000,
              "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
              "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
              "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1,
              "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
              "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 128256}
LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
             "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": 32,
             "num_hidden_layers": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-05, "rope_scaling": None,
             "tie_word_embeddings": False, "vocab_size": 32000}


def test_config_json_of_either_transformers_version_maps_to_model_args():
    a = config_to_args(LLAMA32_1B, origin="1b")
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.ffn_dim, a.vocab_size) == (2048, 16, 32, 8, 8192, 128256)
    assert a.tie_embeddings and a.rope_theta == 500000.0 and a.max_seq_len == 131072 and a.norm_eps == 1e-5
    assert a.rope_scaling == RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)
    b = config_to_args(LLAMA2_7B, origin="7b")
    assert b.rope_theta == 10000.0 and b.rope_scaling is None and b.n_kv_heads == 32 and not b.tie_embeddings
    old_linear = {**LLAMA2_7B, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert config_to_args(old_linear, origin="x").rope_scaling == RopeScaling("linear", 2.0)
    for args in (a, b):  # what export writes reads back as the same shape, and survives state.json
        assert config_to_args(args_to_config(args, dtype=torch.bfloat16), origin="out") == args
        assert ModelArgs.from_dict(json.loads(json.dumps(dataclasses.asdict(args)))) == args


def test_byte_tokenizer_json_encodes_like_fp8lab():
    tok, ours = byte_tokenizer(), ByteTokenizer()
    for text in TEXTS:
        ids, _ = ours.encode([text])
        assert tok.encode(text).ids + [256] == ids.tolist(), text
        assert tok.decode(tok.encode(text).ids) == text
    assert byte_tokenizer_json() == byte_tokenizer_json()  # the same bytes every time


def test_byte_tokenizer_through_autotokenizer(runs):
    transformers = pytest.importorskip("transformers", reason="transformers is a test extra")
    folder = runs["fp8-hf"]
    assert is_byte_tokenizer(folder / "tokenizer.json")
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids == list(text.encode("utf-8")), text
        assert tok.decode(ids) == text
    assert tok.eos_token_id == 256 and tok.bos_token_id is None


def test_fp8_run_export_loads_in_transformers_with_fp8labs_logits(runs):
    transformers = pytest.importorskip("transformers", reason="transformers is a test extra")
    folder = runs["fp8-hf"]
    names = sorted(p.name for p in folder.iterdir())
    assert "model.safetensors.index.json" in names and "model-00001-of-00005.safetensors" in names
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(names)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["eos_token_id"] == 256
    assert cfg["tie_word_embeddings"] is False and "lm_head.weight" in _tensors(folder)
    _, ckpt = list_complete(runs["fp8"])[-1]
    ours = Transformer(ModelArgs.from_dict(read_state(ckpt)["model_args"]))
    load_model_weights(ckpt, ours)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    tokens = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours.eval()(tokens) - theirs(tokens).logits).abs().max().item()
    assert diff <= 1e-4


@pytest.mark.parametrize("name", ["fp8", "tied"])
def test_round_trip_through_init_from_is_bit_exact(runs, name, tmp_path):
    first = runs[f"{name}-hf"]
    run, again = tmp_path / "run", tmp_path / "again"
    assert main(_run_args(run, **{"model.init_from": f"hf:{first}", "train.steps": "0"})) == 0
    # The re-imported run's step-0 checkpoint holds exactly the original run's final weights.
    _, before = list_complete(runs[name])[-1]
    _, after = list_complete(run)[-1]
    a, b = read_model_tensors(before), read_model_tensors(after)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ("output.weight" in a) == (name == "fp8")  # a tied checkpoint stores the embedding once
    assert main(["export", str(run), "--out", str(again), "--dtype", "fp32"]) == 0
    x, y = _tensors(first), _tensors(again)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert ("lm_head.weight" in x) == (name == "fp8")


def test_default_export_is_bf16(runs, tmp_path):
    out = tmp_path / "bf16"
    assert main(["export", str(runs["tied"]), "--out", str(out)]) == 0
    assert {t.dtype for t in _tensors(out).values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_a_newest_checkpoint_that_does_not_verify_is_passed_over(runs, tmp_path, capsys):
    run = shutil.copytree(runs["tied"], tmp_path / "run")
    assert [s for s, _ in list_complete(run)] == [1, 2, 3]
    payload = next((run / "checkpoints" / "step-3" / "dcp").glob("*.distcp"))
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 0xFF
    payload.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "out"), "--dtype", "fp32"]) == 0
    said = capsys.readouterr().out
    assert "step-3 does not verify" in said and "passed over" in said and "step-2 (step 2" in said
    two = read_model_tensors(run / "checkpoints" / "step-2")
    exported = _tensors(tmp_path / "out")
    assert torch.equal(exported["model.norm.weight"], two["norm.weight"])
    assert main(["export", str(run), "--step", "1", "--out", str(tmp_path / "one")]) == 0


@pytest.mark.parametrize("case", ["out exists", "not a run", "no such step", "damaged"])
def test_bad_export_is_one_line_exit_2_nothing_written(runs, tmp_path, capsys, case):
    source, out, extra = runs["tied"], tmp_path / "out", []
    if case == "out exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "not a run":
        source = tmp_path / "empty"
        source.mkdir()
    elif case == "no such step":
        extra = ["--step", "7"]
    before = tree_digest(tmp_path)
    capsys.readouterr()
    if case == "damaged":  # a checkpoint folder whose files no longer match its manifest
        source = tmp_path / "ckpt"
        shutil.copytree(list_complete(runs["tied"])[-1][1], source)
        state = source / "state.json"
        state.write_text(state.read_text().replace('"step"', '"step" ', 1))
        before = tree_digest(tmp_path)
    assert main(["export", str(source), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    expected = {"out exists": "exists and is not empty", "not a run": "is neither an fp8lab run directory",
                "no such step": "has no complete checkpoint of step 7", "damaged": "is damaged"}[case]
    assert len(err) == 1 and expected in err[0], err
    assert tree_digest(tmp_path) == before  # nothing written, nothing left behind
