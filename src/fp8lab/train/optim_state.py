"""Optimizer state as plain tensors for checkpoints, and loading a checkpoint's state into an
optimizer that stores it in another form (a switch of optim.name on resume).

Every state is saved as plain tensors (no tensor subclass reaches DCP, so a checkpoint loads
without torchao), under `optim.state.<fqn>.<key>` plus, for a quantized TorchAO moment, the
name of each component:

    <key>          plain moment (fp32; bf16 for adamw-bf16), and `step` (fp32 scalar)
    <key>.codes    8-bit: uint8 dynamic-map codes shaped like the parameter; fp8: float8_e4m3fn codes
                   shaped like the parameter; 4-bit: uint8, two codes per byte (high nibble first), flat
    <key>.scale    fp32, one per block of the flattened parameter (256 values; 128 for 4-bit)
    <key>.qmap     fp32 code -> value table of 8-bit (256) and 4-bit (16) codes

A moment is `qmap[codes]` (fp8: `codes.float()`) times its block's scale (`dequantize` below).
Under FSDP2 the codes shaped like the parameter are sharded like it, the flat components are
sharded along their one dimension and the qmap is replicated: optim.py quantizes only shards of
equal size, so the flat components of the ranks put together are the global tensor's.

Loading writes into the live tensors in place where the checkpoint holds the live form (the same
components, shapes and dtypes): bit for bit. Otherwise each moment is dequantized to fp32 and
copied into the live one, which quantizes (or rounds to bf16) it as it does after every step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.distributed.tensor import DTensor, Shard

from fp8lab.errors import FP8LabError
from fp8lab.precision.plain import is_torchao_subclass, to_plain
from fp8lab.train.optim import optimizer_name

PREFIX = "optim.state."


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def _flat_shard(local: torch.Tensor, like: DTensor) -> DTensor:
    """A flat component of a shard as a 1-D DTensor: the ranks' equal pieces, in rank order."""
    n = local.numel() * like.device_mesh.size()
    return DTensor.from_local(local, like.device_mesh, [Shard(0)], run_check=False, shape=(n,), stride=(1,))


def components(value: torch.Tensor) -> dict[str, torch.Tensor]:
    """{name suffix: plain tensor (or DTensor around one) sharing storage with `value`}: {"": value}
    for a plain state, {".codes": ..., ".scale": ..., ".qmap": ...} for a quantized one."""
    local = _local(value)
    if not is_torchao_subclass(local):
        return {"": to_plain(value)}
    names, _ = local.__tensor_flatten__()
    out = {}
    for name in names:
        part = getattr(local, name)
        if isinstance(value, DTensor) and name != "qmap":  # the qmap is the same everywhere
            if part.shape == local.shape:
                part = DTensor.from_local(part, value.device_mesh, value.placements, run_check=False,
                                          shape=value.shape, stride=value.stride())
            else:
                part = _flat_shard(part, value)
        out[f".{name}"] = part
    return out


def _named_states(optimizer: torch.optim.Optimizer, names: dict[int, str]):
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state[p].items():
                yield f"{PREFIX}{names[id(p)]}.{key}", value


def state_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, torch.Tensor]:
    """The optimizer's state as {checkpoint name: plain tensor sharing storage}; `names` maps a
    parameter's id to its fqn."""
    return {base + suffix: t for base, value in _named_states(optimizer, names)
            for suffix, t in components(value).items()}


def state_nbytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state on this rank, summed over the real tensors (every
    component of a quantized state, qmap and scales included, and the step counters)."""
    return sum(_local(t).nbytes for state in optimizer.state.values() for value in state.values()
               for t in components(value).values())


def load_targets(optimizer: torch.optim.Optimizer, names: dict[int, str], saved: dict,
                 ) -> tuple[dict[str, torch.Tensor], Callable[[], list[str]]]:
    """DCP load targets for the optimizer's state given the checkpoint's metadata entries `saved`
    ({name: TensorStorageMetadata}), and a function to call once DCP has filled them: it converts
    the states the checkpoint holds in another form and returns their names."""
    targets: dict[str, torch.Tensor] = {}
    pending = []
    for base, value in _named_states(optimizer, names):
        live = {base + s: t for s, t in components(value).items()}
        held = {k: m for k, m in saved.items() if k == base or k.startswith(base + ".")}
        same = held.keys() == live.keys() and all(
            tuple(held[k].size) == tuple(t.shape) and held[k].properties.dtype == t.dtype for k, t in live.items())
        if same or not held:  # nothing held: DCP reports the missing name
            targets |= live
            continue
        temp = {k: _empty_for(k, m, value) for k, m in held.items()}
        targets |= temp
        pending.append((base, value, temp))

    def finish() -> list[str]:
        for base, value, temp in pending:
            _local(value).copy_(dequantize(base, {k: _local(t) for k, t in temp.items()}, _local(value).shape))
        return [base for base, _, _ in pending]

    return targets, finish


def _empty_for(name: str, meta, live: torch.Tensor) -> torch.Tensor:
    """A tensor to load checkpoint entry `name` (global size and dtype in `meta`) into, sharded
    as the live state `live` is."""
    size, dtype = tuple(meta.size), meta.properties.dtype
    local = _local(live)
    if not isinstance(live, DTensor) or name.endswith(".qmap"):
        return torch.empty(size, dtype=dtype, device=local.device)
    if size == tuple(live.shape):  # sharded as the parameter
        return DTensor.from_local(torch.empty(local.shape, dtype=dtype, device=local.device), live.device_mesh,
                                  live.placements, run_check=False, shape=live.shape, stride=live.stride())
    ranks = live.device_mesh.size()
    if len(size) != 1 or size[0] % ranks:
        raise FP8LabError(f"checkpoint entry {name} ({list(size)}, {dtype}) cannot be split over {ranks} ranks "
                          "to convert it into this run's optimizer state; resume with the optim.name it was "
                          "written with")
    return _flat_shard(torch.empty(size[0] // ranks, dtype=dtype, device=local.device), live)


def dequantize(base: str, held: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """The fp32 value of a state held as `held` ({checkpoint name: plain tensor}), shaped `shape`."""
    if base in held:
        return held[base].float().reshape(shape)
    codes, scale, qmap = held.get(base + ".codes"), held.get(base + ".scale"), held.get(base + ".qmap")
    if codes is None or scale is None:
        raise FP8LabError(f"checkpoint holds {sorted(held)}: not an optimizer state layout fp8lab knows")
    blocks = scale.numel()
    if codes.dtype == torch.float8_e4m3fn:
        values = codes.float()
    elif qmap is not None and qmap.numel() == 256 and codes.numel() == shape.numel():
        values = qmap[codes.long()]
    elif qmap is not None and qmap.numel() == 16 and codes.numel() * 2 == shape.numel():
        values = qmap[torch.stack([codes >> 4, codes & 0b1111], dim=-1).long()]
    else:
        raise FP8LabError(f"checkpoint holds {base} as codes {codes.dtype} {list(codes.shape)} with "
                          f"{'no qmap' if qmap is None else f'a {qmap.numel()}-entry qmap'}: not a layout fp8lab knows")
    return (values.reshape(blocks, -1) * scale.reshape(-1, 1)).reshape(shape)


# How each optim.name stores a moment.
_FORMS = {"adamw": "fp32", "adamw-bf16": "bf16", "adamw-8bit": "8-bit blocks", "adamw-fp8": "FP8 E4M3 blocks",
          "adamw-4bit": "4-bit blocks"}


def check_switch(path, saved: str, optimizer: torch.optim.Optimizer) -> None:
    """Refuse, before loading, a checkpoint (written with optim.name `saved`) whose optimizer state
    this fp8lab cannot convert into `optimizer`'s: every pair of the five optim.name values
    converts; any other name (a newer fp8lab's) does not."""
    now = optimizer_name(optimizer)
    if saved != now and (not isinstance(saved, str) or saved not in _FORMS):
        raise FP8LabError(f"checkpoint {path} holds the state of optimizer {saved!r}, which this fp8lab cannot "
                          f"convert to optim.name={now}; resume with optim.name={saved} and the fp8lab that wrote it, "
                          "or start a new --run-dir")


def switch_message(saved: str, optimizer: torch.optim.Optimizer, converted: list[str], step: int) -> str | None:
    """One line for a resume whose checkpoint (written with optim.name `saved`) had the optimizer
    states `converted` (names) converted into `optimizer`'s form; None when none was."""
    if not converted:
        return None
    now = optimizer_name(optimizer)
    total = sum(1 for state in optimizer.state.values() for key in state if key != "step")
    if saved == now:  # the same optimizer laid out otherwise (another sharding)
        return (f"optimizer state: {len(converted)} of {total} tensors were saved in another layout and converted "
                f"(through fp32) into this run's from step {step}")
    was, new = _FORMS[saved], _FORMS[now]
    how = ("dequantized: exact, but the precision lost before does not come back" if now == "adamw" else
           "rounded to nearest: lossy, once" if now == "adamw-bf16" else
           "quantized: lossy, once" if saved in ("adamw", "adamw-bf16") else "re-quantized: lossy, once")
    return (f"optim.name {saved} -> {now} from step {step}: {len(converted)} of {total} optimizer state tensors "
            f"converted from {was} to {new} ({how}); the others were already in the new form")
