"""Low-bit optimizer states (optim.name): every optimizer trains and resumes bit for bit, the
quantized ones keep about a quarter of fp32 AdamW's state bytes, checkpoints hold only plain
tensors that stock DCP loads, a switch of optim.name on resume converts the state (or is refused),
and the 8-bit states work under FSDP2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from fp8lab.config import load_config
from fp8lab.errors import FP8LabError
from fp8lab.precision.plain import is_torchao_subclass
from fp8lab.train.build import build
from fp8lab.train.checkpoint import MANIFEST, _file_manifest, list_complete, load_tensors
from fp8lab.train.logs import read_jsonl
from fp8lab.train.optim import OPTIMIZERS, init_optimizer_state, optimizer_name
from fp8lab.train.optim_state import components, dequantize, state_nbytes
from fp8lab.train.trainer import train
from helpers import REPO, cli_env, trainer_config

RESUME = {"train.steps": 6, "checkpoint.interval": 2}


def _losses(run) -> list[float]:
    return [r["loss"] for r in read_jsonl(run / "metrics.jsonl")]


def _stock_load(ckpt) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, read with stock DCP into plain CPU tensors (no fp8lab, no torchao)."""
    metadata = FileSystemReader(ckpt / "dcp").read_metadata()
    out = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in metadata.state_dict_metadata.items()}
    dcp.load(out, storage_reader=FileSystemReader(ckpt / "dcp"), no_dist=True)
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:  # float8 has no torch.equal
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


@pytest.fixture(scope="module")
def full_runs(tiny_data, tmp_path_factory):
    """An uninterrupted 6-step run per optimizer (checkpoints at 2, 4 and 6)."""
    root = tmp_path_factory.mktemp("lowbit")
    for name in OPTIMIZERS:
        train(trainer_config(tiny_data, **RESUME, **{"optim.name": name}), root / name)
    return root


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_trains_and_resumes_bit_for_bit(name, full_runs, tiny_data, tmp_path):
    full, part = full_runs / name, tmp_path / "part"
    losses = _losses(full)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.15, losses  # it learns (by 0.25 in 6 steps)
    over = {**RESUME, "optim.name": name}
    assert train(trainer_config(tiny_data, **over, **{"debug.stop_at_step": 5}), part) == {"stopped_at": 5}
    train(trainer_config(tiny_data, **over), part)  # from step 4
    assert _losses(part) == losses  # every step's loss, bit for bit
    (step_a, a), (step_b, b) = list_complete(full)[-1], list_complete(part)[-1]
    assert step_a == step_b == 6 and json.loads((b / "state.json").read_text())["optim"] == name
    ta, tb = _stock_load(a), _stock_load(b)
    assert ta.keys() == tb.keys()
    assert all(torch.equal(_bits(ta[k]), _bits(tb[k])) for k in ta)  # final weights and optimizer state


def test_quantized_states_are_a_quarter_of_fp32_adamw_bytes(tiny_data):
    """Summed over the real state tensors (codes, scales, qmaps, the fp32 moments of the tensors
    under 4096 values and the step counters) on the debug preset (3.2M parameters with this data's
    vocabulary), as init_optimizer_state makes them with each optimizer's own constructors: the
    tensors its first step would make (test_the_float_lr... checks that), without an eager 8-bit
    step over 3.2M values (seconds on this CPU). The test model (dim 64) has a third of its
    matrices under the threshold: there 8-bit and FP8 keep 0.36x and 0.32x."""
    per_param = {}
    for name in OPTIMIZERS:
        cfg = load_config(None, {"data.path": str(tiny_data), "data.seq_len": "32", "data.micro_batch_size": "2",
                                 "train.eval_batches": "1", "optim.name": name})
        parts = build(cfg)
        assert optimizer_name(parts.optimizer) == name
        init_optimizer_state(parts.optimizer)
        n = sum(p.numel() for p in parts.model.parameters())
        per_param[name] = state_nbytes(parts.optimizer) / n
        parts.loader.close()
    ratio = {k: v / per_param["adamw"] for k, v in per_param.items()}
    assert 8.0 <= per_param["adamw"] < 8.001  # two fp32 moments (+ a step counter per tensor)
    assert ratio["adamw-bf16"] == pytest.approx(0.5, abs=1e-3)
    assert ratio["adamw-8bit"] <= 0.30 and ratio["adamw-fp8"] <= 0.30, ratio
    assert ratio["adamw-4bit"] <= 0.15, ratio


def test_checkpoints_hold_plain_tensors_that_stock_dcp_loads(full_runs, tiny_data):
    """No tensor subclass reaches DCP; the documented layout dequantizes to the live state."""
    for name in ("adamw-8bit", "adamw-fp8", "adamw-4bit"):
        ckpt = list_complete(full_runs / name)[-1][1]
        metadata = FileSystemReader(ckpt / "dcp").read_metadata()
        assert all(isinstance(m, TensorStorageMetadata) for m in metadata.state_dict_metadata.values())
        held = _stock_load(ckpt)
        w1 = "optim.state.layers.0.feed_forward.w1.weight"  # 128 x 64: quantized
        assert {f"{w1}.exp_avg.codes", f"{w1}.exp_avg.scale"} <= held.keys()
        assert held[f"{w1}.exp_avg.codes"].dtype == (torch.float8_e4m3fn if name == "adamw-fp8" else torch.uint8)
        assert (f"{w1}.exp_avg.qmap" in held) == (name != "adamw-fp8")
        assert held["optim.state.norm.weight.exp_avg"].dtype == torch.float32  # 64 values: not quantized

        parts = build(trainer_config(tiny_data, **{"optim.name": name}))
        assert load_tensors(ckpt, model=parts.model, optimizer=parts.optimizer) == []  # same form: in place
        by_name = dict(parts.model.named_parameters())
        live = parts.optimizer.state[by_name["layers.0.feed_forward.w1.weight"]]
        for key in ("exp_avg", "exp_avg_sq"):
            assert is_torchao_subclass(live[key])
            mine = dequantize(f"{w1}.{key}", held, live[key].shape)
            assert torch.equal(mine, live[key].dequantize()) and mine.abs().sum() > 0
        parts.loader.close()


def _layout(opt) -> dict:
    return {(i, k): {c: (t.shape, t.dtype) for c, t in components(v).items()}
            for i, state in enumerate(opt.state.values()) for k, v in state.items()}


def test_the_float_lr_step_py_sets_is_the_lr_each_step_uses(tiny_data):
    parts = build(trainer_config(tiny_data, **{"optim.name": "adamw-8bit"}))
    params = [p for g in parts.optimizer.param_groups for p in g["params"]]
    other = build(trainer_config(tiny_data, **{"optim.name": "adamw-8bit"}))
    other.loader.close()
    init_optimizer_state(other.optimizer)
    for lr in (0.0, 1e-2):
        before = [p.detach().clone() for p in params]
        for p in params:
            p.grad = torch.ones_like(p)
        for group in parts.optimizer.param_groups:
            group["lr"] = lr  # as step.py does
        parts.optimizer.step()
        moved = [not torch.equal(a, p) for a, p in zip(before, params)]
        assert all(moved) if lr else not any(moved)  # lr 0: weight decay and update both scale by lr
        assert all(float(g["lr"]) == pytest.approx(lr, rel=1e-7) for g in parts.optimizer.param_groups)
    assert _layout(parts.optimizer) == _layout(other.optimizer)  # the first step made what init_optimizer_state makes
    parts.loader.close()


@pytest.mark.parametrize("old,new", [("adamw", "adamw-8bit"), ("adamw-4bit", "adamw"),
                                     ("adamw-8bit", "adamw-fp8"), ("adamw-fp8", "adamw-bf16")])
def test_another_optimizers_state_is_converted_on_load(old, new, full_runs, tiny_data):
    """Each moment becomes the checkpoint's value (dequantized) in the new form: exactly what the new
    optimizer stores for that value (quantized or rounded once, or exact for fp32)."""
    ckpt = list_complete(full_runs / old)[-1][1]
    held = _stock_load(ckpt)
    parts = build(trainer_config(tiny_data, **{"optim.name": new}))
    converted = load_tensors(ckpt, model=parts.model, optimizer=parts.optimizer)
    assert converted  # (the small tensors kept fp32 by both need no conversion)
    opt = parts.optimizer
    for fqn, p in parts.model.named_parameters():
        for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            base = f"optim.state.{fqn}.{key}"
            value, live = dequantize(base, held, p.shape), opt.state[p][key]
            if hasattr(opt, "_new_buffer"):  # what the new optimizer makes of that value
                expected = opt._new_buffer(p, signed)
                expected.copy_(value)
            else:
                expected = value
            if is_torchao_subclass(live):
                assert all(torch.equal(_bits(getattr(live, c)), _bits(getattr(expected, c)))
                           for c in ("codes", "scale")), base
            else:
                assert live.dtype == expected.dtype and torch.equal(live, expected), base
        assert torch.equal(opt.state[p]["step"], held[f"optim.state.{fqn}.step"])
    parts.loader.close()


def test_resuming_with_another_optimizer_converts_and_says_so(full_runs, tiny_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(full_runs / "adamw", run)
    summary = train(trainer_config(tiny_data, **{**RESUME, "train.steps": 8, "optim.name": "adamw-8bit"}), run)
    note = [n for n in summary["notes"] if n.startswith("optim.name")]
    assert len(note) == 1 and "optim.name adamw -> adamw-8bit from step 6" in note[0] and "quantized" in note[0]
    losses = _losses(run)
    assert len(losses) == 8 and losses[:6] == _losses(full_runs / "adamw")
    assert json.loads((list_complete(run)[-1][1] / "state.json").read_text())["optim"] == "adamw-8bit"
    events = [e for e in read_jsonl(run / "events.jsonl") if e["kind"] == "optim-change"]
    assert len(events) == 1 and events[0]["old"] == "adamw" and events[0]["new"] == "adamw-8bit"


def test_a_checkpoint_of_an_unknown_optimizer_is_refused(full_runs, tiny_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(full_runs / "adamw", run)
    ckpt = list_complete(run)[-1][1]
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps({**state, "optim": "lion"}))  # as a newer fp8lab might write
    (ckpt / MANIFEST).write_text(json.dumps(_file_manifest(ckpt)))
    with pytest.raises(FP8LabError, match="optimizer 'lion'.*optim.name=adamw; resume with optim.name=lion"):
        train(trainer_config(tiny_data, **{**RESUME, "train.steps": 8}), run)


FSDP_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
from helpers import trainer_config
from fp8lab.train import dist
from fp8lab.train.trainer import train
data, root = sys.argv[2], sys.argv[3]
over = {"optim.name": "adamw-8bit", "parallel.data_parallel": "fsdp", "train.steps": 5, "checkpoint.interval": 2,
        "data.micro_batch_size": 4, "train.threads": 1}
train(trainer_config(data, **over), root + "/full")
train(trainer_config(data, **over, **{"debug.stop_at_step": 3}), root + "/part")
train(trainer_config(data, **over), root + "/part")
dist.shutdown()
"""


def test_8bit_states_under_fsdp2_resume_bit_for_bit(tiny_data, tmp_path):
    """Two gloo ranks, one launch: an uninterrupted run, and one stopped after step 3 and resumed
    from its sharded step-2 checkpoint. The quantized blocks of the ranks' shards make the global
    tensor's layout (w1's codes 128 x 64 and 32 scales, however many ranks wrote them)."""
    (tmp_path / "fsdp_lowbit.py").write_text(FSDP_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "fsdp_lowbit.py"), str(REPO / "tests"), str(tiny_data), str(tmp_path)]
    proc = subprocess.run(cmd, env=cli_env(tmp_path / "cache") | {"OMP_NUM_THREADS": "1"}, cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    full, part = tmp_path / "full", tmp_path / "part"
    assert len(_losses(full)) == 5 and _losses(part) == _losses(full)
    ta, tb = _stock_load(list_complete(full)[-1][1]), _stock_load(list_complete(part)[-1][1])
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    w1 = "optim.state.layers.0.feed_forward.w1.weight.exp_avg"
    assert ta[f"{w1}.codes"].shape == (128, 64) and ta[f"{w1}.scale"].shape == (32,)
    assert ta["optim.state.layers.0.attention.wq.weight.exp_avg"].dtype == torch.float32  # 32 x 64 a shard
