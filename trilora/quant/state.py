"""`QuantState`: everything needed to dequantize a 4-bit tensor, and its bitsandbytes form."""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, replace

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    """bitsandbytes' spelling of a dtype in its JSON: "bfloat16", "float16", "float32"."""
    return str(dtype).removeprefix("torch.")


@dataclass
class QuantState:
    """Quantization state of one 4-bit tensor, laid out as bitsandbytes lays it out.

    absmax:          uint8 [nblocks] codes when double-quantized, else fp32 [nblocks]
    shape, dtype:    the original tensor's shape and dtype (dequantize's default output dtype)
    blocksize:       elements per block (32 ... 4096, a power of two)
    quant_type:      "nf4" or "fp4"
    code:            fp32 [16], the 4-bit table
    nested_absmax:   fp32 [ceil(nblocks / 256)]  (double quant only)
    nested_code:     fp32 [256], bnb's signed dynamic map  (double quant only)
    offset:          fp32 scalar, mean of the absmax before nesting  (double quant only)
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    nested_blocksize: int = 256

    def __post_init__(self):
        # A NaN/Inf scale would turn a whole block of weights into NaN on every dequantize:
        # refuse it once here rather than pay a device sync on every forward.
        for name in ("absmax", "code", "nested_absmax", "nested_code", "offset"):
            t = getattr(self, name)
            if t is None or not isinstance(t, torch.Tensor) or t.is_meta or not t.is_floating_point():
                continue
            bad = (~torch.isfinite(t)).sum().item()
            if bad:
                raise ValueError(f"quant state {name} holds {bad} NaN/Inf value(s) of {t.numel()}; "
                                 "the weights it scales would be NaN")

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nblocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.absmax.device

    _TENSORS = ("absmax", "code", "nested_absmax", "nested_code", "offset")

    def tensors(self) -> list[torch.Tensor]:
        """Its tensors (those it has)."""
        return [t for t in (getattr(self, name) for name in self._TENSORS) if t is not None]

    def map(self, fn) -> "QuantState":
        """A copy with `fn` applied to each tensor, unchecked (e.g. memory to fill later)."""
        out = copy.copy(self)
        for name in self._TENSORS:
            if getattr(self, name) is not None:
                setattr(out, name, fn(getattr(self, name)))
        return out

    def to(self, device: torch.device | str) -> "QuantState":
        """A copy with every tensor on `device`."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, absmax=move(self.absmax), code=move(self.code),
                       nested_absmax=move(self.nested_absmax),
                       nested_code=move(self.nested_code), offset=move(self.offset))

    # ------------------------------------------------------------------ bitsandbytes format

    def to_bnb_dict(self) -> dict[str, torch.Tensor]:
        """The quant-state tensors of a bnb `Linear4bit` state dict, keys without the `weight.` prefix.

        `absmax`, `quant_map`, [`nested_absmax`, `nested_quant_map`] and
        `quant_state.bitsandbytes__<type>`: the UTF-8 bytes of bnb's JSON, keys in its order.
        """
        meta = {"quant_type": self.quant_type, "blocksize": self.blocksize,
                "dtype": dtype_name(self.dtype), "shape": list(self.shape)}
        tensors = {"absmax": self.absmax, "quant_map": self.code}
        if self.nested:
            tensors["nested_absmax"] = self.nested_absmax
            tensors["nested_quant_map"] = self.nested_code.clone()
            meta.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32",
                        nested_offset=None if self.offset.is_meta else self.offset.item())  # meta: no data yet
        blob = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
        tensors[f"quant_state.bitsandbytes__{self.quant_type}"] = blob
        return tensors

    @staticmethod
    def metadata(blob: torch.Tensor, where: str) -> dict:
        """bitsandbytes' quant-state JSON (the uint8 `quant_state.bitsandbytes__<type>`
        entry), checked: its dict with `dtype` as a torch dtype and `blocksize` an int.
        ValueError naming `where` when it is not one."""
        try:
            meta = json.loads(bytes(blob.cpu().tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{where} is not a bitsandbytes quant-state JSON: {err}") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{where} is not a bitsandbytes quant-state JSON object")
        for key in ("quant_type", "blocksize", "dtype", "shape"):
            if key not in meta:
                raise ValueError(f"{where} lacks '{key}'")
        if meta["dtype"] not in _DTYPES:
            raise ValueError(f"unsupported dtype {meta['dtype']!r} in {where}")
        return {**meta, "dtype": _DTYPES[meta["dtype"]], "blocksize": int(meta["blocksize"])}

    @classmethod
    def from_bnb_dict(cls, tensors: dict[str, torch.Tensor]) -> "QuantState":
        """Parse the quant-state entries of a bnb state dict (keys without the `weight.` prefix).

        Raises ValueError naming what is missing or inconsistent.
        """
        blobs = [k for k in tensors if k.startswith("quant_state.bitsandbytes__")]
        if len(blobs) != 1:
            raise ValueError("expected exactly one 'quant_state.bitsandbytes__nf4' or '__fp4' entry, "
                             f"found {blobs or 'none'}")
        meta = cls.metadata(tensors[blobs[0]], blobs[0])
        for key in ("absmax", "quant_map"):
            if key not in tensors:
                raise ValueError(f"bitsandbytes state lacks '{key}'")
        nested = "nested_absmax" in tensors
        if nested and ("nested_quant_map" not in tensors or "nested_offset" not in meta):
            raise ValueError("double-quantized state needs nested_absmax, nested_quant_map and nested_offset")
        absmax = tensors["absmax"]
        state = cls(
            absmax=absmax if nested else absmax.float(),
            shape=torch.Size(meta["shape"]),
            dtype=meta["dtype"],
            blocksize=meta["blocksize"],
            quant_type=meta["quant_type"],
            code=tensors["quant_map"].float(),
            nested_absmax=tensors["nested_absmax"].float() if nested else None,
            nested_code=tensors["nested_quant_map"].float() if nested else None,
            offset=torch.tensor(float(meta["nested_offset"]), device=absmax.device) if nested else None,
            nested_blocksize=int(meta.get("nested_blocksize", 256)),
        )
        return state
