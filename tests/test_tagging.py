"""Entity tagging: CoNLL / JSONL / CSV tagging records, sub-token labels, entity metrics."""
import json
import random

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from trilora.trainer.data import label_set, load_records, tag_set
from trilora.trainer.data_tokenize import IGNORE_INDEX
from trilora.trainer.tagging import (
    align_labels,
    entity_metrics,
    entity_spans,
    predictions_to_word_tags,
    tokenize_tagging,
)

SENTENCES = [
    (["John", "lives", "in", "New", "York", "."], ["B-PER", "O", "O", "B-LOC", "I-LOC", "O"]),
    (["Washington", "lives", "."], ["B-PER", "O", "O"]),
    (["in", "York"], ["O", "I-LOC"]),  # IOB1 style: kept as written
]

CONLL = """-DOCSTART- -X- -X- O

# sent_id = 1
John NNP B-PER
lives\tVBZ\tO
in IN   O
New NNP B-LOC
York NNP I-LOC
. . O


Washington B-PER
lives O
. O

-DOCSTART- -X- -X- O
in O
York I-LOC
"""


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer ([CLS] ... [SEP], lower case, ## continuations)."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "john", "lives", "in", "new", "york", "wash",
             "##ing", "##ton", "."]
    backend = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                                   pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]")


# --------------------------------------------------------------------------- loading

def test_conll_jsonl_and_csv_load_to_the_same_records(tmp_path):
    (tmp_path / "s.conll").write_text(CONLL)
    write_jsonl(tmp_path / "s.jsonl", [{"tokens": w, "tags": t} for w, t in SENTENCES])
    csv_rows = "".join('"' + json.dumps(w).replace('"', '""') + '","'
                       + json.dumps(t).replace('"', '""') + '"\n' for w, t in SENTENCES)
    (tmp_path / "s.csv").write_text("tokens,tags\n" + csv_rows)
    expected = [{"tokens": w, "tags": t} for w, t in SENTENCES]
    for name in ("s.conll", "s.jsonl", "s.csv"):
        records, report = load_records(tmp_path / name)
        assert report.format == "tagging", name
        assert [r.data for r in records] == expected, name
    records, report = load_records(tmp_path / "s.conll")
    # a sentence is numbered by its first line (comments and document markers skipped)
    assert [r.where.rsplit(":", 1)[1] for r in records] == ["4", "12", "17"]
    assert report.total == 3 and not report.malformed


def test_conll_crlf_bom_and_suffixes(tmp_path):
    text = "\ufeffJohn B-PER\r\nlives O\r\n\r\nin O\r\n"
    for suffix in (".iob", ".bio", ".CONLL"):
        path = tmp_path / f"d{suffix}"
        path.write_bytes(text.encode())
        records, _ = load_records(path)
        assert [r.data["tokens"] for r in records] == [["John", "lives"], ["in"]], suffix


def test_conll_hash_token_is_a_token_and_comment_is_skipped(tmp_path):
    path = tmp_path / "h.conll"
    path.write_text("# text = # is a token\n# O\nis O\n#nyc B-LOC\n")
    records, _ = load_records(path)
    assert records[0].data == {"tokens": ["#", "is", "#nyc"], "tags": ["O", "O", "B-LOC"]}
    assert records[0].where.endswith(":2")


def test_conll_single_column_line_costs_its_sentence_only(tmp_path):
    path = tmp_path / "bad.conll"
    path.write_bytes(b"John B-PER\nlives\nhere O\n\nParis B-LOC\n\nBer\xfflin B-LOC\n\n"
                     b"Rome B_LOC\nis O\n")
    records, report = load_records(path)
    assert [r.data["tokens"] for r in records] == [["Paris"]]
    assert report.malformed == [
        (1, "line 2 has one column ('lives'); expected a token and a tag"),
        (7, "not valid UTF-8"),
        (9, "tags[0] is 'B_LOC', not a BIO tag (O, B-TYPE or I-TYPE)")]
    assert report.total == 4 and report.kept == 1


def test_malformed_tagging_records_are_counted_with_reasons(tmp_path):
    rows = [
        {"tokens": ["a", "b"], "tags": ["O", "B-X"]},
        {"tokens": ["a", "b", "c", "d", "e"], "tags": ["O", "O", "O", "O"]},
        {"tokens": ["a"], "tags": ["B_PER"]},
        {"tokens": ["a", "b"], "tags": ["O", "b-per"]},
        {"tokens": ["a", " "], "tags": ["O", "O"]},
        {"tokens": "a b", "tags": ["O", "O"]},
        {"tokens": ["a", 1], "tags": ["O", "O"]},
        {"tokens": [], "tags": []},
        {"tokens": [" a", "b "], "tags": ["O", "B-X"]},  # a duplicate of line 1
        {"tokens": ["c"], "tags": ["B-"]},
        {"tokens": ["c"], "tags": ["I-MISC"], "id": 7},
    ]
    records, report = load_records(write_jsonl(tmp_path / "m.jsonl", rows))
    assert report.malformed == [
        (2, "tokens and tags differ in length (5 vs 4)"),
        (3, "tags[0] is 'B_PER', not a BIO tag (O, B-TYPE or I-TYPE)"),
        (4, "tags[1] is 'b-per', not a BIO tag (O, B-TYPE or I-TYPE)"),
        (5, "tokens[1] is blank: a token is a word"),
        (6, "column 'tokens' is not valid JSON (Expecting value)"),
        (7, "tokens[1] must be a string, got int"),
        (10, "tags[0] is 'B-', not a BIO tag (O, B-TYPE or I-TYPE)")]
    assert report.empty_at == [8] and report.duplicate_at == [9]
    # kept as written, extra columns included
    assert [r.data for r in records] == [rows[0], rows[10]]


def test_tag_set_puts_o_first_and_label_set_ignores_tagging(tmp_path):
    records, _ = load_records([{"tokens": w, "tags": t} for w, t in SENTENCES])
    assert tag_set(records) == ["O", "B-LOC", "B-PER", "I-LOC"]
    assert label_set(records) == []
    only_entities, _ = load_records([{"tokens": ["Rome"], "tags": ["B-LOC"]}])
    assert tag_set(only_entities) == ["O", "B-LOC"]
    text, _ = load_records([{"text": "x"}])
    assert tag_set(text) == []


def test_tagging_mixed_with_another_format_is_refused(tmp_path):
    rows = [{"tokens": ["a"], "tags": ["O"]}] * 2 + [{"text": "x"}]
    with pytest.raises(ValueError, match="mixes record formats: 2 tagging"):
        load_records(write_jsonl(tmp_path / "mix.jsonl", rows))


# --------------------------------------------------------------------------- entities

@pytest.mark.parametrize("tags, spans", [
    ([], []),
    (["O", "O"], []),
    (["B-PER", "I-PER", "O"], [("PER", 0, 2)]),
    (["B-PER", "B-PER"], [("PER", 0, 1), ("PER", 1, 2)]),  # B after B: two entities
    (["O", "I-LOC", "I-LOC"], [("LOC", 1, 3)]),  # I after O starts one
    (["I-LOC"], [("LOC", 0, 1)]),
    (["B-PER", "I-LOC", "I-LOC"], [("PER", 0, 1), ("LOC", 1, 3)]),  # I of another type
    (["B-PER", "I-PER", "B-LOC", "I-PER"], [("PER", 0, 2), ("LOC", 2, 3), ("PER", 3, 4)]),
    (["B-DATE-TIME", "I-DATE-TIME"], [("DATE-TIME", 0, 2)]),  # the type is after the 1st dash
])
def test_entity_spans(tags, spans):
    assert entity_spans(tags) == spans


@pytest.mark.parametrize("bad", ["X", "B_PER", "B-", "E-PER"])
def test_entity_spans_refuses_non_bio_tags(bad):
    with pytest.raises(ValueError, match=f"tag 1 is {bad!r}"):
        entity_spans(["O", bad])


def test_entity_metrics_hand_computed():
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-PER"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "I-ORG", "B-PER"]]
    m = entity_metrics(true, pred)
    # true: PER x2, LOC, ORG[0:1]; predicted: PER x2, ORG[0:2] (a partial span: one false
    # positive and one false negative); correct: the two PER.
    assert (m["entities"], m["predicted"], m["correct"]) == (4, 3, 2)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx(4 / 7)
    assert m["per_type"] == {
        "LOC": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},
        "ORG": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},
        "PER": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}}
    assert m["token_accuracy"] == pytest.approx(5 / 7)


def test_entity_metrics_types_only_predicted_and_zero_division():
    m = entity_metrics([["O", "B-LOC", "I-LOC"]], [["B-MISC", "B-LOC", "I-LOC"]])
    assert m["per_type"]["MISC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["per_type"]["LOC"]["f1"] == 1.0
    assert (m["precision"], m["recall"]) == (pytest.approx(0.5), 1.0)
    empty = entity_metrics([["O"]], [["O"]])
    assert (empty["precision"], empty["recall"], empty["f1"], empty["token_accuracy"]) == (
        0.0, 0.0, 0.0, 1.0)
    assert entity_metrics([], [])["token_accuracy"] == 0.0


def test_entity_metrics_refuses_misaligned_predictions():
    with pytest.raises(ValueError, match="sequence 1: 2 true tags but 1 predicted"):
        entity_metrics([["O"], ["O", "O"]], [["O"], ["O"]])
    with pytest.raises(ValueError, match="2 true sequences but 1 predicted"):
        entity_metrics([["O"], ["O"]], [["O"]])


def _random_tags(rng, n):
    return [rng.choice(["O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG"]) for _ in range(n)]


def test_entity_metrics_equal_seqeval():
    seqeval = pytest.importorskip("seqeval.metrics")
    from seqeval.metrics.sequence_labeling import get_entities
    rng = random.Random(0)
    true = [_random_tags(rng, rng.randint(1, 12)) for _ in range(300)]
    pred = [[t if rng.random() < 0.7 else _random_tags(rng, 1)[0] for t in seq] for seq in true]
    for seq in true[:100]:
        # seqeval's ends are inclusive
        assert entity_spans(seq) == [(k, s, e + 1) for k, s, e in get_entities(seq)]
    m = entity_metrics(true, pred)
    assert m["precision"] == pytest.approx(seqeval.precision_score(true, pred))
    assert m["recall"] == pytest.approx(seqeval.recall_score(true, pred))
    assert m["f1"] == pytest.approx(seqeval.f1_score(true, pred))
    assert m["token_accuracy"] == pytest.approx(seqeval.accuracy_score(true, pred))
    report = seqeval.classification_report(true, pred, output_dict=True, zero_division=0)
    for kind, scores in m["per_type"].items():
        assert scores["precision"] == pytest.approx(report[kind]["precision"]), kind
        assert scores["recall"] == pytest.approx(report[kind]["recall"]), kind
        assert scores["f1"] == pytest.approx(report[kind]["f1-score"]), kind
        assert scores["support"] == report[kind]["support"], kind


# --------------------------------------------------------------------------- sub-tokens

def test_align_labels_first_sub_token_only():
    assert align_labels([None, 0, 1, 1, 1, 2, None], [5, 6, 7]) == [
        IGNORE_INDEX, 5, 6, IGNORE_INDEX, IGNORE_INDEX, 7, IGNORE_INDEX]
    assert align_labels([0, 0], [3], ignore_index=-1) == [3, -1]
    with pytest.raises(ValueError, match="word id 2 is out of range for 2 word tags"):
        align_labels([0, 2], [1, 1])


def test_real_wordpiece_tokenizer_labels_first_sub_token_and_reads_it_back():
    tokenizer = wordpiece_tokenizer()
    records, _ = load_records([{"tokens": w, "tags": t} for w, t in SENTENCES])
    tags = tag_set(records)
    tag2id = {t: i for i, t in enumerate(tags)}
    dataset, report = tokenize_tagging(records, tokenizer, tag2id, max_length=32)
    assert report.truncated == 0 and report.kept == 3 and not report.words_cut

    # "Washington" -> wash ##ing ##ton: only "wash" carries B-PER
    item = dataset[1]
    assert tokenizer.convert_ids_to_tokens(item["input_ids"].tolist()) == [
        "[CLS]", "wash", "##ing", "##ton", "lives", ".", "[SEP]"]
    assert item["labels"].tolist() == [IGNORE_INDEX, tag2id["B-PER"], IGNORE_INDEX,
                                       IGNORE_INDEX, tag2id["O"], tag2id["O"], IGNORE_INDEX]
    assert item["input_ids"].dtype == item["labels"].dtype == torch.long
    assert dataset.word_ids[1] == [None, 0, 0, 0, 1, 2, None]
    # every word is labelled exactly once
    for i, record in enumerate(records):
        labelled = [x for x in dataset[i]["labels"].tolist() if x != IGNORE_INDEX]
        assert labelled == [tag2id[t] for t in record.data["tags"]]
    # a perfect model's token predictions read back to the word tags; the tokens that carry
    # no label predict garbage, which must not leak into the words
    for i, record in enumerate(records):
        labels = dataset[i]["labels"]
        logits_argmax = labels.where(labels != IGNORE_INDEX, tag2id["B-LOC"])
        assert predictions_to_word_tags(logits_argmax, dataset.word_ids[i], tags,
                                        n_words=dataset.n_words[i]) == record.data["tags"]


def test_truncation_keeps_sep_and_reports_cut_words():
    tokenizer = wordpiece_tokenizer()
    records, _ = load_records([{"tokens": w, "tags": t} for w, t in SENTENCES])
    tag2id = {t: i for i, t in enumerate(tag_set(records))}
    dataset, report = tokenize_tagging(records, tokenizer, tag2id, max_length=4)
    assert report.truncated == 2  # the third sentence is exactly [CLS] in york [SEP]
    assert report.words_cut == [(records[0].where, 4), (records[1].where, 2)]
    assert "6 words cut off in 2 examples" in str(report)
    assert tokenizer.convert_ids_to_tokens(dataset[0]["input_ids"].tolist()) == [
        "[CLS]", "john", "lives", "[SEP]"]
    # the word cut inside ("Washington" keeps wash ##ing) still has its first sub-token
    assert tokenizer.convert_ids_to_tokens(dataset[1]["input_ids"].tolist()) == [
        "[CLS]", "wash", "##ing", "[SEP]"]
    assert dataset[1]["labels"].tolist() == [IGNORE_INDEX, tag2id["B-PER"], IGNORE_INDEX,
                                             IGNORE_INDEX]
    assert max(dataset.lengths) == 4
    # words cut off read back as "O", so they count as missed entities
    words = predictions_to_word_tags([0, 2, 0, 0], dataset.word_ids[1], list(tag2id),
                                     n_words=dataset.n_words[1])
    assert words == ["B-PER", "O", "O"]
    with pytest.raises(ValueError, match="max_length=2 leaves no room for a word"):
        tokenize_tagging(records, tokenizer, tag2id, max_length=2)


def test_unknown_tag_and_wrong_record_format_are_refused():
    tokenizer = wordpiece_tokenizer()
    records, _ = load_records([{"tokens": ["john"], "tags": ["B-PER"]}])
    with pytest.raises(ValueError, match=r"records\[0\]: tag 'B-PER' is not in the tag set"):
        tokenize_tagging(records, tokenizer, {"O": 0}, max_length=8)
    text, _ = load_records([{"text": "john"}])
    with pytest.raises(ValueError, match="not a tagging record"):
        tokenize_tagging(text, tokenizer, {"O": 0}, max_length=8)


def _byte_level_tokenizer(add_prefix_space: bool) -> PreTrainedTokenizerFast:
    vocab = {"a": 0, "b": 1, "Ġ": 2, "Ġa": 3, "Ġb": 4}
    backend = Tokenizer(models.BPE(vocab, [("Ġ", "a"), ("Ġ", "b")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def test_byte_level_bpe_needs_add_prefix_space():
    records, _ = load_records([{"tokens": ["a", "b"], "tags": ["B-X", "O"]}])
    tag2id = {"O": 0, "B-X": 1}
    with pytest.raises(ValueError, match="add_prefix_space=True"):
        tokenize_tagging(records, _byte_level_tokenizer(False), tag2id, max_length=8)
    dataset, _ = tokenize_tagging(records, _byte_level_tokenizer(True), tag2id, max_length=8)
    assert dataset[0]["input_ids"].tolist() == [3, 4]  # "Ġa Ġb", as in running text
    assert dataset[0]["labels"].tolist() == [1, 0]
