"""fp8lab: train Llama-style language models in BF16 and FP8 (TorchAO), and measure
whether FP8 pays on your GPU."""

from fp8lab.errors import FP8LabError

__version__ = "0.1.0"
__all__ = ["FP8LabError", "__version__"]
