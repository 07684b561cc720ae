"""The trainer: data preparation, model loading, the training loop, evaluation, the run."""
from .config import TrainConfig
from .data import FORMATS, CleaningReport, Record, label_set, load_records, tag_set
from .data_batch import (
    BatchIterator,
    PackedDataset,
    ResumableBatchSampler,
    collate_packed,
    collate_padded,
    pack_examples,
    packed_attention_mask,
)
from .data_mix import Splits, iter_mixture, load_splits, mix, split, stages
from .data_tokenize import (
    DEFAULT_TEMPLATES,
    IGNORE_INDEX,
    TokenizationReport,
    TokenizedDataset,
    prompt_ids,
    render_prompt_completion,
    tokenize_records,
)
from .loading import load_model
from .loop import Trainer
from .run import train

__all__ = [
    "TrainConfig", "Trainer", "load_model", "train",
    "FORMATS", "CleaningReport", "Record", "label_set", "load_records",
    "BatchIterator", "PackedDataset", "ResumableBatchSampler", "collate_packed",
    "collate_padded", "pack_examples", "packed_attention_mask",
    "Splits", "iter_mixture", "load_splits", "mix", "split", "stages",
    "DEFAULT_TEMPLATES", "IGNORE_INDEX", "TokenizationReport", "TokenizedDataset",
    "prompt_ids", "render_prompt_completion", "tokenize_records", "tag_set",
]
