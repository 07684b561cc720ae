"""`Linear4bit`: a frozen 4-bit linear layer whose state dict is bitsandbytes' own."""
from __future__ import annotations

import copy
import functools
from typing import Iterable

import torch
import torch.nn as nn

from ..kernels.lora.linear import linear_4bit_ref
from ..module_tree import name_matches, replace_module
from .functional import dequantize_4bit, quantize_4bit, validate_quant_state
from .state import QuantState


class Linear4bit(nn.Module):
    """`y = x Wᵀ + b` with W stored as 4-bit NF4/FP4 in bitsandbytes' exact layout.

    `state_dict()` has bnb's keys, dtypes and shapes: `weight` (uint8 [(out*in+1)//2, 1]),
    `bias`, and `weight.absmax`, `weight.quant_map`, `weight.nested_absmax`,
    `weight.nested_quant_map`, `weight.quant_state.bitsandbytes__nf4|fp4`. `load_state_dict`
    takes such a dict (from bnb, from a quantized HF checkpoint, or from us), or a dense
    `nn.Linear` state dict, which it quantizes. The weight is frozen; the bias may train.

    Args:
        compute_dtype: dtype the matmul runs in; None = the input's dtype.
        backend: kernels of this layer's (de)quantization, "auto", "triton" or "torch"; a
            plain attribute that may be changed later.
        dtype: dtype of the (randomly initialised, like nn.Linear) weight before quantization,
            which is also the quant state's dtype and the bias dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                 compute_dtype: torch.dtype | None = None, device=None, dtype: torch.dtype | None = None,
                 backend: str = "auto"):
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        dense = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_from_dense(dense.weight.detach(), dense.bias, quant_type, blocksize,
                              double_quant, compute_dtype, backend)

    def _init_from_dense(self, weight, bias, quant_type, blocksize, double_quant, compute_dtype,
                         backend: str = "auto"):
        self.out_features, self.in_features = weight.shape
        self.compute_dtype, self.backend = compute_dtype, backend
        self._set_quantized(*quantize_4bit(weight, quant_type, blocksize, double_quant, backend))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                    backend: str = "auto") -> "Linear4bit":
        """Quantize an `nn.Linear` (its weight dtype becomes the quant state's dtype)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        return cls.from_dense(linear.weight, linear.bias, quant_type, blocksize, double_quant,
                              compute_dtype, backend)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                   compute_dtype: torch.dtype | None = None, backend: str = "auto") -> "Linear4bit":
        """Quantize a dense weight [out, in] (and keep `bias` [out], which may be on `meta`
        until loaded) without building an `nn.Linear` first."""
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._init_from_dense(weight.detach(), bias, quant_type, blocksize, double_quant,
                                compute_dtype, backend)
        return module

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor],
                        compute_dtype: torch.dtype | None = None, backend: str = "auto") -> "Linear4bit":
        """Build a layer from a bitsandbytes-format state dict (`weight`, `weight.*`, optional `bias`)."""
        if "weight" not in state_dict:
            raise ValueError("a Linear4bit state dict needs 'weight'")
        state = QuantState.from_bnb_dict({k[len("weight."):]: v for k, v in state_dict.items()
                                          if k.startswith("weight.")})
        validate_quant_state(state_dict["weight"], state)
        if len(state.shape) != 2:
            raise ValueError(f"a linear weight must be 2-D, the state says {tuple(state.shape)}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.out_features, module.in_features = state.shape
        module.compute_dtype, module.backend = compute_dtype, backend
        module._set_quantized(state_dict["weight"].clone(), state)
        bias = state_dict.get("bias")
        module.bias = None if bias is None else nn.Parameter(bias.clone())
        return module

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool = True, quant_type: str = "nf4",
              blocksize: int = 64, double_quant: bool = True, dtype: torch.dtype = torch.float32,
              compute_dtype: torch.dtype | None = None, backend: str = "auto") -> "Linear4bit":
        """A layer of the right shapes with every tensor on the `meta` device (no memory, no
        data): a skeleton to shard before its weights are read (`model.to_empty(device=...)`
        then allocates them, and the loader fills them)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.out_features, module.in_features = out_features, in_features
        module.compute_dtype, module.backend = compute_dtype, backend
        numel = in_features * out_features
        nblocks = -(-numel // blocksize)
        meta = functools.partial(torch.empty, device="meta")
        state = QuantState(
            absmax=meta(nblocks, dtype=torch.uint8 if double_quant else torch.float32),
            shape=torch.Size((out_features, in_features)), dtype=dtype, blocksize=blocksize,
            quant_type=quant_type, code=meta(16),
            nested_absmax=meta(-(-nblocks // 256)) if double_quant else None,
            nested_code=meta(256) if double_quant else None,
            offset=meta(()) if double_quant else None)
        module._set_quantized(meta((numel + 1) // 2, 1, dtype=torch.uint8), state)
        module.bias = nn.Parameter(meta(out_features, dtype=dtype)) if bias else None
        return module

    def _set_quantized(self, packed: torch.Tensor, state: QuantState) -> None:
        self.weight = nn.Parameter(packed, requires_grad=False)
        self._parameters.pop("absmax", None)  # a new state brings its own absmax
        self.quant_state = state
        self.quant_type, self.blocksize, self.double_quant = state.quant_type, state.blocksize, state.nested

    @property
    def quant_state(self) -> QuantState:
        """The weight's quant state. After `absmax_as_parameter()` its absmax is the module's
        `absmax` parameter as it is now (under FSDP: the gathered whole table inside the
        layer's forward)."""
        state = self.__dict__["_quant_state"]
        absmax = self._parameters.get("absmax")
        if absmax is None:
            return state
        live = copy.copy(state)  # no __post_init__: the table was checked when it was loaded
        live.absmax = absmax
        return live

    @quant_state.setter
    def quant_state(self, state: QuantState) -> None:
        self.__dict__["_quant_state"] = state

    def absmax_as_parameter(self) -> nn.Parameter:
        """Register the quant state's absmax table as a frozen parameter `absmax`, so FSDP
        shards it with the packed weight (it is 1/32 of the packed bytes with double
        quantization, 1/8 without). The state dict keeps bitsandbytes' keys; returns it."""
        if "absmax" not in self._parameters:
            self.absmax = nn.Parameter(self.__dict__["_quant_state"].absmax, requires_grad=False)
        return self.absmax

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight [out, in] in `dtype` (default: the dtype it was quantized from)."""
        return dequantize_4bit(self.weight, self.quant_state, dtype=dtype, backend=self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] → [..., out] in x's dtype, computed in `compute_dtype` (default x's).

        The dense weight exists only during the matmul: backward dequantizes it again
        instead of keeping it (`linear_4bit_ref`), as bitsandbytes' Linear4bit does.
        """
        dtype = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        dequantize = functools.partial(dequantize_4bit, backend=self.backend)
        return linear_4bit_ref(x.to(dtype), self.weight, self.quant_state, bias, dequantize).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, quant_type={self.quant_type}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}")

    # ------------------------------------------------------------------ device moves

    def move_quant_tables(self, device: torch.device | str) -> None:
        """Move the quant state's tables that are not parameters (all of them, unless
        `absmax_as_parameter`) to `device`; for a layer whose parameters someone else moved
        (FSDP moves parameters only)."""
        state = self.__dict__["_quant_state"]
        absmax = self._parameters.get("absmax")
        if absmax is not None:  # the state's own table is the parameter
            state.absmax = absmax
        self.quant_state = state.map(lambda t: t if t is absmax else t.to(device))

    def _apply(self, fn, *args, **kwargs):
        # `.to(device)` moves the quant state with the weight; dtype casts (`.half()`) leave
        # it alone: the absmax and tables must stay fp32 / uint8.
        super()._apply(fn, *args, **kwargs)
        state, device = self.__dict__["_quant_state"], self.weight.device
        if "absmax" in self._parameters:  # the state's own table is the parameter
            state.absmax = self._parameters["absmax"]
        if device.type != "meta" and any(t.is_meta for t in state.tensors()):  # to_empty: allocate them
            self.quant_state = state.map(lambda t: torch.empty_like(t, device=device) if t.is_meta else t)
        elif state.device != device:
            self.quant_state = state.to(device)
        return self

    # ------------------------------------------------------------------ bnb state dict

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "absmax", None)  # saved as bitsandbytes' `weight.absmax`
        for key, value in self.quant_state.to_bnb_dict().items():
            destination[f"{prefix}weight.{key}"] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        wkey = prefix + "weight"
        if wkey in state_dict:
            try:
                self._load_weight(state_dict[wkey], {k[len(wkey) + 1:]: v for k, v in state_dict.items()
                                                     if k.startswith(wkey + ".")})
            except (ValueError, TypeError) as err:
                error_msgs.append(f"{wkey}: {err}")
                return
        # the weight and its `weight.*` quant-state entries are consumed above (torch would
        # report the dotted ones as unexpected keys)
        rest = {k: v for k, v in state_dict.items() if k != wkey and not k.startswith(wkey + ".")}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
        for key in (wkey, prefix + "absmax"):  # `absmax` came as `weight.absmax`
            if key in missing_keys and wkey in state_dict:
                missing_keys.remove(key)

    def _load_weight(self, weight: torch.Tensor, quant_entries: dict[str, torch.Tensor]) -> None:
        device = self.weight.device
        want = (self.out_features, self.in_features)
        if quant_entries:
            state = QuantState.from_bnb_dict(quant_entries).to(device)
            packed = weight.to(device).clone()
            validate_quant_state(packed, state)
            if tuple(state.shape) != want:
                raise ValueError(f"checkpoint weight has shape {tuple(state.shape)}, this layer is {want}")
        elif weight.is_floating_point():
            if tuple(weight.shape) != want:
                raise ValueError(f"dense weight has shape {tuple(weight.shape)}, this layer is {want}")
            packed, state = quantize_4bit(weight.to(device), self.quant_type, self.blocksize,
                                          self.double_quant, self.backend)
        else:
            raise ValueError("a packed 4-bit weight needs its quant state entries "
                             "(weight.absmax, weight.quant_map, weight.quant_state.bitsandbytes__*)")
        self._set_quantized(packed, state)


def quantize_model(model: nn.Module, quant_type: str = "nf4", blocksize: int = 64,
                   double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                   skip: Iterable[str] = ("lm_head",), backend: str = "auto") -> nn.Module:
    """Replace every `nn.Linear` of `model` in place by a `Linear4bit`, and return `model`.

    `skip` holds module names (full dotted path, a dotted suffix, last component, or a regex
    over the full path) left in 16 bits; the LM head by default, as bitsandbytes and HF do.
    """
    skip = tuple(skip)
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and not name_matches(name, skip)]
    for name, linear in targets:
        if linear.weight.is_meta:
            raise ValueError(f"{name}.weight is on the meta device (no data): load or materialize "
                             "the model's weights before quantizing it")
        replace_module(model, name, Linear4bit.from_linear(linear, quant_type, blocksize, double_quant,
                                                           compute_dtype, backend))
    return model


__all__ = ["Linear4bit", "quantize_model"]
