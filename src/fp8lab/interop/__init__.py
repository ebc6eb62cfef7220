"""Hugging Face interoperability: Llama folders (config.json + safetensors + tokenizer files) in
and out. Plain tensors and JSON only: nothing here needs TorchAO or transformers."""
