"""The optimizers of `optim.name`, all AdamW with decay / no-decay groups, and their state made
explicit for checkpoints.

- adamw: torch.optim.AdamW, fp32 moments (fused kernel): 8 bytes of state per parameter.
- adamw-bf16: both moments stored in bf16 (4 bytes), the update computed in fp32.
- adamw-8bit / adamw-fp8 / adamw-4bit: TorchAO's block-quantized moments (torchao.optim
  AdamW8bit, AdamWFp8, AdamW4bit; FP8-LM's memory saving): 8-bit dynamic-map codes or FP8 E4M3
  codes with one fp32 scale per 256 values, or packed 4-bit codes with one scale per 128.

The four TorchAO-based ones share torchao's per-parameter update (`single_param_adam`: the
moments are dequantized, updated and re-quantized; the arithmetic is fp32) and differ only in
how a moment is stored. torchao's AdamW has no bf16-state option (its `_AdamW` keeps the
parameter's dtype, fp32 here), so adamw-bf16 is `_AdamW` with bf16 state buffers: torch's own
AdamW needs the moments in the parameter's dtype (its foreach and fused kernels group tensors by
dtype), and this way adamw-bf16 shares the low-bit optimizers' update. bf16 rounds to nearest: a
change under half a bf16 step (2**-9 of the moment) is lost, so with beta2 = 0.999 the second
moment can stall where 0.95 (our default) moves.

Which states are quantized: as in torchao (after bitsandbytes) only tensors of at least 4096
values that divide into whole blocks; smaller ones (norm gains, small matrices) keep fp32 moments.
Under FSDP2 the rule applies to each rank's shard, and we quantize only where every rank's shard
qualifies alike (first dimension divisible by the rank count), so a checkpoint's layout is the same on
every rank and its quantized blocks are the global tensor's (see optim_state.py).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from fp8lab.config import OptimConfig
from fp8lab.errors import FP8LabError
from fp8lab.precision.plain import to_plain

OPTIMIZERS = ("adamw", "adamw-bf16", "adamw-8bit", "adamw-fp8", "adamw-4bit")
MIN_QUANTIZED_NUMEL = 4096  # torchao's threshold (bitsandbytes'): smaller states stay fp32


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Matrices (linears, embeddings) decay; vectors (norm gains) do not: decaying a norm's
    gain toward zero fights the normalisation (nanoGPT, torchtitan)."""
    seen: set[int] = set()
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() already yields a tied weight once
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    if cfg.name != "adamw":
        # The step is torch.compile'd on CUDA, as torchao does; on CPU it runs eagerly: inductor
        # compiles it once per parameter shape, 20-75 s before the debug model's first step on a
        # 2-core machine (then ~7x faster than eager for 8-bit: CPU runs are tests, not training).
        return _torchao_classes()[cfg.name](groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                            compiled=device.type == "cuda")
    # fused AdamW is one kernel for all parameters, on CUDA and on CPU (where it is also ~4x
    # faster than torch's foreach default: 8.4M parameters, 7-8 vs 26-35 ms on 2 cores), and it skips
    # a step on the device (found_inf: train.deferred_sync). Tensor subclasses (MXFP8 weights)
    # are not supported by the fused kernel: torch then picks.
    def local(p):  # FSDP2 shards are DTensors around plain tensors, which fused AdamW takes
        return p._local_tensor if hasattr(p, "_local_tensor") else p.data

    params = [p for g in groups for p in g["params"]]
    plain = all(type(local(p)) is torch.Tensor for p in params)
    if cfg.fused == "on" and not plain:
        raise FP8LabError("optim.fused=on: fused AdamW cannot update this recipe's weight tensor subclasses "
                          "(MXFP8); set optim.fused=auto or off")
    fused = plain and cfg.fused != "off"
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
        fused=fused or None,
    )


def optimizer_name(opt: torch.optim.Optimizer) -> str:
    """The optim.name `opt` was built for."""
    return getattr(opt, "NAME", "adamw")


def init_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Create the per-parameter state (zeros) before the first step, so a checkpoint can be
    loaded into it in place. Mirrors each optimizer's own lazy initialisation: a scalar `step`
    (on the parameter's device when torch's AdamW is fused), and moments shaped like the
    parameter: fp32 for torch's AdamW, the TorchAO optimizer's own buffers (quantized or not)."""
    new_buffer = getattr(opt, "_new_buffer", None)  # TorchAO's
    for group in opt.param_groups:
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            state = opt.state[p]
            if state:
                continue
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
            if new_buffer is not None:
                state["exp_avg"], state["exp_avg_sq"] = new_buffer(p, True), new_buffer(p, False)
            else:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


@functools.cache
def _torchao_classes() -> dict[str, type]:
    """optim.name -> class; torchao is imported only when one is built (reading a checkpoint
    never needs it)."""
    from torch.distributed.tensor import DTensor, Shard
    from torchao.optim import AdamW4bit, AdamW8bit, AdamWFp8, _AdamW
    from torchao.optim.adam import single_param_adam

    class TorchAOAdamW:
        """What we change in torchao's optimizers (a mixin before the torchao class)."""
        NAME = ""
        QUANTIZED = True
        STATE_DTYPE = torch.float32  # of the states that are not quantized

        def __init__(self, params, *, compiled: bool, **kwargs):
            super().__init__(params, **kwargs)  # torchao's defaults: block 256 (128 for 4-bit), no amsgrad
            self.compiled = compiled

        def _quantized(self, p: torch.Tensor) -> bool:
            if not self.QUANTIZED:
                return False
            n = p.numel()
            if isinstance(p, DTensor):
                ranks = p.device_mesh.size()
                if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),) or p.shape[0] % ranks:
                    return False  # shards differ in size: some would be quantized and others not
                n //= ranks
            return n >= MIN_QUANTIZED_NUMEL and n % self.block_size == 0

        def _new_buffer(self, p: torch.Tensor, signed: bool) -> torch.Tensor:
            # torchao's, with the eligibility rule above and plain zeros even for a weight subclass.
            local = to_plain(p._local_tensor if isinstance(p, DTensor) else p)
            if self._quantized(p):
                out = self._subclass_zeros(local, signed, self.block_size)
            else:
                out = torch.zeros(local.shape, dtype=self.STATE_DTYPE, device=local.device)
            if isinstance(p, DTensor):
                out = DTensor.from_local(out, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                         stride=p.stride())
            return out

        @torch.no_grad()
        def step(self, closure=None):
            """torchao's step, taking the Python-float lr step.py sets each step (torchao keeps
            lr as a tensor, so a new value is no recompile: fp32, as torchao stores it), eager
            unless `compiled`."""
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            update = torch.compile(single_param_adam, fullgraph=True, dynamic=False) if self.compiled \
                else single_param_adam
            for group in self.param_groups:
                if not isinstance(group["lr"], torch.Tensor):
                    group["lr"] = torch.tensor(group["lr"], dtype=torch.float32)
            with torch._dynamo.utils.disable_cache_limit():  # one graph per parameter shape (torchao's note)
                for group in self.param_groups:
                    for p in group["params"]:
                        if p.grad is None:
                            continue
                        state = self.state[p]
                        if not state:
                            state["step"] = torch.tensor(0.0)
                            state["exp_avg"] = self._new_buffer(p, True)
                            state["exp_avg_sq"] = self._new_buffer(p, False)
                        state["step"] += 1
                        # The high-precision tensor inside a TorchAO weight subclass, updated in place.
                        update(to_plain(p.detach()), p.grad, state["step"], state["exp_avg"], state["exp_avg_sq"],
                               None, group["lr"], group["betas"][0], group["betas"][1], group["weight_decay"],
                               group["eps"], True, False)
            return loss

    class AdamWBf16(TorchAOAdamW, _AdamW):
        NAME, QUANTIZED, STATE_DTYPE = "adamw-bf16", False, torch.bfloat16

    class AdamW8bitStates(TorchAOAdamW, AdamW8bit):
        NAME = "adamw-8bit"

    class AdamWFp8States(TorchAOAdamW, AdamWFp8):
        NAME = "adamw-fp8"

    class AdamW4bitStates(TorchAOAdamW, AdamW4bit):
        NAME = "adamw-4bit"

    return {c.NAME: c for c in (AdamWBf16, AdamW8bitStates, AdamWFp8States, AdamW4bitStates)}
