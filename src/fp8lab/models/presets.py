"""Named model sizes.

Shapes follow published models where one exists (Llama 3.2 1B/3B, Llama 3 8B); the small
ones follow GPT-3's 125M/350M widths with Llama's SwiGLU (hidden = 8/3 * dim rounded up to
a multiple of 256, as Llama does). Every linear dimension is a multiple of 16 so FP8 can
convert all of them. `vocab_size` here is the default when no data set says otherwise;
training takes the vocabulary of its data.
"""

from __future__ import annotations

import dataclasses

from fp8lab.errors import FP8LabError
from fp8lab.models.llama import ModelArgs

PRESETS: dict[str, ModelArgs] = {
    # A few M parameters: a CPU step takes well under a second at (8, 256).
    "debug": ModelArgs(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=320,
                       ffn_dim=768, max_seq_len=1024),
    "125m": ModelArgs(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, vocab_size=32000,
                      ffn_dim=2048, max_seq_len=2048),
    "350m": ModelArgs(dim=1024, n_layers=24, n_heads=16, n_kv_heads=4, vocab_size=32000,
                      ffn_dim=2816, max_seq_len=2048),
    # Llama 3.2 1B and 3B (tied embeddings, rope theta 500k).
    "1b": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256,
                    ffn_dim=8192, rope_theta=500000.0, max_seq_len=8192, tie_embeddings=True),
    "3b": ModelArgs(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, vocab_size=128256,
                    ffn_dim=8192, rope_theta=500000.0, max_seq_len=8192, tie_embeddings=True),
    # Llama 3 8B.
    "8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                    ffn_dim=14336, rope_theta=500000.0, max_seq_len=8192),
}


def preset_args(name: str, **overrides) -> ModelArgs:
    """The preset's ModelArgs with the given fields replaced (None values are ignored)."""
    if name not in PRESETS:
        raise FP8LabError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    args = dataclasses.replace(PRESETS[name], **changes)
    try:
        args.check()
    except ValueError as e:
        raise FP8LabError(f"{e} (preset {name!r})") from None
    return args
