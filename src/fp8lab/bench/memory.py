"""The memory model (perf/memory.py) applied to a built run, and measured beside it: what
`fp8lab bench` prints next to its measured peak, and what benchmarks/memory.py and the tests
compare on real training steps."""

from __future__ import annotations

from fp8lab.config import JobConfig
from fp8lab.perf.memory import MemoryPlan, measure_peak, predict_memory
from fp8lab.train.build import RunParts


def converted_groups(parts: RunParts) -> set[str]:
    """The converted linears as the roofline's groups: 'layers.3.attention.wq' -> 'attention.wq'."""
    return {c["name"].split(".", 2)[2] if c["name"].startswith("layers.") else c["name"]
            for c in parts.report.converted}


def predict_for(parts: RunParts, cfg: JobConfig) -> MemoryPlan:
    """The predicted peak of one training step of this run, per rank."""
    return predict_memory(
        parts.model_args, tokens=cfg.data.micro_batch_size * cfg.data.seq_len, recipe=cfg.precision.recipe,
        converted=converted_groups(parts), optimizer=cfg.optim.name,
        activation_checkpoint=cfg.train.activation_checkpoint, compute_bytes=parts.compute_dtype.itemsize,
        num_gpus=parts.dist.world_size if cfg.parallel.data_parallel == "fsdp" else 1,
        loss_chunk_tokens=cfg.train.loss_chunk_tokens, emulated=parts.report.emulated, compiled=parts.compiled,
        loss_head=parts.loss_head, head_compiled=parts.loss_grad_fn is not None)


def measure_for(parts: RunParts, cfg: JobConfig) -> dict[str, float]:
    """Two training steps of this run (the first creates the optimizer's state, as in training);
    the live tensor bytes at the second one's peak, by part (perf.memory.measure_peak)."""
    from fp8lab.train.step import train_step

    train_step(parts, cfg, 1, [parts.loader.next_batch() for _ in range(cfg.train.grad_accum_steps)])
    batches = [parts.loader.next_batch() for _ in range(cfg.train.grad_accum_steps)]
    return measure_peak(lambda: train_step(parts, cfg, 2, batches), device=str(parts.device))
