"""One rank of tests/test_sharded_loading.py (run by torchrun with gloo on CPU).

usage: python -m torch.distributed.run ... _sharded_load_worker.py MODEL_DIR OUT_DIR MODE QUANTIZE DORA
MODE "sharded" (`load_sharded`: meta skeleton, each rank fills its shards) or "host" (the
whole model loaded in host memory, then sharded). Rank 0 writes OUT_DIR/state.safetensors
(every parameter and 4-bit table, gathered whole), OUT_DIR/logits.safetensors; every rank
writes OUT_DIR/rank<r>.json with its peak host-memory growth during the load, the bytes
of its parameter shards, of all parameters, and of one row of each (the rounding of dim-0
shards)."""
import gc
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from trilora.lora import LoraConfig, add_lora
from trilora.quant import Linear4bit
from trilora.trainer.loading import load_model
from trilora.trainer.sharded_loading import load_sharded
from trilora.trainer.sharding import bytes_per_rank, full, reshard_all, shard_model


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class PeakAnon:
    """The largest anonymous resident memory (KiB) seen while it runs, sampled every 0.2 ms
    by a thread (the kernel's own peak, VmHWM, counts the safetensors file's mapped pages
    too: memory the kernel may drop, not memory the model holds)."""

    def __init__(self):
        self.peak, self.running = rss_kib("RssAnon"), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss_kib("RssAnon"))
            time.sleep(0.0002)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return max(self.peak, rss_kib("RssAnon"))


def warm_up(model_dir):
    """Import what loading imports, so that the measured growth is the model's memory."""
    import transformers
    from torch.distributed.fsdp import fully_shard  # noqa: F401

    config = transformers.AutoConfig.from_pretrained(model_dir)
    transformers.AutoModelForCausalLM.from_config(config.__class__(**{**config.to_dict(), "num_hidden_layers": 1,
                                                                     "hidden_size": 8, "intermediate_size": 8,
                                                                     "num_attention_heads": 1,
                                                                     "num_key_value_heads": 1, "head_dim": 8}))


def main(model_dir, out, mode, quantize, dora):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    quantize = None if quantize == "none" else quantize
    config = LoraConfig(r=3, alpha=6, target_modules="all-linear", use_dora=dora == "dora")

    def adapt(model):
        add_lora(model, config, backend="torch")

    warm_up(model_dir)
    torch.manual_seed(0)
    before = rss_kib("RssAnon")
    peak = PeakAnon()
    if mode == "sharded":
        model = load_sharded(model_dir, adapt, torch.device("cpu"), quantize=quantize, backend="torch")
    else:
        model = load_model(model_dir, quantize=quantize, device="cpu", backend="torch")
        adapt(model)
        shard_model(model, torch.device("cpu"))
    growth = (peak.stop() - before) * 1024
    local, total = bytes_per_rank(model)
    row_bytes = sum(p.numel() // p.shape[0] * p.element_size() for p in model.parameters() if p.dim())
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    reshard_all(model)
    state = {}
    for name, p in model.named_parameters():
        state[name] = full(p).detach().clone()
    for name, m in model.named_modules():
        if isinstance(m, Linear4bit):
            qs = m.quant_state
            for key, t in (("absmax", qs.absmax), ("code", qs.code), ("nested_absmax", qs.nested_absmax),
                           ("nested_code", qs.nested_code), ("offset", qs.offset)):
                if t is not None:
                    state[f"{name}.quant_state.{key}"] = full(t).detach().clone().reshape(-1)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out, "state.safetensors"))
        save_file({"logits": logits.contiguous()}, os.path.join(out, "logits.safetensors"))
    Path(out, f"rank{rank}.json").write_text(json.dumps({"growth": growth, "local": local, "total": total,
                                                           "row_bytes": row_bytes}))
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
    gc.collect()  # the sharded model holds the group: free it first, or gloo can abort at exit
    dist.destroy_process_group()
