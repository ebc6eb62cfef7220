"""A kernel probe: run one tiny converted linear forward and backward with the real kernels.

Where the compute capability alone does not settle whether a recipe runs (MXFP8 on sm_12x,
RTX 50xx, works in some releases and operand layouts only; cuBLAS has rejected rowwise scaled
matmuls there), running it is the only honest answer.
"""

from __future__ import annotations

import functools

import torch

from fp8lab.precision.recipes import get_recipe
from fp8lab.precision.swap import swap_linears


@functools.cache
def probe_recipe(recipe_name: str, device_index: int) -> str | None:
    """None when `recipe_name` runs on CUDA device `device_index`, else the error in one line."""
    device = torch.device("cuda", device_index)
    try:
        lin = torch.nn.Sequential(torch.nn.Linear(256, 256, bias=False)).to(device)
        swap_linears(lin, get_recipe(recipe_name), names={"0"}, emulated=False)
        x = torch.randn(64, 256, device=device, requires_grad=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            lin(x).float().sum().backward()
        torch.cuda.synchronize(device)
        return None
    except Exception as e:  # any failure means "does not run here"; the text says why
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
