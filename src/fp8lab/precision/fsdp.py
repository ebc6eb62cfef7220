"""What a converted model needs around FSDP2 and after each optimizer step.

With `fsdp_float8_all_gather` (tensorwise), FSDP2 gathers each converted weight as FP8, half
the bytes of bf16. Its scale is then computed for all weights at once (one all-reduce of the
amaxes) after each optimizer step, instead of per weight per gather: the post-optimizer hook
(torchtitan's `ModelConverter.post_optimizer_hook`), which the training step calls.
"""

from __future__ import annotations

from torch import nn

from fp8lab.errors import FP8LabError
from fp8lab.precision.convert import ConversionReport


def post_optimizer_hook(model: nn.Module, report: ConversionReport) -> None:
    """After each optimizer step, and whenever weights were (re)loaded: refresh what the
    conversion derives from the weights (FP8 all-gather scales). A no-op otherwise."""
    if report.fsdp_float8_all_gather:
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

        precompute_float8_dynamic_scale_for_fsdp(model)


def check_fp8_gather_shapes(model: nn.Module, report: ConversionReport, world_size: int) -> None:
    """TorchAO 0.18's FP8 all-gather does not pad uneven shards (pytorch/ao#3982): on gloo the
    gather fails, on NCCL it can hang. Refuse up front, naming the layer."""
    for c in report.converted:
        rows = model.get_submodule(c["name"]).weight.shape[0]
        if rows % world_size:
            raise FP8LabError(f"parallel.float8_all_gather: {c['name']} has {rows} output rows, not a multiple of "
                              f"the {world_size} ranks, and TorchAO's FP8 all-gather cannot shard it unevenly; "
                              f"use a rank count that divides {rows}, or --parallel.float8_all_gather=false")


def fp8_gathered_weights(model: nn.Module) -> int:
    """How many parameters FSDP2 gathers in FP8 (shards around TorchAO's weight wrapper)."""
    return sum(type(getattr(p, "_local_tensor", None)).__name__ == "WeightWithDynamicFloat8CastTensor"
               for p in model.parameters())
