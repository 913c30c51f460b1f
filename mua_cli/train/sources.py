"""Where data comes from: the embedded corpora, local text / JSONL / CSV / Parquet files, Hugging Face datasets
(a hub name or a `save_to_disk` folder) and image folders (one subfolder per class), read as plain text or as a
table of records; the records' texts, labels and fixed train / held-out split."""

from __future__ import annotations

import contextlib
import gzip
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MuaError

CORPORA_DIR = Path(__file__).resolve().parent.parent / "corpora"
EMBEDDED_CORPORA = {
    "shakespeare": "shakespeare_plays.txt.gz",  # corpus A: pretraining the embedded default
    "britannica": "britannica_1911.txt.gz",  # corpus B: finetuning
}


def read_text(spec: str) -> str:
    """Text of an embedded corpus (`embedded:NAME`) or a local text file."""
    if spec.startswith("embedded:"):
        name = spec.split(":", 1)[1]
        if name not in EMBEDDED_CORPORA:
            raise MuaError(f"no embedded corpus {name!r}; choose from {', '.join(EMBEDDED_CORPORA)}")
        with gzip.open(CORPORA_DIR / EMBEDDED_CORPORA[name], "rt", encoding="utf-8") as f:
            return f.read()
    p = Path(spec)
    if not p.is_file():
        raise MuaError(f"data file {spec} does not exist")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MuaError(f"data file {spec} is not UTF-8 text") from None


TEXT_SUFFIXES = (".txt", ".text", ".md")
RECORD_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLIT_SEED = 0  # the train / held-out split of records is fixed, whatever the trial's seed


class Records:
    """A table of records: a list of dicts (local files, image folders) or a `datasets.Dataset`.

    Columns are read whole (`column`), single cells lazily (`cell`, for images)."""

    def __init__(self, name: str, rows: list[dict] | None = None, dataset=None, label_names: list[str] | None = None):
        self.name, self.rows, self.dataset = name, rows, dataset
        self._label_names = label_names

    def __len__(self) -> int:
        return len(self.dataset) if self.dataset is not None else len(self.rows)

    @property
    def columns(self) -> list[str]:
        if self.dataset is not None:
            return list(self.dataset.column_names)
        cols: dict[str, None] = {}
        for r in self.rows[:100]:
            cols.update(dict.fromkeys(r))
        return list(cols)

    def column(self, name: str, indices: list[int] | None = None) -> list:
        """A column's values, for all records or for `indices` (in that order)."""
        if self.dataset is not None:
            if indices is None:
                return list(self.dataset[name])
            return list(self.dataset.select_columns([name])[list(indices)][name]) if len(indices) else []
        if indices is None:
            return [r.get(name) for r in self.rows]
        return [self.rows[i].get(name) for i in indices]

    def cell(self, i: int, name: str):
        if self.dataset is not None:
            return self.dataset[int(i)][name]
        return self.rows[int(i)].get(name)

    def feature(self, name: str):
        """The `datasets` feature of a column (ClassLabel, Image, ...), or None."""
        if self.dataset is None:
            return None
        return self.dataset.features.get(name)

    def class_names(self, name: str) -> list[str] | None:
        feat = self.feature(name)
        if feat is not None and hasattr(feat, "names") and getattr(feat, "num_classes", None):
            return list(feat.names)
        return self._label_names

    def need(self, name: str, what: str) -> None:
        if name not in self.columns:
            raise MuaError(
                f"dataset {self.name} has no {what} field {name!r}; its fields: {', '.join(self.columns) or '(none)'}"
                f" (set text_field / label_field in the recipe)"
            )


@dataclass
class Source:
    """What `--data` names: a plain text (LM only) or a table of records."""

    name: str
    text: str | None = None
    records: Records | None = None


def open_source(spec: str) -> Source:
    """Open `--data`: `embedded:NAME`, a local file or folder, or a Hugging Face dataset `NAME[:CONFIG][@SPLIT]`."""
    spec = str(spec).strip()
    if not spec:
        raise MuaError("no dataset given; set data in the recipe or --data")
    if spec in EMBEDDED_RECORDS:
        return Source(spec, records=corpus_passages())
    if spec.startswith("embedded:"):
        return Source(spec, text=read_text(spec))
    p = Path(spec).expanduser()
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix in RECORD_SUFFIXES:
            return Source(spec, records=_read_record_file(p, spec))
        if suffix in TEXT_SUFFIXES or suffix == "":
            return Source(spec, text=read_text(str(p)))
        raise MuaError(
            f"data file {spec}: unknown type {suffix!r}; use .txt, .jsonl, .json, .csv, .tsv or .parquet, "
            "a dataset folder (save_to_disk) or an image folder"
        )
    if p.is_dir():
        return Source(spec, records=_read_folder(p, spec))
    if p.exists():  # /dev/null, a pipe: nothing a sweep can read records or text from
        raise MuaError(f"data {spec} is not a file or a folder (a device, a pipe or a socket)")
    if _looks_local(spec):
        raise MuaError(f"data {spec} does not exist")
    return Source(spec, records=_load_hub_dataset(spec))


EMBEDDED_RECORDS = ("embedded:corpora-cls",)  # classification records made from the embedded corpora


def corpus_passages(per_class: int = 1000, width: int = 200) -> Records:
    """`embedded:corpora-cls`: passages of about `width` characters from each embedded corpus, labelled by the
    corpus they come from (the embedded default for `--task seq-cls`, recipes/tiny-cls.yaml). Fixed: the same
    passages every time, spread evenly over each corpus."""
    rows = []
    for label in EMBEDDED_CORPORA:
        words = read_text(f"embedded:{label}").split()
        chunks, cur = [], []
        for w in words:
            cur.append(w)
            if sum(map(len, cur)) + len(cur) >= width:
                chunks.append(" ".join(cur))
                cur = []
        step = max(1, len(chunks) // per_class)
        rows += [{"text": c, "label": label} for c in chunks[::step][:per_class]]
    return Records("embedded:corpora-cls", rows=rows)


def _looks_local(spec: str) -> bool:
    """A hub dataset is NAME or OWNER/NAME (plus :CONFIG / @SPLIT); anything path-like must exist here."""
    base = spec.split(":", 1)[0].split("@", 1)[0]
    return (
        spec.startswith((".", "/", "~"))
        or base.count("/") > 1
        or Path(base).suffix.lower() in (*TEXT_SUFFIXES, *RECORD_SUFFIXES)
        or "\\" in spec
    )


def _read_record_file(p: Path, spec: str) -> Records:
    import json

    suffix = p.suffix.lower()
    try:
        if suffix == ".parquet":
            import datasets

            datasets.logging.set_verbosity_error()
            datasets.logging.disable_progress_bar()
            with _quiet("datasets.packaged_modules.parquet.parquet"):  # it logs the error we then report
                return Records(spec, dataset=datasets.Dataset.from_parquet(str(p)))
        text = p.read_text(encoding="utf-8-sig")  # a byte-order mark (Excel's CSV) is not part of the first field
        if suffix in (".csv", ".tsv"):
            rows = _csv_rows(text, "\t" if suffix == ".tsv" else ",", spec)
        elif suffix == ".json" and (whole := _whole_json(text, spec)) is not None:
            rows = whole
        else:
            rows = []
            for i, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise MuaError(f"data file {spec}, line {i}: not valid JSON ({e.msg})") from None
                    except RecursionError:
                        raise MuaError(f"data file {spec}: line {i} is nested too deeply to read") from None
    except UnicodeDecodeError:
        raise MuaError(f"data file {spec} is not UTF-8 text") from None
    except (ValueError, OSError) as e:
        if isinstance(e, MuaError):
            raise
        raise MuaError(f"cannot read data file {spec}: {_first_line(e)}") from None
    if not isinstance(rows, list) or any(not isinstance(r, dict) for r in rows):
        raise MuaError(f"data file {spec}: every record must be a JSON object")
    return Records(spec, rows=rows)


def _csv_rows(text: str, delimiter: str, spec: str) -> list[dict]:
    import csv

    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    rows = []
    for row in reader:
        if None in row:  # DictReader keeps a row's fields past the header under the key None
            raise MuaError(
                f"data file {spec}: row {reader.line_num} has more fields than its header ({reader.fieldnames})"
            )
        rows.append(row)
    return rows


def _whole_json(text: str, spec: str) -> list | None:
    """A .json file read whole: an array of records, or one record (pretty-printed over many lines); None where
    it is not one JSON value (JSON Lines under a .json name)."""
    import json

    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        if text.lstrip().startswith("["):
            raise
        return None
    except RecursionError:
        raise MuaError(f"data file {spec}: nested too deeply to read") from None
    return doc if isinstance(doc, list) else [doc]


def _read_folder(p: Path, spec: str) -> Records:
    if any((p / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        import datasets

        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:  # datasets' own errors for a broken folder
            raise MuaError(f"cannot load the dataset folder {spec}: {_first_line(e)}") from None
        return Records(spec, dataset=_pick_split(ds, "train", spec))
    classes = sorted(d.name for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
    rows = [
        {"image": str(f), "label": c}
        for c in classes
        for f in sorted((p / c).rglob("*"))
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if classes and rows:
        return Records(spec, rows=rows, label_names=[c for c in classes if any(r["label"] == c for r in rows)])
    if classes:
        raise MuaError(f"image folder {spec} holds no images in its class subfolders ({', '.join(classes[:5])})")
    raise MuaError(
        f"{spec} is neither a saved dataset (datasets' save_to_disk) nor an image folder (one subfolder per class)"
    )


def _pick_split(ds, split: str, spec: str):
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if split in ds:
            return ds[split]
        if split == "train" and len(ds) >= 1:
            return ds[next(iter(ds))]
        raise MuaError(f"dataset {spec} has no split {split!r}; its splits: {', '.join(ds)}")
    return ds


def _load_hub_dataset(spec: str) -> Records:
    """A Hugging Face hub dataset: NAME[:CONFIG][@SPLIT] (split 'train' by default), from datasets' cache
    or the hub. The held-out part is cut from this one split (recipe eval_fraction)."""
    import datasets

    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as e:  # offline, unknown name, bad config or split: one line for the user
        raise MuaError(f"cannot load dataset {spec!r}: {_first_line(e)}") from None
    return Records(spec, dataset=_pick_split(ds, split or "train", spec))


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def split_indices(n: int, eval_fraction: float) -> tuple[list[int], list[int]]:
    """A fixed shuffle of n records into training and held-out indices."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    n_eval = int(n * eval_fraction)
    if eval_fraction > 0 and n_eval == 0 and n >= 2:
        n_eval = 1
    return order[: n - n_eval], order[n - n_eval :]


# ---------------------------------------------------------------- texts of records


def is_messages(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "content" in m for m in value)


def render_messages(messages: list[dict], tokenizer=None) -> str:
    """A chat as text: the tokenizer's chat template where it has one, else plain 'role: content' lines."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "".join(f"{m.get('role', 'user')}: {m['content']}\n" for m in messages)


def text_fields(records: Records, text_field: str) -> list[str]:
    """The record fields that hold the input text: text_field (comma-separated for several), else 'messages'."""
    fields = [f.strip() for f in str(text_field).split(",") if f.strip()]
    cols = records.columns
    if fields and all(f in cols for f in fields):
        return fields
    if "messages" in cols and fields == ["text"]:
        return ["messages"]
    missing = next(f for f in fields if f not in cols) if fields else text_field
    records.need(missing, "text")
    return fields


def record_texts(records: Records, text_field: str, tokenizer=None, indices: list[int] | None = None) -> list[str]:
    """One text per record (all, or those at `indices`); several fields are joined by a newline; chats go
    through the chat template."""
    fields = text_fields(records, text_field)
    cols = [records.column(f, indices) for f in fields]
    out = []
    for values in zip(*cols, strict=True):
        parts = [render_messages(v, tokenizer) if is_messages(v) else ("" if v is None else str(v)) for v in values]
        out.append("\n".join(parts))
    return out


# ---------------------------------------------------------------- language modelling: packed token streams


def record_labels(records: Records, label_field: str) -> tuple[list[int], list[str]]:
    """Integer labels and their names: a ClassLabel's names, an image folder's classes, else the sorted
    distinct values."""
    field = label_field
    if field not in records.columns:
        field = next((f for f in ("label", "labels") if f in records.columns), label_field)
    records.need(field, "label")
    values = records.column(field)
    if any(v is None or (isinstance(v, str) and not v.strip()) for v in values):
        raise MuaError(f"dataset {records.name}: some records have no {field!r}")
    names = records.class_names(field)
    if names is not None:
        index = {n: i for i, n in enumerate(names)}
        labels = [int(v) if isinstance(v, int) else index[str(v)] for v in values]
        return labels, names
    if any(isinstance(v, float) and not v.is_integer() for v in values):
        raise MuaError(f"dataset {records.name}: {field!r} holds non-integer numbers; classification needs classes")
    if all(isinstance(v, int | float) for v in values):
        distinct = sorted({int(v) for v in values})
        index = {v: i for i, v in enumerate(distinct)}
        return [index[int(v)] for v in values], [str(v) for v in distinct]
    distinct = sorted({str(v) for v in values})
    index = {v: i for i, v in enumerate(distinct)}
    return [index[str(v)] for v in values], distinct


@contextlib.contextmanager
def _quiet(logger: str):
    """A library logger that would print an error mua reports itself, silenced while `with` runs."""
    import logging

    log = logging.getLogger(logger)
    before = log.disabled
    log.disabled = True
    try:
        yield
    finally:
        log.disabled = before
