"""LoRA adapters as drop-in layers for HF models, in PEFT's file format."""
from .config import DEFAULT_TARGET_MODULES, SEQ_CLS_HEADS, LoraConfig
from .inject import (CONFIG_ATTR, DEFAULT_ADAPTER, active_adapter, add_lora, get_lora_config, linear_module_names, lora_layers, rank_excess,
                     set_lora_backend, trainable_parameters, trainable_summary)
from .adapters import add_weighted_adapter, adapter_names, delete_adapter, set_adapter
from .layer import LoraLinear, TrainableCopy
from .merge import merge_lora, save_merged, unmerge_lora
from .peft_accelerate import accelerate_peft, restore_peft
from .peft_view import as_peft_model
from .peft_format import (adapter_base_config, adapter_base_quantization, adapter_labels, adapter_state_dict, base_quantization, load_adapter,
                          load_adapter_weights, read_adapter, save_adapter)

__all__ = [
    "CONFIG_ATTR", "DEFAULT_TARGET_MODULES", "SEQ_CLS_HEADS", "LoraConfig", "LoraLinear", "TrainableCopy", "add_lora",
    "accelerate_peft", "restore_peft", "rank_excess", "DEFAULT_ADAPTER", "active_adapter", "add_weighted_adapter",
    "adapter_names", "as_peft_model", "delete_adapter", "set_adapter",
    "adapter_base_config", "adapter_base_quantization", "adapter_labels", "adapter_state_dict", "base_quantization", "get_lora_config", "linear_module_names", "load_adapter", "load_adapter_weights",
    "lora_layers", "merge_lora", "read_adapter", "save_adapter", "save_merged", "set_lora_backend",
    "trainable_parameters", "trainable_summary", "unmerge_lora",
]
