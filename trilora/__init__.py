"""trilora: fast, exact LoRA / QLoRA fine-tuning with fused Triton kernels.

Subpackages: `trilora.kernels` (Triton kernels), `trilora.quant` (4-bit weights),
`trilora.lora` (adapters), `trilora.trainer` (the trainer). `trilora.load_model` is
`trilora.trainer.load_model` and `trilora.patch` is `trilora.patching.patch` (fused RMSNorm,
attention, MLP and loss modules swapped into HF Llama / Mistral / Qwen2 / Gemma models);
both are imported on first use, so importing the adapter layer never pulls in the trainer.
`trilora.accelerate_peft(peft_model)` swaps trilora's fused LoRA op into a model built by PEFT.
"""
__version__ = "0.1.0"


def __getattr__(name):
    if name == "load_model":
        from .trainer.loading import load_model
        return load_model
    if name == "accelerate_peft":
        from .lora.peft_accelerate import accelerate_peft
        return accelerate_peft
    if name == "patch":
        from .patching import patch
        return patch
    raise AttributeError(f"module 'trilora' has no attribute {name!r}")
