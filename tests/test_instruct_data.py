"""Instruction data (`fp8lab prepare --format prompt-completion | chat`): loss only on the
completion / assistant tokens, checked against token sequences built here by hand; whole
examples per window; overflow; flags files checked by the manifest; document ids; resume;
reproducibility; and one-line errors (exit 2, nothing written) for bad lines and tokenizers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from data_helpers import LLAMA3_TEMPLATE, listing, make_docs, make_tokenizer_folder, write_jsonl, write_lines
from fp8lab.cli import main
from fp8lab.data import IGNORE_INDEX, DatasetWriter, TokenLoader, eval_batches, open_dataset, write_dataset
from fp8lab.data.flags import FLAG_DOC_START, FLAG_LOSS
from fp8lab.data.prepare import prepare_dataset
from fp8lab.data.tokenizer import load_tokenizer
from fp8lab.errors import FP8LabError

SYSTEM, U1, A1, U2, A2 = "Be brief.", "the data model?", "loss step batch.", "and  more ", "  token train"
CHAT = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": U1},
                     {"role": "assistant", "content": A1}, {"role": "user", "content": U2},
                     {"role": "assistant", "content": A2}]}
PROMPT, COMPLETION = "the model is", " a tensor of eight"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Llama-3-style tokenizer folder: EOS <|eot_id|>, BOS added by tokenizer.json's post-processor."""
    return make_tokenizer_folder(tmp_path_factory.mktemp("tok") / "llama3")


@pytest.fixture(scope="module")
def tok(folder):
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def prep(tmp_path, records, *, folder, fmt="chat", name="out", **kw):
    src = write_lines(tmp_path / f"{name}.jsonl", records)
    kw.setdefault("seq_len", 128)
    kw.setdefault("val_fraction", 0.0)
    report = prepare_dataset(inputs=[str(src)], out=tmp_path / name, tokenizer=str(folder), format=fmt, **kw)
    return report, open_dataset(tmp_path / name, verify="full")


def all_windows(split):
    rows = np.arange(len(split))
    return split.gather(rows).astype(np.int64), split.gather_flags(rows)


def loss_runs(tok, targets: torch.Tensor) -> list[str]:
    """The text of each run of consecutive targets that carry loss."""
    runs, cur = [], []
    for t in targets.tolist() + [IGNORE_INDEX]:
        if t != IGNORE_INDEX:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur, skip_special_tokens=False))
            cur = []
    return runs


def test_prompt_completion_puts_loss_on_the_completion_and_eos_only(tmp_path, folder, tok):
    report, ds = prep(tmp_path, [{"prompt": PROMPT, "completion": COMPLETION}], folder=folder,
                      fmt="prompt-completion")
    bos, eos = tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|eot_id|>")
    # By hand: BOS (the post-processor adds one), prompt, completion, EOS <|eot_id|> from the config.
    ids = [bos] + enc(tok, PROMPT) + enc(tok, COMPLETION) + [eos]
    loss = [0] * (1 + len(enc(tok, PROMPT))) + [1] * (len(enc(tok, COMPLETION)) + 1)
    windows, flags = all_windows(ds.split("train"))
    assert windows.shape == (1, 129) and ds.eos_id == eos
    assert windows[0, : len(ids)].tolist() == ids and (windows[0, len(ids):] == eos).all()  # padding: EOS id
    assert (flags[0, : len(ids)] & FLAG_LOSS).tolist() == loss and not flags[0, len(ids):].any()
    assert flags[0, 0] == FLAG_DOC_START
    (x, y), = eval_batches(ds.split("train"), batch_size=1, num_batches=1)
    assert loss_runs(tok, y[0]) == [COMPLETION + "<|eot_id|>"]
    assert int((y != IGNORE_INDEX).sum()) == sum(loss) == report.stats["train"]["loss_tokens"]
    assert report.stats["train"]["pad_targets"] == 129 - len(ids)


@pytest.mark.parametrize("eos", ["<|eot_id|>", "<|end_of_text|>"])
def test_chat_puts_loss_on_assistant_turns_only(tmp_path, tok, eos):
    folder = make_tokenizer_folder(tmp_path / "tok", config={"eos_token": eos})
    report, ds = prep(tmp_path, [CHAT], folder=folder)
    # Llama 3's format written out by hand, in the pieces that carry loss (True) or not.
    head = "<|start_header_id|>{}<|end_header_id|>\n\n"
    pieces = [("<|begin_of_text|>" + head.format("system") + SYSTEM + "<|eot_id|>" + head.format("user") + U1
               + "<|eot_id|>" + head.format("assistant"), False), (A1 + "<|eot_id|>", True),
              (head.format("user") + U2.strip() + "<|eot_id|>" + head.format("assistant"), False),
              (A2.strip() + "<|eot_id|>", True)]
    ids, loss = [], []
    for text, carries in pieces:
        ids += enc(tok, text)
        loss += [int(carries)] * len(enc(tok, text))
    if eos != "<|eot_id|>":  # the conversation gets its EOS (with loss: an assistant ends it)
        ids, loss = ids + [tok.token_to_id(eos)], loss + [1]
    windows, flags = all_windows(ds.split("train"))
    assert windows[0, : len(ids)].tolist() == ids
    assert (flags[0, : len(ids)] & FLAG_LOSS).tolist() == loss
    (x, y), = eval_batches(ds.split("train"), batch_size=1, num_batches=1)
    tail = "" if eos == "<|eot_id|>" else eos
    assert loss_runs(tok, y[0]) == [A1 + "<|eot_id|>", A2.strip() + "<|eot_id|>" + tail]
    assert ds.tokenizer["eos_token"] == eos and report.stats["train"]["loss_tokens"] == sum(loss)


def test_tokenizer_folder_files_are_saved_recorded_and_verified(tmp_path, folder):
    (folder.parent / "with-jinja").mkdir(exist_ok=True)
    jfolder = make_tokenizer_folder(folder.parent / "with-jinja", config={"chat_template": None})
    (jfolder / "chat_template.jinja").write_text(LLAMA3_TEMPLATE)
    _, ds = prep(tmp_path, [CHAT], folder=jfolder)
    assert ds.tokenizer_config_file == tmp_path / "out" / "tokenizer_config.json"
    assert ds.tokenizer_config_file.read_bytes() == (jfolder / "tokenizer_config.json").read_bytes()
    assert (tmp_path / "out" / "chat_template.jinja").read_bytes() == (jfolder / "chat_template.jinja").read_bytes()
    assert {"config_sha256", "chat_template_sha256", "bos_id"} <= set(ds.tokenizer)
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        path = tmp_path / "out" / name
        original = path.read_bytes()
        path.write_bytes(original + b" ")
        open_dataset(tmp_path / "out")  # sizes only: not read
        with pytest.raises(FP8LabError, match=f"{name} changed since it was prepared"):
            open_dataset(tmp_path / "out", verify="full")
        path.unlink()
        with pytest.raises(FP8LabError, match=f"{name} listed in .* is missing"):
            open_dataset(tmp_path / "out")
        path.write_bytes(original)


def test_bos_follows_add_bos_token_else_the_post_processor(tmp_path, folder):
    assert load_tokenizer(folder).add_bos  # Llama 3: no add_bos_token, the post-processor adds it
    off = make_tokenizer_folder(tmp_path / "off", config={"add_bos_token": False})
    assert not load_tokenizer(off).add_bos
    none = make_tokenizer_folder(tmp_path / "none", config={"bos_token": None})
    assert load_tokenizer(none).bos_id is None and not load_tokenizer(none).add_bos
    eos = make_tokenizer_folder(tmp_path / "eos", config={"eos_token": {"content": "<|end_of_text|>"}})
    assert load_tokenizer(eos).eos_token == "<|end_of_text|>"
    assert load_tokenizer(eos, eos_token="<|eot_id|>").eos_token == "<|eot_id|>"  # --eos-token wins
    bad = make_tokenizer_folder(tmp_path / "bad", config={"eos_token": "<nope>"})
    with pytest.raises(FP8LabError, match=r"no token '<nope>' \(the eos_token of .*tokenizer_config.json\)"):
        load_tokenizer(bad)


def _pairs(n, seed=0):
    """`n` prompt-completion records of seeded pseudo-text, of varied lengths."""
    docs = make_docs(2 * n, seed=seed, min_words=1, max_words=30)
    return [{"prompt": docs[2 * i], "completion": docs[2 * i + 1]} for i in range(n)]


def _chats(n, seed=0):
    """`n` one- or two-turn conversations, some with a system message."""
    out = []
    for i, r in enumerate(_pairs(2 * n, seed=seed)[::2]):
        messages = [{"role": "system", "content": "Answer."}] if i % 3 == 0 else []
        messages += [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]
        out.append({"messages": messages + (messages[-2:] if i % 2 else [])})
    return out


def test_whole_examples_per_window_and_overflow(tmp_path, folder, tok):
    records = _pairs(60, seed=5)
    bos, eos = tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|eot_id|>")
    expected = [[bos] + enc(tok, r["prompt"]) + enc(tok, r["completion"]) + [eos] for r in records]
    prompt_len = [1 + len(enc(tok, r["prompt"])) for r in records]
    seq_len = 48
    long = [e for e in expected if len(e) > seq_len + 1]
    # A long example whose prompt fills the whole window keeps no loss token: dropped even when truncating.
    hopeless = [e for e, p in zip(expected, prompt_len, strict=True) if p >= seq_len + 1]
    assert 0 < len(hopeless) < len(long) < len(expected)
    for overflow in ("truncate", "drop"):
        report, ds = prep(tmp_path, records, folder=folder, fmt="prompt-completion", seq_len=seq_len,
                          overflow=overflow, name=overflow)
        windows, flags = all_windows(ds.split("train"))
        placed = []
        for w, f in zip(windows, flags, strict=True):
            starts = np.flatnonzero(f & FLAG_DOC_START).tolist()
            assert starts[0] == 0  # every window opens with an example
            end = len(w) - int(np.argmax(f[::-1] != 0)) if f.any() else 0  # padding: flags 0, EOS id
            assert (w[end:] == eos).all()
            bounds = starts + [end]
            placed += [w[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        s = report.stats["train"]
        if overflow == "truncate":
            # in order, whole, the long ones cut
            assert placed == [e[: seq_len + 1] for e, p in zip(expected, prompt_len, strict=True) if p < seq_len + 1]
            assert s["truncated_examples"] == len(long) - len(hopeless) and s["dropped_examples"] == len(hopeless)
            assert s["truncated_tokens"] == sum(len(e) - seq_len - 1 for e in long if e not in hopeless)
        else:
            assert placed == [e for e in expected if len(e) <= seq_len + 1]
            assert s["dropped_examples"] == len(long) and s["truncated_examples"] == 0
            assert s["dropped_tokens"] == sum(map(len, long))
        assert s["documents"] == len(placed) and s["tokens"] == sum(map(len, placed))


def test_no_pack_puts_one_example_per_window(tmp_path, folder):
    records = _chats(20, seed=2)
    report, ds = prep(tmp_path, records, folder=folder, seq_len=256, pack=False)
    _, flags = all_windows(ds.split("train"))
    assert ((flags & FLAG_DOC_START) != 0).sum(axis=1).tolist() == [1] * len(records)


def test_conversation_without_assistant_is_dropped_and_counted(tmp_path, folder):
    records = [CHAT, {"messages": [{"role": "user", "content": "hello"}]}, CHAT]
    report, ds = prep(tmp_path, records, folder=folder, seq_len=256)
    assert report.stats["train"]["no_loss_examples"] == 1 and report.stats["train"]["documents"] == 2
    assert any("no loss token" in n for n in report.notes)


def test_a_template_that_is_not_incremental_is_refused(tmp_path):
    # Only the last assistant turn is written out: earlier renderings are no prefixes of the whole.
    template = "{% for m in messages %}{% if m.role != 'assistant' or loop.last %}{{ m.content }}|{% endif %}{% endfor %}"
    folder = make_tokenizer_folder(tmp_path / "tok", config={"chat_template": template})
    with pytest.raises(FP8LabError, match=r"c\.jsonl: line 2: the chat template .* is not incremental"):
        prep(tmp_path, [{"messages": [{"role": "user", "content": "hi"}]}, CHAT], folder=folder, name="c")
    assert not (tmp_path / "c").exists()
    opener = {"messages": [{"role": "assistant", "content": "Hi."}, {"role": "user", "content": "hello"}]}
    with pytest.raises(FP8LabError, match=r"d\.jsonl: line 1: the conversation opens with an assistant message"):
        prep(tmp_path, [opener], folder=make_tokenizer_folder(tmp_path / "llama3"), name="d")


MALFORMED = {
    "bad-json": ("chat", '{"messages": [', "not valid JSON"),
    "no-messages": ("chat", {"text": "hi"}, "expected a JSON object with field 'messages'"),
    "messages-empty": ("chat", {"messages": []}, "field 'messages' is an empty array"),
    "content-number": ("chat", {"messages": [{"role": "user", "content": 3}]}, "'content' of messages[0] is a number"),
    "role-missing": ("chat", {"messages": [{"content": "x"}]}, "messages[0] has no field 'role'"),
    "not-object": ("prompt-completion", '["a", "b"]', "expected a JSON object, got an array"),
    "no-completion": ("prompt-completion", {"prompt": "a"}, "has no field 'completion'"),
    "prompt-null": ("prompt-completion", {"prompt": None, "completion": "b"}, "field 'prompt' of the line is null"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_line_names_file_and_line_exit_2_nothing_written(tmp_path, folder, capsys, case):
    fmt, bad, message = MALFORMED[case]
    good = CHAT if fmt == "chat" else {"prompt": PROMPT, "completion": COMPLETION}
    src = write_lines(tmp_path / "in.jsonl", [good, "", good, bad, good])  # line 4 (blank line 2 counts)
    code = main(["prepare", "-i", str(src), "-o", str(tmp_path / "out"), "--tokenizer", str(folder),
                 "--format", fmt, "--seq-len", "64", "--shard-tokens", "65"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"{src}: line 4: " in err and message in err, err
    assert listing(tmp_path) == ["in.jsonl"]  # shards of lines 1-3 were written (--shard-tokens): all removed


@pytest.mark.parametrize("tokenizer", ["no-template", "byte"])
def test_chat_without_a_chat_template_is_one_line_exit_2_nothing_written(tmp_path, capsys, tokenizer):
    if tokenizer != "byte":
        tokenizer = str(make_tokenizer_folder(tmp_path / "tok", config={"chat_template": None}))
    src = write_lines(tmp_path / "in.jsonl", [CHAT])
    before = listing(tmp_path)
    code = main(["prepare", "-i", str(src), "-o", str(tmp_path / "out"), "--tokenizer", tokenizer, "--format", "chat"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "has none (no chat_template" in err, err
    assert listing(tmp_path) == before


def test_instruct_formats_refuse_other_inputs_and_options(tmp_path, folder):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(FP8LabError, match=r"--format chat reads JSON lines .*/a\.txt is a \.txt file"):
        prepare_dataset(inputs=[str(tmp_path / "a.txt")], out=tmp_path / "o", tokenizer=str(folder), format="chat")
    src = write_lines(tmp_path / "in.jsonl", [CHAT])
    with pytest.raises(FP8LabError, match="--train-tokenizer is for --format text"):
        prepare_dataset(inputs=[str(src)], out=tmp_path / "o", train_tokenizer=True, vocab_size=300, format="chat")
    with pytest.raises(FP8LabError, match="--overflow must be one of truncate, drop"):
        prepare_dataset(inputs=[str(src)], out=tmp_path / "o", tokenizer=str(folder), format="chat", overflow="x")
    assert listing(tmp_path) == ["a.txt", "in.jsonl"]


def test_flags_files_are_checked_on_open(tmp_path, folder):
    _, ds = prep(tmp_path, _chats(60, seed=1), folder=folder, seq_len=64, val_fraction=0.1)
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["splits"]["train"][0]["flags"]
    assert entry["file"] == "train_00000.flags" and ds.split("val").has_flags
    path = out / entry["file"]
    data = bytearray(path.read_bytes())
    data[-1] ^= FLAG_LOSS  # same size: only the sha256 sees it
    path.write_bytes(bytes(data))
    open_dataset(out)
    with pytest.raises(FP8LabError, match="flags file .*train_00000.flags changed: sha256"):
        open_dataset(out, verify="full")
    path.write_bytes(bytes(data[:-1]))
    with pytest.raises(FP8LabError, match="flags file .*train_00000.flags is .* bytes but its header"):
        open_dataset(out)
    path.unlink()
    with pytest.raises(FP8LabError, match="flags file .*train_00000.flags not found"):
        open_dataset(out)


def test_document_ids_from_flags_and_from_eos(tmp_path):
    tokens = np.array([[5, 6, 7, 8, 9, 1, 1], [5, 6, 7, 8, 9, 1, 1]], dtype=np.uint16)
    flags = np.array([[2, 1, 1, 2, 1, 0, 0], [2, 0, 2, 1, 2, 1, 0]], dtype=np.uint8)
    with DatasetWriter(tmp_path / "f", seq_len=6, vocab_size=16, eos_id=1) as w:
        w.add_shard("train", tokens, flags=flags)
        w.finish(tokenizer={"type": "test"}, sources=[])
    split = open_dataset(tmp_path / "f", verify="full").split("train")
    (x, y, docs), = eval_batches(split, batch_size=2, num_batches=1, documents=True)
    assert docs.dtype == torch.int32 and docs.tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]]
    assert y.tolist() == [[6, 7, -100, 9, -100, -100], [-100, -100, 8, -100, 1, -100]]
    # From EOS (3): a position whose input is EOS starts a document (the EOS is its BOS).
    rows = np.array([[3, 5, 3, 3, 6, 7, 3, 8, 9]], dtype=np.uint16)
    write_dataset(tmp_path / "e", train=[rows], val=[], seq_len=8, vocab_size=16, eos_id=3, tokenizer={}, sources=[])
    (x, y, docs), = eval_batches(open_dataset(tmp_path / "e").split("train"), batch_size=1, num_batches=1,
                                 documents=True)
    assert docs.tolist() == [[0, 0, 1, 2, 2, 2, 3, 3]]
    assert len(eval_batches(open_dataset(tmp_path / "e").split("train"), batch_size=1, num_batches=1)[0]) == 2
    write_dataset(tmp_path / "n", train=[rows], val=[], seq_len=8, vocab_size=16, eos_id=None, tokenizer={}, sources=[])
    split = open_dataset(tmp_path / "n").split("train")
    for call in (lambda: TokenLoader(split, batch_size=1, seed=0, documents=True),
                 lambda: eval_batches(split, batch_size=1, num_batches=1, documents=True)):
        with pytest.raises(FP8LabError, match=f"data {tmp_path / 'n'} has no EOS id and no flags files"):
            call()


@pytest.mark.parametrize("prefetch", [0, 2])
def test_loader_resumes_exactly_with_masks_and_documents(tmp_path, folder, prefetch):
    _, ds = prep(tmp_path, _pairs(80, seed=4), folder=folder, fmt="prompt-completion", seq_len=48)
    split = ds.split("train")

    def batches(loader, n):
        return [tuple(t.clone() for t in loader.next_batch()) for _ in range(n)]

    whole = TokenLoader(split, batch_size=2, seed=7, documents=True, prefetch=prefetch)
    total = whole.batches_per_epoch + 3  # across an epoch boundary
    expected = batches(whole, total)
    whole.close()
    first = TokenLoader(split, batch_size=2, seed=7, documents=True, prefetch=prefetch)
    got = batches(first, 5)
    state = first.state_dict()
    first.close()
    resumed = TokenLoader(split, batch_size=2, seed=7, documents=True, prefetch=prefetch)
    resumed.load_state_dict(state)
    got += batches(resumed, total - 5)
    resumed.close()
    assert len(expected[0]) == 3
    for a, b in zip(expected, got, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    masked = sum(int((b[1] == IGNORE_INDEX).sum()) for b in expected)
    assert 0 < masked < sum(b[1].numel() for b in expected)  # prompts and padding carry no loss
    plain = TokenLoader(split, batch_size=2, seed=7).next_batch()
    assert len(plain) == 2 and torch.equal(plain[1], expected[0][1])


def test_same_inputs_give_identical_bytes(tmp_path, folder):
    src = write_lines(tmp_path / "in.jsonl", _chats(50, seed=9))
    for name in ("a", "b"):
        prepare_dataset(inputs=[str(src)], out=tmp_path / name, tokenizer=str(folder), format="chat", seq_len=64,
                        val_fraction=0.2)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert {"train_00000.flags", "val_00000.flags", "tokenizer_config.json"} <= set(names)
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n


def test_text_format_with_a_tokenizer_folder_has_no_flags(tmp_path, folder):
    src = write_jsonl(tmp_path / "t.jsonl", make_docs(30, seed=1))
    prepare_dataset(inputs=[str(src)], out=tmp_path / "out", tokenizer=str(folder), seq_len=32, val_fraction=0.1)
    ds = open_dataset(tmp_path / "out", verify="full")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert not any("flags" in e for es in manifest["splits"].values() for e in es) and "instruct" not in manifest
    assert not ds.split("train").has_flags and ds.tokenizer["eos_token"] == "<|eot_id|>"  # the config's EOS
    assert not list((tmp_path / "out").glob("*.flags"))
    assert ds.tokenizer_config_file.is_file()


def test_cli_closing_table_counts_instruct_rows(tmp_path, folder, capsys):
    records = [{"prompt": PROMPT, "completion": COMPLETION * 30}, {"prompt": PROMPT, "completion": COMPLETION}] * 4
    src = write_lines(tmp_path / "in.jsonl", records)
    code = main(["prepare", "-i", str(src), "-o", str(tmp_path / "out"), "--tokenizer", str(folder),
                 "--format", "prompt-completion", "--seq-len", "32", "--overflow", "drop", "--val-fraction", "0.25"])
    out = capsys.readouterr().out
    assert code == 0, out
    for row in ("loss tokens", "truncated examples", "dropped: too long", "dropped: no loss"):
        assert row in out
    assert "dropped 4 example(s) longer than 33 tokens (--overflow drop)" in out
