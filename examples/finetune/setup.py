"""Stand-ins for what a fine-tuning user downloads, made locally (no network needed):

  OUT/tiny-llama/  a small Llama-architecture model saved by transformers itself
                   (config.json + model.safetensors) with a byte-level BPE tokenizer.json and a
                   tokenizer_config.json carrying a Llama-3-style chat template;
  OUT/chat.jsonl   instruction data in the chat format: {"messages": [{"role", "content"}, ...]},
                   two-digit additions a model learns within a few hundred steps.

With a real model, skip this and point --tokenizer and model.init_from at its folder (for
example one made by `huggingface-cli download meta-llama/Llama-3.2-1B-Instruct --local-dir DIR`).
The model here is randomly initialised (seeded): it stands in for the *shape* of a pretrained
Llama, not for its knowledge.

    python examples/finetune/setup.py --out work/ft [--examples 4000]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Llama 3's template, shortened: a header per message, <|eot_id|> after each, and the assistant
# header alone when a reply is to be generated.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
SYSTEM = "You are a calculator. Answer with the sum only."


def conversations(n: int, *, seed: int) -> list[dict]:
    """`n` chats asking for the sum of two numbers below 100 (one in four with a system prompt)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.25 else []
        messages += [{"role": "user", "content": f"What is {a} + {b}?"},
                     {"role": "assistant", "content": f"{a} + {b} = {a + b}"}]
        out.append({"messages": messages})
    return out


def tokenizer(texts: list[str], *, vocab_size: int):
    """A byte-level BPE (as Llama 3's is) trained on `texts`, with the chat template's specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--examples", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        print("setup.py needs transformers: pip install transformers (make test installs it)", file=sys.stderr)
        return 2
    model_dir, data = args.out / "tiny-llama", args.out / "chat.jsonl"
    for path in (model_dir, data):
        if path.exists():
            print(f"{path} exists; choose another --out (nothing was changed)", file=sys.stderr)
            return 2
    model_dir.mkdir(parents=True)
    chats = conversations(args.examples, seed=args.seed)
    data.write_text("".join(json.dumps(c) + "\n" for c in chats), encoding="utf-8")

    tok = tokenizer([m["content"] for c in chats[:500] for m in c["messages"]] + [SYSTEM], vocab_size=512)
    tok.save(str(model_dir / "tokenizer.json"))
    bos, eos = tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|end_of_text|>")
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>", "add_bos_token": True, "chat_template": CHAT_TEMPLATE,
        "model_max_length": 512, "clean_up_tokenization_spaces": False,
    }, indent=2) + "\n", encoding="utf-8")
    # Every linear dimension a multiple of 16, so each FP8 recipe converts all of them.
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=bos, eos_token_id=eos)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    # As Llama 3 Instruct's generation_config.json: a reply ends at <|eot_id|> too.
    model.generation_config.eos_token_id = [eos, tok.token_to_id("<|eot_id|>")]
    model.save_pretrained(model_dir)
    print(f"wrote {model_dir} (a {sum(1 for _ in model_dir.iterdir())}-file Llama folder) and {data} "
          f"({len(chats)} chats)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
