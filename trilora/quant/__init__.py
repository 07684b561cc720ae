"""4-bit weights in bitsandbytes' exact format, and 4-bit linear layers."""
from .functional import BLOCKSIZES, dequantize_4bit, quantize_4bit, validate_quant_state
from .linear4bit import Linear4bit, quantize_model
from .state import QuantState

__all__ = ["BLOCKSIZES", "Linear4bit", "QuantState", "dequantize_4bit",
           "quantize_4bit", "quantize_model", "validate_quant_state"]
