"""Peak rates of the GPUs fp8lab knows: the MFU denominator and the FP8 advisor's inputs.

Every rate is DENSE (no 2:4 sparsity) TFLOP/s. Datasheets usually print the sparse figure
with a footnote ("specifications 1/2 lower without sparsity"); those were halved here.

* ``bf16_dense_tflops``: BF16 inputs, FP32 accumulate, the rate a BF16 training matmul runs at.
  The trainer divides by this for MFU for *every* recipe, so BF16 and FP8 runs share one ceiling.
* ``fp8_fp32acc_tflops``: FP8 (e4m3/e5m2) inputs, FP32 accumulate, what torch._scaled_mm uses.
* ``fp8_fp16acc_tflops``: FP8 with FP16 accumulate, only where the vendor lists a different rate
  (GeForce cards run FP32 accumulate at half rate; Hopper and datacenter Blackwell do not).
* ``mxfp8_tflops``: FP8 with hardware block scales (OCP MX, 32-element E8M0 scales). Blackwell only.

Where sources disagree, the field holds the vendor figure and ``alternatives`` holds the other
value with its source, so the advisor can choose and a reader can see why numbers look odd.
Sources are the vendor documents named in ``sources``; where only a faithful third-party
reproduction of the table could be read, that is named too. No number here was derived
from another number except sparse -> dense halving.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from fp8lab.errors import FP8LabError

# --- citations shared by several entries -------------------------------------------------
ADA_WP = ("NVIDIA Ada GPU Architecture whitepaper v2.1, Appendix A, GeForce RTX 4090 "
          "(dense/sparse pairs; FP8-FP32acc corrected to 330.3 in v2.02) "
          "https://images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf")
RTX_BW_WP = ("NVIDIA RTX Blackwell GPU Architecture whitepaper, Appendix, GeForce RTX 5090 "
             "https://images.nvidia.com/aem-dam/Solutions/geforce/blackwell/nvidia-rtx-blackwell-gpu-architecture.pdf "
             "(tensor figures read via the 'Spec' column of main-horse.github.io/posts/5090-mm-perf)")
MAIN_HORSE = ("main-horse, 'Things I learned digging into 5090 perf' (mmapeak, register-resident "
              "mma.sync microbenchmark) https://main-horse.github.io/posts/5090-mm-perf")
A100_DS = ("NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM column) https://www.nvidia.com/content/"
           "dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf")
H100_WP = ("NVIDIA H100 Tensor Core GPU Architecture whitepaper, A100 vs H100 comparison table "
           "https://resources.nvidia.com/en-us-hopper-architecture/nvidia-h100-tensor-c "
           "(SXM5 dense values as reproduced at glennklockwood.com/garden/processors/h100)")
H100_DS = ("NVIDIA H100 Tensor Core GPU datasheet, 'shown with sparsity' figures halved "
           "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet")
H200_DS = ("NVIDIA H200 Tensor Core GPU product page / datasheet (sparse figures halved; compute "
           "identical to H100 SXM) https://www.nvidia.com/en-us/data-center/h200/")
BW_TABLE = ("NVIDIA 'GB200 NVL72 | HGX B200' spec table, Individual Blackwell GPU Specifications "
            "(footnote: with sparsity; halved here) https://www.nvidia.com/en-us/data-center/gb200-nvl72/ "
            "(as reproduced at zdszero.github.io/Computer/Artificial_Intelligence/Hardware.html)")
BW_MX = ("MXFP8 not listed separately by NVIDIA; datacenter Blackwell runs block-scaled FP8 natively "
         "(Transformer Engine MXFP8 docs, https://nvidia.github.io/TransformerEngine/features/"
         "low_precision_training/mxfp8/mxfp8.html), so the FP8/FP6 row is used")
MI300X_DS = ("AMD Instinct MI300X product page / data sheet (Peak BF16 1307.4, Peak FP8 2614.9 dense) "
             "https://www.amd.com/en/products/accelerators/instinct/mi300/mi300x.html")
CC_DOC = "CUDA C Programming Guide, compute capabilities https://docs.nvidia.com/cuda/cuda-c-programming-guide/"


@dataclass(frozen=True)
class GPUSpec:
    name: str
    aliases: tuple[str, ...]  # whole-word substrings of torch.cuda.get_device_name()
    compute_capability: tuple[int, int] | None  # None for AMD (ROCm reports gfx targets)
    bf16_dense_tflops: float
    fp8_fp32acc_tflops: float | None
    fp8_fp16acc_tflops: float | None
    mxfp8_tflops: float | None
    mem_bandwidth_gbs: float
    mem_gb: float
    sources: dict[str, str]
    alternatives: dict[str, tuple[float, str]] = field(default_factory=dict)


GPUS: dict[str, GPUSpec] = {
    "rtx4090": GPUSpec(
        name="NVIDIA GeForce RTX 4090", aliases=("RTX 4090",), compute_capability=(8, 9),
        # GeForce: FP32 accumulate runs at half the FP16-accumulate rate (165.2 vs 330.3 for
        # BF16/FP16; 330.3 vs 660.6 for FP8). Training uses FP32 accumulate.
        bf16_dense_tflops=165.2, fp8_fp32acc_tflops=330.3, fp8_fp16acc_tflops=660.6,
        mxfp8_tflops=None, mem_bandwidth_gbs=1008.0, mem_gb=24.0,
        sources={"compute_capability": CC_DOC, "bf16_dense_tflops": ADA_WP,
                 "fp8_fp32acc_tflops": ADA_WP, "fp8_fp16acc_tflops": ADA_WP,
                 "mem_bandwidth_gbs": ADA_WP, "mem_gb": ADA_WP},
    ),
    "rtx5090": GPUSpec(
        name="NVIDIA GeForce RTX 5090", aliases=("RTX 5090",), compute_capability=(12, 0),
        # The whitepaper keeps the GeForce half-rate rule: BF16-FP32acc 209.5, FP8-FP32acc 419,
        # FP8-FP16acc 838, and lists no separate MXFP8 row (main-horse maps it to 419).
        # main-horse's mma.sync microbenchmark measured BF16-FP32acc ~370.6 (1.77x the
        # whitepaper), FP8-FP32acc ~370.0 and MXFP8 ~737.1, i.e. the block-scaled path is not
        # throttled. The field keeps the whitepaper figure because it is the vendor's published
        # peak and what other tools use; consequence: measured BF16 MFU on a 5090 can exceed
        # 100%, and FP8 (per-tensor, FP32acc) gains little over BF16 while MXFP8 may double it.
        # The advisor uses ``alternatives`` for this card (ADVISOR_RATES says why), and the
        # card's own measured rates once `fp8lab doctor` has run on it (perf/measure.py).
        bf16_dense_tflops=209.5, fp8_fp32acc_tflops=419.0, fp8_fp16acc_tflops=838.0,
        mxfp8_tflops=419.0, mem_bandwidth_gbs=1792.0, mem_gb=32.0,
        sources={"compute_capability": CC_DOC, "bf16_dense_tflops": RTX_BW_WP,
                 "fp8_fp32acc_tflops": RTX_BW_WP, "fp8_fp16acc_tflops": RTX_BW_WP,
                 "mxfp8_tflops": RTX_BW_WP + "; MXFP8 not a separate whitepaper row",
                 "mem_bandwidth_gbs": RTX_BW_WP, "mem_gb": RTX_BW_WP},
        alternatives={"bf16_dense_tflops": (370.6, MAIN_HORSE),
                      "fp8_fp32acc_tflops": (370.0, MAIN_HORSE),
                      "fp8_fp16acc_tflops": (737.1, MAIN_HORSE),
                      "mxfp8_tflops": (737.1, MAIN_HORSE)},
    ),
    "a100": GPUSpec(
        name="NVIDIA A100 SXM4 80GB", aliases=("A100",), compute_capability=(8, 0),
        # Ampere has no FP8 tensor cores; torchao float8 training cannot speed it up.
        bf16_dense_tflops=312.0, fp8_fp32acc_tflops=None, fp8_fp16acc_tflops=None,
        mxfp8_tflops=None, mem_bandwidth_gbs=2039.0, mem_gb=80.0,
        sources={"compute_capability": CC_DOC, "bf16_dense_tflops": A100_DS,
                 "mem_bandwidth_gbs": A100_DS, "mem_gb": A100_DS},
    ),
    "h100-sxm": GPUSpec(
        name="NVIDIA H100 SXM5 80GB", aliases=("H100",), compute_capability=(9, 0),
        # Hopper lists the same FP8 rate for FP16 and FP32 accumulate, so fp16acc is None.
        bf16_dense_tflops=989.4, fp8_fp32acc_tflops=1978.9, fp8_fp16acc_tflops=None,
        mxfp8_tflops=None, mem_bandwidth_gbs=3350.0, mem_gb=80.0,
        sources={"compute_capability": CC_DOC, "bf16_dense_tflops": H100_WP,
                 "fp8_fp32acc_tflops": H100_WP, "mem_bandwidth_gbs": H100_DS, "mem_gb": H100_DS},
    ),
    "h100-pcie": GPUSpec(
        name="NVIDIA H100 PCIe 80GB", aliases=("H100 PCIe",), compute_capability=(9, 0),
        # Whitepaper: BF16 756/1513, FP8 1513/3026 (dense/sparse); the datasheet's 1,513
        # sparse BF16 halves to 756.5. 756 kept (whitepaper, also torchtitan's MFU constant).
        bf16_dense_tflops=756.0, fp8_fp32acc_tflops=1513.0, fp8_fp16acc_tflops=None,
        mxfp8_tflops=None, mem_bandwidth_gbs=2000.0, mem_gb=80.0,
        sources={"compute_capability": CC_DOC, "bf16_dense_tflops": H100_WP,
                 "fp8_fp32acc_tflops": H100_DS, "mem_bandwidth_gbs": H100_DS, "mem_gb": H100_DS},
    ),
    "h200": GPUSpec(
        name="NVIDIA H200 SXM 141GB", aliases=("H200",), compute_capability=(9, 0),
        # Same GH100 compute as H100 SXM (datasheet 1,979 / 3,958 sparse); only memory differs.
        bf16_dense_tflops=989.4, fp8_fp32acc_tflops=1978.9, fp8_fp16acc_tflops=None,
        mxfp8_tflops=None, mem_bandwidth_gbs=4800.0, mem_gb=141.0,
        sources={"compute_capability": CC_DOC, "bf16_dense_tflops": H200_DS + "; " + H100_WP,
                 "fp8_fp32acc_tflops": H200_DS + "; " + H100_WP,
                 "mem_bandwidth_gbs": H200_DS, "mem_gb": H200_DS},
    ),
    "b200": GPUSpec(
        name="NVIDIA B200 (HGX, 1000 W)", aliases=("B200",), compute_capability=(10, 0),
        bf16_dense_tflops=2250.0, fp8_fp32acc_tflops=4500.0, fp8_fp16acc_tflops=None,
        mxfp8_tflops=4500.0, mem_bandwidth_gbs=7700.0, mem_gb=180.0,
        sources={"compute_capability": CC_DOC, "bf16_dense_tflops": BW_TABLE,
                 "fp8_fp32acc_tflops": BW_TABLE, "mxfp8_tflops": BW_MX,
                 "mem_bandwidth_gbs": BW_TABLE, "mem_gb": BW_TABLE},
        # Launch material said 192 GB / 8 TB/s; shipping HGX B200 exposes 180 GB / 7.7 TB/s.
        alternatives={"mem_gb": (192.0, "glennklockwood.com/garden/processors/B200 (launch spec)"),
                      "mem_bandwidth_gbs": (8000.0, "glennklockwood.com/garden/processors/B200")},
    ),
    "gb200": GPUSpec(
        name="NVIDIA GB200 (per Blackwell GPU, 1200 W)", aliases=("GB200",),
        compute_capability=(10, 0),
        # Per GPU of a GB200 superchip / NVL72 rack (rack totals / 72). Higher power limit than
        # HGX B200, hence 2.5 vs 2.25 PFLOP/s BF16.
        bf16_dense_tflops=2500.0, fp8_fp32acc_tflops=5000.0, fp8_fp16acc_tflops=None,
        mxfp8_tflops=5000.0, mem_bandwidth_gbs=8000.0, mem_gb=186.0,
        sources={"compute_capability": CC_DOC, "bf16_dense_tflops": BW_TABLE,
                 "fp8_fp32acc_tflops": BW_TABLE, "mxfp8_tflops": BW_MX,
                 "mem_bandwidth_gbs": BW_TABLE, "mem_gb": BW_TABLE},
        alternatives={
            "bf16_dense_tflops": (2250.0, "verda.com/blog/gb300-nvl72-architecture (per-GPU GB200 column)"),
            "fp8_fp32acc_tflops": (4500.0, "verda.com/blog/gb300-nvl72-architecture (per-GPU GB200 column)"),
            "mem_gb": (192.0, "gpu.blog/gpus/nvidia-gb200-nvl72 (launch spec, 384 GB per superchip)")},
    ),
    "mi300x": GPUSpec(
        name="AMD Instinct MI300X", aliases=("MI300X",), compute_capability=None,
        # CDNA3 FP8 is the FNUZ variant (e4m3fnuz); no MX formats before MI350 (CDNA4).
        bf16_dense_tflops=1307.4, fp8_fp32acc_tflops=2614.9, fp8_fp16acc_tflops=None,
        mxfp8_tflops=None, mem_bandwidth_gbs=5300.0, mem_gb=192.0,
        sources={"bf16_dense_tflops": MI300X_DS, "fp8_fp32acc_tflops": MI300X_DS,
                 "mem_bandwidth_gbs": MI300X_DS, "mem_gb": MI300X_DS},
        # torchtitan's MFU constant rounds this to 1300 (torchtitan/tools/utils.py).
    ),
}

# Where `fp8lab advise` takes each GPU's rates from unless told otherwise (--rates), and why.
# "vendor": the fields above; "microbench": the fields' ``alternatives``. A measurement by
# `fp8lab doctor` on the card itself beats both (advise --rates auto picks it when cached).
ADVISOR_RATES: dict[str, str] = {gpu_id: "vendor" for gpu_id in GPUS} | {"rtx5090": "microbench"}
ADVISOR_RATES_WHY: dict[str, str] = {
    "rtx5090": (
        "main-horse's mmapeak microbenchmark rather than NVIDIA's whitepaper: the only source that "
        "measures BF16, FP8-fp32acc and MXFP8 on the card with one method, and the whitepaper's BF16 "
        "figure (209.5) is below every measurement (370.6 in mmapeak; ~235 for torch.matmul, see "
        "MEASURED_GEMMS). Caveat: mmapeak runs on zeros in registers, and a real FP8 GEMM reached "
        "388.9 TFLOP/s (MEASURED_GEMMS), above mmapeak's FP8-fp32acc 370: tensorwise may gain more "
        "than predicted. `fp8lab doctor` on the card measures its own rates; advise then uses them"),
}

# Whole-GEMM measurements on random data that bear on the disagreement above (TFLOP/s). They
# are achieved rates of one kernel at one shape, not peaks, so they do not fill the fields.
MEASURED_GEMMS: dict[str, tuple[tuple[str, float, str], ...]] = {
    "rtx5090": (
        ("bf16 torch.matmul 8192x8192, random, torch 2.7/2.8", 234.9,
         "github.com/zzc0721/torch-performance-test-data issues #96 (234.89) and #124 (234.66)"),
        ("fp8 e4m3 rowwise torch._scaled_mm (CUTLASS 3.x), 4096^3, randn", 388.9,
         "github.com/pytorch/pytorch/pull/155991 (sm_120 rowwise scaled-mm, benchmark table)"),
    ),
}

# Words that, next to an alias, mean a different product whose rates differ: the H100/H200
# NVL and PCIe boards run lower clocks; the RTX "D" China variants and laptop parts have fewer
# units or capped AI rates; A100 PCIe/40GB differ in memory. Such names get None, not a guess.
_EXCLUDE: dict[str, tuple[str, ...]] = {
    "rtx4090": ("4090 D", "LAPTOP"),
    "rtx5090": ("5090 D", "LAPTOP"),
    "a100": ("PCIE", "40GB"),
    "h100-sxm": ("PCIE", "NVL"),
    "h100-pcie": ("NVL",),
    "h200": ("NVL", "PCIE"),
}


def _normalize(text: str) -> str:
    """Upper-case, '-' and '_' as spaces, single spaces: 'A100-SXM4-80GB' -> 'A100 SXM4 80GB'."""
    return " ".join(re.sub(r"[-_]", " ", text).upper().split())


def _has_word(haystack: str, needle: str) -> bool:
    # Whole-word match, so "B200" is not found in "GB200" nor "H200" in "GH200".
    return re.search(rf"(?<![A-Z0-9]){re.escape(needle)}(?![A-Z0-9])", haystack) is not None


def lookup_gpu(name: str) -> GPUSpec | None:
    """The spec for a short id ("h100-sxm") or a torch.cuda.get_device_name() string, else None."""
    key = name.strip().lower()
    if key in GPUS:
        return GPUS[key]
    text = _normalize(name)
    if not text:
        return None
    best: tuple[int, str] | None = None  # (alias length, id): the most specific alias wins
    for gpu_id, spec in GPUS.items():
        if any(_has_word(text, _normalize(x)) for x in _EXCLUDE.get(gpu_id, ())):
            continue
        for alias in spec.aliases:
            a = _normalize(alias)
            if _has_word(text, a) and (best is None or len(a) > best[0]):
                best = (len(a), gpu_id)
    return GPUS[best[1]] if best else None


def get_gpu(key: str) -> GPUSpec:
    """Like lookup_gpu, but an unknown key raises FP8LabError naming the known ids."""
    spec = lookup_gpu(key)
    if spec is None:
        raise FP8LabError(
            f"unknown GPU {key!r}: use one of {', '.join(GPUS)} (or a device name containing one)"
        )
    return spec


def gpu_id_of(spec: GPUSpec) -> str:
    """The table id ("h100-sxm") of a spec from this table."""
    return next(k for k, v in GPUS.items() if v is spec)


# The math a recipe's converted matmuls run in (precision.Recipe.math), and the field with its peak.
MATH_FIELDS = {"bf16": "bf16_dense_tflops", "fp8": "fp8_fp32acc_tflops", "mxfp8": "mxfp8_tflops"}


def peak_tflops(spec: GPUSpec, math: str, *, source: str | None = None) -> float | None:
    """The dense peak of `math` ("bf16", "fp8", "mxfp8") on `spec`: the vendor field, or with
    source "microbench" its alternative where there is one; None: the GPU has no such math.
    source None: the one `fp8lab advise` uses for this GPU (ADVISOR_RATES)."""
    name = MATH_FIELDS[math]
    value = getattr(spec, name)
    if (source or ADVISOR_RATES[gpu_id_of(spec)]) == "microbench" and value is not None and name in spec.alternatives:
        value = spec.alternatives[name][0]
    return value


def mfu_peak(spec: GPUSpec, math: str = "bf16") -> float:
    """MFU's denominator on `spec` for a run whose fastest matmuls are `math`: the highest dense
    peak of that math any source in this table gives (vendor or microbenchmark; the 5090's
    whitepaper BF16 figure is below every measurement), never below BF16's, since everything
    unconverted runs in bf16. Every kernel of such a run is at most this fast, so MFU cannot pass
    100%. Compare recipes by tokens/s: an FP8 run is measured against its FP8 ceiling."""
    peaks = [peak_tflops(spec, m, source=src) for m in {"bf16", math} for src in ("vendor", "microbench")]
    return max(p for p in peaks if p is not None)


def mfu_peak_tflops(device_name: str, math: str = "bf16") -> float | None:
    """mfu_peak for the GPU called `device_name`; None when it is not in the table."""
    spec = lookup_gpu(device_name)
    return None if spec is None else mfu_peak(spec, math)
