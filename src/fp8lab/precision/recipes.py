"""The recipe registry: a name per precision recipe, what TorchAO config it maps to, and
what hardware it needs. Pure data, no TorchAO import, so the CLI and config can list and
validate recipes without paying for the import.
"""

from __future__ import annotations

from dataclasses import dataclass

from fp8lab.errors import FP8LabError


@dataclass(frozen=True)
class Recipe:
    name: str
    kind: str  # "none" (no conversion), "float8" (Float8Linear) or "mxfp8" (MX weight subclass)
    torchao_recipe: str | None  # Float8LinearRecipeName / MXFP8TrainingRecipe value
    min_capability: tuple[int, int] | None  # CUDA compute capability for the real kernels
    dim_multiple: int  # in/out features must be multiples of this to convert
    summary: str
    hardware: str  # what runs it natively, in words (support.py enforces it)

    @property
    def is_low_precision(self) -> bool:
        return self.kind != "none"

    @property
    def math(self) -> str:
        """What its converted matmuls compute in (fp8lab.gpus.MATH_FIELDS): bf16, fp8 or mxfp8."""
        return {"none": "bf16", "float8": "fp8", "mxfp8": "mxfp8"}[self.kind]


_FP8_HW = "sm_89+ (Ada, Hopper, Blackwell)"

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("bf16", "none", None, None, 1,
               "BF16 autocast, fp32 master weights: the production baseline", "any CUDA GPU with bf16; CPU"),
        # Per-tensor dynamic scales; one cuBLAS FP8 GEMM per matmul. Fastest on H100-class
        # GPUs for large GEMMs and the only one FSDP2 float8 all-gather supports.
        Recipe("fp8-tensorwise", "float8", "tensorwise", (8, 9), 16,
               "FP8 e4m3 fwd / e5m2 grads, one scale per tensor (fastest)", _FP8_HW),
        # One scale per row: an outlier only costs its own row's resolution. Scales are
        # rounded to powers of two; uses the CUTLASS rowwise kernel for the output GEMM. Each
        # operand is cast along its rows and again along its columns (an amax pass, then a
        # transposed write) and the backward GEMMs are rescaled in extra kernels: at N <= 2048
        # that traffic eats most of what the GEMMs save (`fp8lab recipes --why`, perf/roofline.py).
        Recipe("fp8-rowwise", "float8", "rowwise", (8, 9), 16,
               "FP8 e4m3 everywhere, one scale per row (robust to outliers; casts both ways: slower)", _FP8_HW),
        # Rowwise for output and grad_input, but grad_weight in high precision: the most
        # accurate float8 recipe, at the cost of one of three GEMMs.
        Recipe("fp8-rowwise-gw-hp", "float8", "rowwise_with_gw_hp", (8, 9), 16,
               "rowwise FP8 with the weight-gradient GEMM kept in high precision (most accurate)", _FP8_HW),
        # OCP microscaling: e8m0 scale per 32 elements along K; needs Blackwell tensor cores.
        Recipe("mxfp8", "mxfp8", "mxfp8_rceil", (10, 0), 32,
               "MXFP8, one power-of-two scale per 32 elements (Blackwell)",
               "sm_100 (B200, GB200); sm_12x (RTX 50xx) only where a kernel probe passes"),
    )
}


def get_recipe(name: str) -> Recipe:
    """The recipe called `name`; an unknown name is an error listing the known ones."""
    try:
        return RECIPES[name]
    except KeyError:
        raise FP8LabError(f"unknown precision recipe {name!r}; known recipes: {', '.join(RECIPES)}") from None
