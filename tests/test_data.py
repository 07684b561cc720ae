"""Loading and cleaning of fine-tuning records (trilora.trainer.data, its file readers in data_files);
splitting and mixing are in test_data_mix.py."""
import json

import pytest
from _data_helpers import write_jsonl

from trilora.trainer import label_set, load_records


# --------------------------------------------------------------------------- formats

def test_alpaca_jsonl_detected_with_and_without_input(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Add", "input": "1 2", "output": "3"},
        {"instruction": "Greet", "output": "hello"},
        {"instruction": "Greet", "input": None, "output": "hi"},
    ])
    records, report = load_records(path)
    assert report.format == "alpaca" and report.kept == 3
    assert [r.data["input"] for r in records] == ["1 2", "", ""]
    assert records[1].where == f"{path}:2"


def test_prompt_completion_csv_with_multiline_cell(tmp_path):
    path = tmp_path / "pc.csv"
    path.write_text('prompt,completion\n"two\nlines",  ok  \nq,a\n')
    records, report = load_records(path)
    assert report.format == "prompt_completion"
    # text is the user's bytes: nothing stripped
    assert [r.data for r in records] == [{"prompt": "two\nlines", "completion": "  ok  "},
                                         {"prompt": "q", "completion": "a"}]
    assert records[1].where.endswith(":4")  # the quoted cell spans lines 2-3


def test_text_is_kept_exactly_blank_is_still_empty():
    records, report = load_records([{"prompt": " rotate: ab = ", "completion": " ba \n"},
                                    {"prompt": "p", "completion": "   "}])
    assert [r.data for r in records] == [{"prompt": " rotate: ab = ", "completion": " ba \n"}]
    assert report.empty == 1
    records, _ = load_records([{"instruction": " i ", "output": "\tx "}])
    assert records[0].data["output"] == "\tx " and records[0].data["instruction"] == " i "


def test_chat_jsonl_and_chat_in_csv(tmp_path):
    conversation = [{"role": "user", "content": " hi "}, {"role": "assistant", "content": "yo"}]
    records, report = load_records(write_jsonl(tmp_path / "c.jsonl", [{"messages": conversation}]))
    assert report.format == "chat"
    assert records[0].data["messages"][0] == {"role": "user", "content": " hi "}
    path = tmp_path / "c.csv"
    path.write_text("messages\n" + '"' + json.dumps(conversation).replace('"', '""') + '"\n')
    records_csv, _ = load_records(path)
    assert records_csv[0].data == records[0].data


def test_text_and_classification_detection_and_label_set(tmp_path):
    text, report = load_records([{"text": "a"}, {"text": "b", "label": "stray"}, {"text": "c"}])
    assert report.format == "text" and len(text) == 3
    rows = [{"text": "good", "label": 1}, {"text": "bad", "label": 0},
            {"text": "fine", "label": "1"}, {"text": "no label"}]
    records, report = load_records(write_jsonl(tmp_path / "cls.jsonl", rows))
    # One record without a label does not demote the file to plain text: it is malformed.
    assert report.format == "classification"
    assert report.malformed == [(4, "missing required column 'label'")]
    assert label_set(records) == ["0", "1"]
    forced, _ = load_records(write_jsonl(tmp_path / "f.jsonl", rows), format="text")
    assert [r.format for r in forced] == ["text"] * 4


def test_json_array_and_python_list(tmp_path):
    rows = [{"prompt": "p", "completion": "c"}, {"prompt": "q", "completion": "d"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    from_file, report = load_records(tmp_path / "d.json")
    from_list, _ = load_records(rows)
    assert report.unit == "item" and [r.data for r in from_file] == rows
    assert from_file[1].where.endswith("d.json[1]")
    assert [r.data for r in from_list] == rows and from_list[1].where == "records[1]"


# --------------------------------------------------------------------------- cleaning

def test_cleaning_report_counts_reasons_and_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "dirty.jsonl", [
        {"instruction": "Add", "output": "3"},              # 1 kept
        "",                                                  # 2 blank line: skipped
        '{"instruction": "broken", "output": ',              # 3 bad JSON
        {"instruction": "Sub", "output": "1"},               # 4 kept
        {"instruction": ["not", "a", "string"], "output": "x"},  # 5 wrong type
        {"instruction": "no output"},                        # 6 missing column
        {"instruction": "Mul", "output": "   "},             # 7 empty after stripping
        {"instruction": "  Add ", "output": "3\n"},          # 8 duplicate of 1 once stripped
        '[1, 2]',                                            # 9 not an object
    ])
    records, report = load_records(path)
    assert [r.data["instruction"] for r in records] == ["Add", "Sub"]
    assert (report.total, report.kept, report.blank_lines) == (8, 2, 1)
    assert [n for n, _ in report.malformed] == [3, 5, 6, 9]
    assert "invalid JSON" in report.malformed[0][1]
    assert report.malformed[1][1] == "column 'instruction' must be a string, got list"
    assert report.malformed[2][1] == "missing required column 'output'"
    assert report.empty_at == [7] and report.duplicate_at == [8] and report.dropped == 6
    text = str(report)
    assert "kept 2 of 8" in text and "1 empty, 1 duplicate, 4 malformed" in text
    assert "line 3: invalid JSON" in text and "line 9: expected an object" in text


def test_csv_wrong_column_count_and_bad_utf8_are_malformed(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("text,label\na,pos\nb,neg,extra\nc\nd,neg\n")
    records, report = load_records(path)
    assert [r.data["text"] for r in records] == ["a", "d"]
    assert [n for n, _ in report.malformed] == [3, 4]
    path = tmp_path / "u.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    _, report = load_records(path)
    assert report.malformed == [(2, "not valid UTF-8")]


def test_chat_without_assistant_turn_is_malformed():
    hello = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]
    rows = [{"messages": hello},
            {"messages": [{"role": "user", "content": "only a question"}]},
            {"messages": [{"role": "user"}]},
            {"messages": []}]
    records, report = load_records(rows)
    assert len(records) == 1 and report.empty_at == [3]
    assert report.malformed == [(1, "chat record has no assistant turn"),
                                (2, "messages[0] needs string 'role' and 'content'")]


# --------------------------------------------------------------------------- bad input

def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found: .*nope.jsonl"):
        load_records(tmp_path / "nope.jsonl")


def test_unknown_extension(tmp_path):
    (tmp_path / "d.txt").write_text("hello\n")
    with pytest.raises(ValueError, match=r"unsupported data file extension .*d\.txt"):
        load_records(tmp_path / "d.txt")


def test_unknown_format():
    with pytest.raises(ValueError, match="unknown record format 'sharegpt'; known formats"):
        load_records([{"text": "a"}], format="sharegpt")


def test_every_line_malformed(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ["{oops", "not json", '{"text": 5'])
    with pytest.raises(ValueError, match=r"every record in .*bad.jsonl is malformed \(line 1: "
                                         r"invalid JSON.*line 3: invalid JSON"):
        load_records(path)


def test_required_column_missing_from_whole_file(tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "p", "completion": "c"}] * 3)
    with pytest.raises(ValueError, match="required column 'instruction' of format 'alpaca' is "
                                         "missing from every record"):
        load_records(path, format="alpaca")


def test_undetectable_format():
    with pytest.raises(ValueError, match=r"cannot detect the record format .*\['question'\]"):
        load_records([{"question": "q"}])


def test_nothing_left_after_cleaning(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", [{"text": "  "}, {"text": ""}])
    with pytest.raises(ValueError, match="no usable records left in .*2 empty"):
        load_records(path)
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="contains no records"):
        load_records(tmp_path / "blank.jsonl")


# --------------------------------------------------------------------------- one bad record costs one record

def _bad_utf8_files(tmp_path):
    """The same three records, the second with an undecodable byte, in each file kind."""
    good = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p3", "completion": "c3"}]
    jsonl = tmp_path / "u.jsonl"
    jsonl.write_bytes(b'{"prompt": "p1", "completion": "c1"}\n{"prompt": "p\xff", "completion": "c2"}\n'
                      b'{"prompt": "p3", "completion": "c3"}\n')
    csv_ = tmp_path / "u.csv"
    csv_.write_bytes(b"prompt,completion\np1,c1\np\xff,c2\np3,c3\n")
    array = tmp_path / "u.json"
    array.write_bytes(b'[{"prompt": "p1", "completion": "c1"}, {"prompt": "p\xff", "completion": "c2"},'
                      b' {"prompt": "p3", "completion": "c3"}]')
    return good, [(jsonl, 2), (csv_, 3), (array, 1)]


def test_non_utf8_byte_drops_its_record_in_every_file_kind(tmp_path):
    good, files = _bad_utf8_files(tmp_path)
    for path, where in files:
        records, report = load_records(path)
        assert [r.data for r in records] == good, path
        assert report.malformed == [(where, "not valid UTF-8")], path


def test_lone_surrogate_escape_is_not_text():
    records, report = load_records([{"text": "fine"}, {"text": "bad \udc80"}])
    assert [r.data["text"] for r in records] == ["fine"]
    assert report.malformed == [(1, "not valid UTF-8")]


def test_byte_order_mark_is_accepted_in_every_file_kind(tmp_path):
    rows = [{"prompt": "p", "completion": "c"}]
    bom = b"\xef\xbb\xbf"
    (tmp_path / "b.json").write_bytes(bom + json.dumps(rows).encode())
    (tmp_path / "b.jsonl").write_bytes(bom + json.dumps(rows[0]).encode() + b"\n")
    (tmp_path / "b.csv").write_bytes(bom + b"prompt,completion\np,c\n")
    for name in ("b.json", "b.jsonl", "b.csv"):
        records, _ = load_records(tmp_path / name)
        assert [r.data for r in records] == rows, name


def test_overlong_integer_costs_its_record_not_the_file(tmp_path):
    digits = "9" * 5000
    path = tmp_path / "n.jsonl"
    path.write_text('{"text": "a", "label": 1}\n'
                    f'{{"text": "b", "label": {digits}}}\n'
                    '{"text": "c", "label": 2}\n')
    records, report = load_records(path)
    assert [r.data["label"] for r in records] == ["1", "2"]
    assert report.malformed == [(2, "a number with 5000 digits (more than Python reads)")]
    array = tmp_path / "n.json"
    array.write_text(f'[{{"text": "a", "label": 1}}, {{"text": "b", "n": -{digits}, "label": 0}}]')
    records, report = load_records(array)
    assert [r.data["text"] for r in records] == ["a"] and report.malformed[0][0] == 1


def test_deeply_nested_line_is_dropped_and_counted(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text('{"text": "a"}\n' + '{"text": ' + "[" * 200_000 + "]" * 200_000 + "}\n"
                    '{"text": "c"}\n')
    records, report = load_records(path)
    assert [r.data["text"] for r in records] == ["a", "c"]
    assert report.malformed == [(2, "nested too deeply to parse")]
    array = tmp_path / "deep.json"
    array.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ValueError, match=r"deep\.json is nested too deeply to parse"):
        load_records(array)


@pytest.mark.parametrize("label", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_label_is_malformed_not_a_class(tmp_path, label):
    path = tmp_path / "l.jsonl"
    path.write_text(f'{{"text": "a", "label": 1.5}}\n{{"text": "b", "label": {label}}}\n'
                    '{"text": "c", "label": "x"}\n')
    records, report = load_records(path)
    assert label_set(records) == ["1.5", "x"]
    assert report.malformed == [(2, f"label is {float(label)!r}, not a class")]


def test_file_mixing_two_record_formats_is_refused_not_half_dropped(tmp_path):
    rows = ([{"instruction": f"i{k}", "output": "o"} for k in range(3)] +
            [{"prompt": f"p{k}", "completion": "c"} for k in range(2)])
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(ValueError, match=r"mixed\.jsonl mixes record formats: 3 alpaca \(first at "
                                         r"line 1\), 2 prompt_completion \(first at line 4\); .*"
                                         r"--data-format"):
        load_records(path)
    # forcing a format keeps its records and reports the others
    records, report = load_records(path, format="alpaca")
    assert report.kept == 3 and [n for n, _ in report.malformed] == [4, 5]
    # a classification row without its label is a missing column, not a second schema
    records, report = load_records([{"text": "a", "label": "x"}, {"text": "b"}])
    assert report.format == "classification" and report.malformed == [(1, "missing required column 'label'")]


def test_json_in_a_csv_cell_costs_its_record_not_the_file(tmp_path):
    """A messages / tokens cell's JSON is held to a JSONL line's rules: overlong numbers,
    escaped lone surrogates and deep nesting cost the record, they do not crash the load."""
    def cell(value):
        return '"' + value.replace('"', '""') + '"'

    good = json.dumps([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    bad = {"overlong": '[{"role": "user", "content": ' + "9" * 5000 + "}]",
           "surrogate": '[{"role": "user", "content": "\\udc80"}]',
           "deep": "[" * 50_000 + "]" * 50_000}
    path = tmp_path / "m.csv"
    path.write_text("messages\n" + "\n".join(cell(v) for v in [good, *bad.values()]) + "\n")
    records, report = load_records(path)
    assert len(records) == 1
    assert report.malformed == [
        (3, "column 'messages': a number with 5000 digits (more than Python reads)"),
        (4, "column 'messages': not valid UTF-8"),
        (5, "column 'messages' is nested too deeply to parse")]
    path = tmp_path / "t.csv"
    path.write_text('tokens,tags\n"[""a""]","[""O""]"\n"[""\\udc80""]","[""O""]"\n')
    records, report = load_records(path)
    assert records[0].data == {"tokens": ["a"], "tags": ["O"]}
    assert report.format == "tagging"
    assert report.malformed == [(3, "column 'tokens': not valid UTF-8")]
