"""Data: local files, saved datasets, hub names (mocked), image folders; packing, chat templates, labels, splits."""

import json

import pytest
import tiny_hf as T
import torch

from mua_cli.errors import MuaError
from mua_cli.train.data import load_lm_data, load_text_data
from mua_cli.train.sources import open_source, record_labels, record_texts, split_indices


@pytest.fixture(scope="module")
def tok():
    return T.tokenizer()


def test_embedded_path_is_the_byte_level_stream_exactly():
    a = load_text_data("embedded:britannica", 64, 0.1)
    b = load_lm_data("embedded:britannica", 64, 0.1)
    assert torch.equal(a.train, b.train) and torch.equal(a.eval, b.eval)


def test_text_file_with_and_without_tokenizer(tmp_path, tok):
    p = tmp_path / "t.txt"
    p.write_text("\n".join(T.sentences(50)))
    raw = load_lm_data(str(p), 16, 0.1)
    assert raw.train.max() < 256  # bytes
    toks = load_lm_data(str(p), 16, 0.1, tokenizer=tok)
    assert len(toks.train) < len(raw.train)  # BPE is shorter than bytes
    assert len(toks.eval) >= 17


def test_jsonl_records_are_split_by_document_and_packed_with_eos(tmp_path, tok):
    p = T.lm_jsonl(tmp_path / "d.jsonl", n=100)
    data = load_lm_data(str(p), 16, 0.2, tokenizer=tok)
    eos = tok.eos_token_id
    n_docs = int((data.train == eos).sum()) + int((data.eval == eos).sum())
    assert n_docs == 100 and int((data.eval == eos).sum()) == 20
    # the same split every time, whatever the trial seed
    again = load_lm_data(str(p), 16, 0.2, tokenizer=tok)
    assert torch.equal(data.train, again.train)


def test_messages_use_the_chat_template(tmp_path, tok):
    p = T.chat_jsonl(tmp_path / "c.jsonl", n=10)
    texts = record_texts(open_source(str(p)).records, "text", tok)
    assert texts[0].startswith("<|user|>") and "<|assistant|>" in texts[0]
    plain = record_texts(open_source(str(p)).records, "text", None)  # no tokenizer: plain role lines
    assert plain[0].startswith("user: ")
    data = load_lm_data(str(p), 16, 0.1, tokenizer=tok)
    assert len(data.train) > 100


def test_several_text_fields_and_missing_field(tmp_path):
    p = tmp_path / "i.jsonl"
    p.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(5)))
    recs = open_source(str(p)).records
    assert record_texts(recs, "instruction,output")[0] == "q0\na0"
    with pytest.raises(MuaError, match="no text field 'prompt'.*instruction, output"):
        record_texts(recs, "prompt")


def test_csv_labels_by_name(tmp_path):
    recs = open_source(str(T.cls_csv(tmp_path / "d.csv", n=10))).records
    labels, names = record_labels(recs, "sentiment")
    assert names == ["negative", "positive"] and labels[:2] == [0, 1]
    with pytest.raises(MuaError, match="no label field"):
        record_labels(recs, "nope")


def test_integer_labels_and_labels_fallback(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"text": "x", "labels": v}) + "\n" for v in (3, 1, 3, 7)))
    labels, names = record_labels(open_source(str(p)).records, "label")  # falls back to 'labels'
    assert names == ["1", "3", "7"] and labels == [1, 0, 1, 2]


def test_saved_dataset_folder_with_classlabel(tmp_path):
    folder = T.cls_dataset_folder(tmp_path / "ds", n=20)
    recs = open_source(str(folder)).records
    assert len(recs) == 20  # the train split of the DatasetDict
    labels, names = record_labels(recs, "label")
    assert names == ["negative", "positive"] and set(labels) == {0, 1}
    assert record_texts(recs, "sentence")[0] == T.labelled(20)[0]["text"]


def test_image_folder(tmp_path):
    folder = T.image_folder(tmp_path / "img", per_class=3)
    recs = open_source(str(folder)).records
    assert len(recs) == 6
    labels, names = record_labels(recs, "label")
    assert names == ["blue", "red"] and labels == [0, 0, 0, 1, 1, 1]


def test_hub_name_config_and_split_are_parsed(monkeypatch):
    import datasets

    seen = {}

    def fake(name, config=None, split=None):
        seen.update(name=name, config=config, split=split)
        return datasets.Dataset.from_dict({"sentence": ["a b", "c d"], "label": [0, 1]})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    recs = open_source("nyu-mll/glue:sst2@validation").records
    assert seen == {"name": "nyu-mll/glue", "config": "sst2", "split": "validation"} and len(recs) == 2
    open_source("stanfordnlp/imdb")
    assert seen == {"name": "stanfordnlp/imdb", "config": None, "split": "train"}


def test_hub_errors_are_one_line(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach the Hugging Face Hub\nmore lines")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(MuaError, match="cannot load dataset 'owner/name': Couldn't reach") as e:
        open_source("owner/name")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        ("", ".jsonl", "empty"),
        ("   \n", ".txt", "empty"),
        ('{"text": "a"}\nnot json\n', ".jsonl", "line 2: not valid JSON"),
        ("x", ".docx", "unknown type"),
        ('{"text": ""}\n', ".jsonl", "blank"),
    ],
)
def test_bad_files_are_clear_errors(tmp_path, content, suffix, message):
    p = tmp_path / f"d{suffix}"
    p.write_text(content)
    with pytest.raises(MuaError, match=message):
        load_lm_data(str(p), 16, 0.1)


def test_missing_paths_and_bad_folders(tmp_path):
    with pytest.raises(MuaError, match="does not exist"):
        open_source(str(tmp_path / "nope.jsonl"))
    with pytest.raises(MuaError, match="does not exist"):
        open_source("./data/train.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MuaError, match="neither a saved dataset"):
        open_source(str(tmp_path / "empty"))
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    with pytest.raises(MuaError, match="no images"):
        open_source(str(tmp_path / "noimg"))


def test_too_small_dataset(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "tiny"}) + "\n")
    with pytest.raises(MuaError, match="too small"):
        load_lm_data(str(p), 64, 0.1)


def test_split_indices_fixed_and_disjoint():
    a, b = split_indices(50, 0.2)
    assert (a, b) == split_indices(50, 0.2)
    assert len(b) == 10 and not set(a) & set(b) and sorted(a + b) == list(range(50))
    assert len(split_indices(5, 0.1)[1]) == 1  # at least one held-out record
    assert split_indices(5, 0.0)[1] == []


def test_a_csv_with_a_byte_order_mark_and_a_pretty_printed_json_read_as_written(tmp_path):
    """Excel's CSV starts with a UTF-8 BOM, which was read into the first field's name ("no field 'text'; its
    fields: text"); a .json pretty-printed over many lines was read as JSON Lines ("line 1: not valid JSON")."""
    bom = tmp_path / "excel.csv"
    bom.write_bytes("\ufefftext,label\nhello there,pos\nbad day,neg\n".encode())
    recs = open_source(str(bom)).records
    assert recs.columns == ["text", "label"] and record_texts(recs, "text", None)[0] == "hello there"
    pretty = tmp_path / "pretty.json"
    pretty.write_text('[\n  {\n    "text": "one"\n  },\n  {\n    "text": "two"\n  }\n]\n')
    assert record_texts(open_source(str(pretty)).records, "text", None) == ["one", "two"]
    one = tmp_path / "one.json"
    one.write_text('{\n  "text": "alone"\n}\n')
    assert record_texts(open_source(str(one)).records, "text", None) == ["alone"]
