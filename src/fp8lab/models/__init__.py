from fp8lab.models.flops import ParamCounts, flops_per_token, param_counts
from fp8lab.models.llama import ModelArgs, Transformer
from fp8lab.models.presets import PRESETS, preset_args

__all__ = ["ModelArgs", "Transformer", "PRESETS", "preset_args", "ParamCounts", "param_counts", "flops_per_token"]
