"""Small encoder and decoder model directories with real tokenizer files, built in the test, for
the classification and tagging tests (no downloads): the shipped made-up data is in tests/data."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent / "data"
SENTIMENT = DATA / "sentiment.jsonl"
ENTITIES = DATA / "entities.conll"


def _words() -> list[str]:
    text = SENTIMENT.read_text() + ENTITIES.read_text()
    return sorted(set(re.findall(r"[a-z]+", text.lower())))


def wordpiece_vocab(path: Path) -> Path:
    """A BERT vocab.txt: specials, the data's words, and a few ## pieces so that unknown words
    split into sub-tokens (the tagging tests need words of several tokens)."""
    pieces = [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"] + list("abcdefghijklmnopqrstuvwxyz")
    words = [w for w in _words() if len(w) > 1 and not w.endswith("s")]  # plurals and names split
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + pieces + words
    path.write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    return path


def _class_words() -> dict[str, str]:
    """Words of the sentiment data that occur with one label only (the task's signal)."""
    seen: dict[str, set[str]] = {}
    for line in SENTIMENT.read_text().splitlines():
        row = json.loads(line)
        for word in row["text"].split():
            seen.setdefault(word, set()).add(row["label"])
    return {w: labels.pop() for w, labels in seen.items() if len(labels) == 1}


def bare_encoder(folder: Path, seed: int = 0, pooler: bool = True) -> Path:
    """A bare BertModel checkpoint (keys without the `bert.` prefix, no head; no pooler with
    pooler=False, as sentence-transformers saves some), with a WordPiece tokenizer's files.

    Stands in for a pretrained encoder: the embeddings of the sentiment words lean towards
    one direction per class (what pretraining gives a real one), so that a few dozen steps
    of LoRA + a new head can learn the task; the rest is random."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = wordpiece_vocab(folder / "vocab.txt").read_text().split()
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=64)
    model = BertModel(config, add_pooling_layer=pooler)
    with torch.no_grad():
        table = model.embeddings.word_embeddings.weight
        direction = {label: torch.randn(config.hidden_size) * 0.05 for label in ("positive", "negative", "neutral")}
        for word, label in _class_words().items():
            if word in tokenizer.get_vocab():
                table[tokenizer.get_vocab()[word]] += direction[label]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    keys = json.loads((folder / "config.json").read_text())["architectures"]
    assert keys == ["BertModel"]
    return folder


def tiny_decoder(folder: Path, seed: int = 0) -> Path:
    """A tiny Llama with a byte-level BPE tokenizer trained on the shipped data."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    lines = SENTIMENT.read_text().splitlines() + ENTITIES.read_text().splitlines()
    backend.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=0, eos_token_id=1)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
