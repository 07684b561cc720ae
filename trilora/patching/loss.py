"""Fused lm_head + cross-entropy for a patched HF CausalLM, without the [tokens, vocab] logits.

HF's `XForCausalLM.forward` always runs `logits = self.lm_head(hidden)` and then
`self.loss_function(logits, labels, ...)`: a custom `loss_function` receives logits that
already exist, so it cannot save their memory. Short of rewriting that forward, the clean
hooks are PyTorch's own: a module swap for `lm_head` and forward (pre-)hooks on the CausalLM.

- `FusedLMHead` replaces `lm_head`, sharing its weight/bias Parameters (tied embeddings stay
  tied, state-dict keys stay `lm_head.weight`). Unarmed, it is `F.linear`.
- A forward pre-hook on the CausalLM, when the model trains and `labels` are given (by
  keyword), takes the labels out of the call (so HF computes no loss), shifts them as HF's
  `ForCausalLMLoss` does (or takes `shift_labels`) and arms the head for this one call.
- The armed head computes `fused_linear_cross_entropy(hidden, W, shifted labels)` (mean over
  non-ignored tokens, or sum / `num_items_in_batch` as HF's loss) and returns an empty
  [..., 0] tensor instead of logits.
- A forward hook puts the loss into the output and drops the (empty) logits: in training with
  labels, `output.loss` is set and `output.logits` is None (Liger's `skip_logits` behaviour).

Not armed (HF's own path, logits computed): eval mode, no labels, labels passed positionally,
`logits_to_keep` != 0, or a direct `model.forward(...)` call (hooks run on `model(...)` only).
Not armed either when the caller runs its own fused head: TRL's trainers call
`model(..., fused_lm_head=True, labels=...)` and compute the loss from the backbone's hidden
states and `lm_head.weight` themselves (no logits either), so the labels are left to them.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from trilora.kernels.cross_entropy import IGNORE_INDEX, fused_linear_cross_entropy

_LABELS_POSITION = 5  # forward(input_ids, attention_mask, position_ids, cache, inputs_embeds, labels, ...)


class FusedLMHead(nn.Module):
    """lm_head that computes the fused linear cross-entropy when armed by the CausalLM's pre-hook."""

    def __init__(self, linear: nn.Linear, backend: str = "auto"):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameter objects: ties and optimizers see no change
        self.bias = linear.bias
        self.backend = backend
        self._pending: tuple | None = None   # (shifted labels, ignore_index, num_items_in_batch)
        self.loss: torch.Tensor | None = None
        self.train(linear.training)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        pending, self._pending = self._pending, None
        if pending is None:
            return F.linear(hidden, self.weight, self.bias)
        labels, ignore_index, num_items = pending
        reduction = "mean" if num_items is None else "sum"
        loss = fused_linear_cross_entropy(hidden, self.weight, labels.to(hidden.device), ignore_index,
                                          reduction=reduction, lm_head_bias=self.bias, backend=self.backend)
        if num_items is not None:
            loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
        self.loss = loss
        return hidden.new_empty(*hidden.shape[:-1], 0)  # no logits were computed

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}, backend={self.backend!r}"


def _arm(model: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of the CausalLM: hand the (shifted) labels to the fused head."""
    head = model.lm_head
    if not isinstance(head, FusedLMHead):  # replaced since (e.g. resize_token_embeddings): HF's path
        return None
    head._pending, head.loss = None, None
    labels = kwargs.get("labels")
    keep = kwargs.get("logits_to_keep", 0)
    if labels is None or not model.training or len(args) > _LABELS_POSITION or \
            not (isinstance(keep, int) and keep == 0) or kwargs.get("fused_lm_head"):
        return None
    kwargs = dict(kwargs)
    del kwargs["labels"]
    ignore_index = kwargs.get("ignore_index", IGNORE_INDEX)
    shifted = kwargs.pop("shift_labels", None)
    if shifted is None:  # as ForCausalLMLoss: tokens < n predict n, the last predicts nothing
        shifted = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    head._pending = (shifted, ignore_index, kwargs.get("num_items_in_batch"))
    return args, kwargs


def _attach_loss(model: nn.Module, args: tuple, kwargs: dict, output):
    """Forward hook of the CausalLM: the fused loss into the output, the empty logits out."""
    head = model.lm_head
    if not isinstance(head, FusedLMHead):
        return None
    loss, head.loss, head._pending = head.loss, None, None
    if loss is None:
        return None
    if isinstance(output, tuple):  # return_dict=False: (logits, ...) → (loss, ...)
        return (loss, *output[1:])
    fields = {k: v for k, v in output.items() if k not in ("loss", "logits")}
    return type(output)(loss=loss, **fields)


def install_fused_loss(model: nn.Module, backend: str = "auto") -> None:
    """Swap `model.lm_head` for a `FusedLMHead` and register the two hooks (idempotent)."""
    if isinstance(model.lm_head, FusedLMHead):
        return
    model.lm_head = FusedLMHead(model.lm_head, backend)
    model._trilora_loss_hooks = (model.register_forward_pre_hook(_arm, with_kwargs=True),
                                 model.register_forward_hook(_attach_loss, with_kwargs=True))
