"""GGUF in and out (trilora.gguf_io): a model written by trilora reads back through
transformers' own GGUF loader with the same logits, tokens and metadata; .gguf works as
--model for train / eval / merge; merge --to gguf writes one file atomically."""
import json
import shutil

import pytest
import torch
from _trainer_helpers import fast_args, run_cli
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from trilora.gguf_io import load_gguf, write_gguf
from trilora.trainer.loading import load_model, load_tokenizer

CORPUS = ["rotate: hello = elloh", "the quick brown fox jumps over the lazy dog",
          "Hello, world! héllo wörld\n\ttabs and  spaces"] * 40
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SAMPLES = ["the lazy dog", " Hello,  wörld\n", "rotate: xyz = yzx<|im_end|>"]


def byte_level_tokenizer():
    """A byte-level BPE (GPT-2 / Llama 3 / Qwen2 kind), trained here on a small corpus."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>",
                                  eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.chat_template = CHAT
    return tok


def sentencepiece_tokenizer():
    """A sentencepiece-style BPE with byte fallback (Llama 2 / Mistral kind)."""
    from transformers import LlamaTokenizer
    backend = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=360, special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]))
    spec = json.loads(backend.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    return LlamaTokenizer(vocab=spec["vocab"], merges=merges, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_model(arch: str, vocab: int, dtype=torch.float16):
    """A random model of `arch` whose weights are exact in `dtype` (so f16/bf16 files are lossless)."""
    import transformers as tf
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96)
    config, cls = {
        "llama": (tf.LlamaConfig(**common, rope_theta=5000.0), tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig(**common, sliding_window=None), tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config(**common, rope_theta=20000.0), tf.Qwen2ForCausalLM),
        "gemma2": (tf.Gemma2Config(**common, head_dim=16), tf.Gemma2ForCausalLM),
    }[arch]
    torch.manual_seed(0)
    model = cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)  # not the init's constants: the offsets must show
            p.copy_(p.to(dtype).float())
    return model.eval()


def read_back(path):
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def logits(model, tok):
    ids = torch.tensor([tok("the quick brown fox, hello world")["input_ids"]])
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch, gguf_type", [("llama", "f16"), ("mistral", "f32"), ("qwen2", "bf16"),
                                             ("gemma2", "f16")])
def test_round_trip_through_transformers_is_exact(tmp_path, arch, gguf_type):
    tok = byte_level_tokenizer()
    model = tiny_model(arch, len(tok), torch.bfloat16 if gguf_type == "bf16" else torch.float16)
    path = tmp_path / f"{arch}.gguf"
    write_gguf(model, tok, path, gguf_type)
    back, tok_back = read_back(path)
    assert torch.equal(logits(model, tok), logits(back, tok))
    # metadata: architecture (Mistral is llama.cpp's "llama"), context, rope, tokenizer, template
    assert back.config.model_type == ("llama" if arch == "mistral" else arch)
    assert back.config.max_position_embeddings == 96
    assert back.config.rope_parameters["rope_theta"] == model.config.rope_parameters["rope_theta"]
    assert tok_back.chat_template == CHAT
    assert (tok_back.bos_token, tok_back.eos_token) == (tok.bos_token, tok.eos_token)
    for text in SAMPLES:
        assert tok_back(text)["input_ids"] == tok(text)["input_ids"], text


def test_q8_0_is_within_its_quantization_error(tmp_path):
    tok = byte_level_tokenizer()
    model = tiny_model("llama", len(tok))
    path = tmp_path / "q8.gguf"
    write_gguf(model, tok, path, "q8_0")
    back, _ = read_back(path)
    for name, want in model.state_dict().items():
        got = back.state_dict()[name]
        if want.dim() == 2 and name.endswith("proj.weight") and "k_proj" not in name and "q_proj" not in name:
            # Q8_0: 32-value blocks, scale absmax / 127 stored in f16: half a step, plus up to
            # 127 × the scale's relative rounding (2^-11) of a step
            step = want.abs().reshape(-1, 32).amax(1, keepdim=True) / 127
            assert ((got - want).reshape(-1, 32).abs() <= (0.5 + 127 * 2**-11) * step + 1e-7).all(), name
    diff = (logits(model, tok) - logits(back, tok)).abs().max().item()
    assert 0 < diff < 0.05
    write_gguf(model, tok, tmp_path / "f16.gguf", "f16")
    assert path.stat().st_size < 0.7 * (tmp_path / "f16.gguf").stat().st_size  # ~1.06 bytes a value vs 2


def test_sentencepiece_tokenizer_round_trip(tmp_path):
    tok = sentencepiece_tokenizer()
    model = tiny_model("llama", len(tok))
    path = tmp_path / "spm.gguf"
    write_gguf(model, tok, path, "f16")
    back, tok_back = read_back(path)
    for text in SAMPLES[:2] + ["rotate: abc = bca"]:
        assert tok_back(text)["input_ids"] == tok(text)["input_ids"], text
    assert torch.equal(logits(model, tok), logits(back, tok))


def test_unsupported_models_and_tokenizers_are_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    tok = byte_level_tokenizer()
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="cannot write a 'gpt2' model as GGUF; supported: gemma2"):
        write_gguf(gpt2, tok, tmp_path / "x.gguf")
    from _data_helpers import char_tokenizer
    with pytest.raises(ValueError, match="cannot write a WordLevel tokenizer"):
        write_gguf(tiny_model("llama", len(char_tokenizer())), char_tokenizer(), tmp_path / "y.gguf")
    with pytest.raises(ValueError, match="gguf_type must be one of"):
        write_gguf(tiny_model("llama", len(tok)), tok, tmp_path / "z.gguf", "q4_k")


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    """A tiny Llama with a byte-level tokenizer, as a .gguf file (what users download)."""
    folder = tmp_path_factory.mktemp("gguf")
    tok = byte_level_tokenizer()
    write_gguf(tiny_model("llama", len(tok)), tok, folder / "tiny.gguf", "f16")
    return folder / "tiny.gguf"


def test_load_model_reads_gguf_and_the_model_saves_like_any_other(gguf_model, tmp_path):
    """transformers refuses save_pretrained on a GGUF-loaded model; trilora's rebuilt one saves."""
    model = load_model(gguf_model, quantize=None, backend="torch")
    tok = load_tokenizer(gguf_model)
    reference, _ = read_back(gguf_model)
    assert torch.equal(logits(model, tok), logits(reference, tok))
    model.save_pretrained(tmp_path / "hf")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert torch.equal(logits(again, tok), logits(reference, tok))
    from trilora.quant import Linear4bit
    quantized = load_model(gguf_model, quantize="nf4", backend="torch")
    assert sum(isinstance(m, Linear4bit) for m in quantized.modules()) == 2 * 7


def test_train_on_a_gguf_model_and_merge_back_to_gguf(gguf_model, tmp_path):
    rows = [{"prompt": f"rotate: {w} =", "completion": f" {w[1:]}{w[0]}"}
            for w in ["hello", "world", "quick", "brown", "lazy", "jumps"] * 10]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    code, _, err = run_cli(fast_args(out, data, steps=3, model=gguf_model, max_length=24, eval_max_new_tokens=2))
    assert code == 0, err[-2000:]
    merged = tmp_path / "merged.gguf"
    code, stdout, err = run_cli(["merge", "--model", gguf_model, "--adapter", out / "adapter", "--output", merged,
                                 "--to", "gguf", "--gguf-type", "f32", "--kernel-backend", "torch"])
    assert code == 0, err[-2000:]
    assert "written as GGUF (f32)" in stdout and "dequantized nf4 base" in stdout
    from trilora.lora import load_adapter
    ours = load_adapter(load_model(gguf_model, quantize="nf4", backend="torch"), out / "adapter", backend="torch").eval()
    back, tok = read_back(merged)
    assert torch.allclose(logits(back, tok), logits(ours, tok), atol=1e-4)
    assert not list(tmp_path.glob(".tmp-*"))
    # an existing file needs --overwrite; a name without .gguf is refused
    code, _, err = run_cli(["merge", "--model", gguf_model, "--adapter", out / "adapter", "--output", merged,
                            "--to", "gguf"])
    assert code == 2 and "exists: pass --overwrite" in err
    code, _, err = run_cli(["merge", "--model", gguf_model, "--adapter", out / "adapter", "--output",
                            tmp_path / "m.bin", "--to", "gguf"])
    assert code == 2 and "one file named *.gguf" in err


def test_a_failed_gguf_write_leaves_nothing(gguf_model, tmp_path, monkeypatch):
    from trilora import gguf_io
    from trilora.trainer.outputs import write_file

    def broken(*_):
        raise OSError("No space left on device")
    monkeypatch.setattr(gguf_io, "_write_tensors", broken)
    model, tok = load_gguf(gguf_model), load_tokenizer(gguf_model)
    with pytest.raises(OSError, match="No space left"):
        write_file(lambda p: gguf_io.write_gguf(model, tok, p), tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []
    shutil.rmtree(tmp_path, ignore_errors=True)
