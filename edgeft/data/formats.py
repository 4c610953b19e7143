"""Dataset sources and row formats, standardised to chat messages (or raw text for continued pretraining).

Sources: JSONL, JSON, CSV/TSV, Parquet and plain-text files, an in-memory ``datasets.Dataset`` (or list of dicts),
and Hugging Face hub dataset names when online (through ``datasets.load_dataset``).

Row formats, detected from the columns:

- messages / ChatML: ``messages`` (or ``conversations``) as a list of ``{"role", "content"}``, multi-turn, system
  prompts allowed;
- ShareGPT: the same columns holding ``{"from", "value"}`` with ``human``/``gpt``/``system`` speakers, standardised
  to role/content;
- alpaca: ``instruction``, optional ``input``, ``output``;
- prompt/completion: ``prompt`` and ``completion`` strings (one user and one assistant turn);
- raw text: ``text`` (continued pretraining: every token is a target; chunked to max_seq_length when encoded);
- any table, through a prompt template merging its columns (see :mod:`edgeft.data.merge`).

Every problem is one line naming the source, the row (the line number for JSONL/CSV) and what was expected.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any, Iterable

from edgeft.errors import EdgeftError

Messages = list[dict[str, str]]
Record = Messages | str  # a conversation, or a raw-text document
_ROLES = {"system", "user", "assistant"}
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "system": "system",
}
FILE_TYPES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")
Row = tuple[str, dict[str, Any]]  # (where: "file:line" or "row i", row)


def is_empty(v: Any) -> bool:
    """None, NaN and blank strings count as missing values (CSV and Parquet write them in all three forms)."""
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def read_rows(path: str | Path) -> list[Row]:
    """Rows of a data file as (where, dict) pairs, in file order."""
    path = Path(path)
    if not path.exists():
        raise EdgeftError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for i, raw in enumerate(path.read_bytes().split(b"\n"), 1):
            line = _decode(raw, path, i)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EdgeftError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise EdgeftError(f"{path}:{i}: expected a JSON object per line, got {type(row).__name__}")
            rows.append((f"{path}:{i}", row))
        return rows
    if suffix == ".json":
        try:
            data = json.loads(read_text(path))
        except json.JSONDecodeError as e:
            raise EdgeftError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))  # {"data": [...]} / {"train": [...]}
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise EdgeftError(f"{path}: expected a JSON list of objects")
        return [(f"{path}: item {i}", r) for i, r in enumerate(data, 1)]
    if suffix in (".csv", ".tsv"):
        return _read_csv(path, "\t" if suffix == ".tsv" else ",")
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise EdgeftError("reading .parquet needs pyarrow: pip install 'edgeft[data]'") from None
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise EdgeftError(f"{path}: not a readable Parquet file ({type(e).__name__}: {str(e)[:120]})") from None
        return [(f"{path}: row {i}", r) for i, r in enumerate(table.to_pylist(), 1)]
    if suffix == ".txt":
        text = read_text(path)
        return [(str(path), {"text": text})] if text.strip() else []
    raise EdgeftError(f"{path}: unsupported data file type {suffix!r} (use {', '.join(FILE_TYPES)})")


def _decode(raw: bytes, path: Path, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EdgeftError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
            "save the file as UTF-8"
        ) from None


def read_text(path: Path) -> str:
    """The whole file as UTF-8; an invalid byte is one error naming its line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        return _decode(raw.split(b"\n")[line - 1], path, line)  # raises, naming the line and column


def _read_csv(path: Path, delimiter: str) -> list[Row]:
    """CSV/TSV rows, refusing what a stray quote does silently: a row with too many or too few fields, text after a
    closing quote, an unclosed quote (to the end of the file), or a quoted field swallowing whole rows."""
    import io

    f = io.StringIO(read_text(path), newline="")
    reader = csv.reader(f, delimiter=delimiter, strict=True)
    rows: list[Row] = []
    try:
        header = next(reader, None)
        if header is None:
            return rows
        line = reader.line_num + 1  # the physical line where the next record starts
        for rec in reader:
            where = f"{path}:{line}"
            if rec and len(rec) != len(header):
                raise EdgeftError(
                    f"{where}: {len(rec)} fields where the header has {len(header)} (a stray quote or delimiter?)"
                )
            for cell in rec:
                if "\n" in cell and any(
                    len(next(csv.reader([part], delimiter=delimiter))) == len(header) > 1
                    for part in cell.split("\n")[:-1]
                ):
                    raise EdgeftError(
                        f"{where}: a quoted field spans lines {line}-{reader.line_num} that look like "
                        "rows of their own: is a closing quote missing?"
                    )
            if rec:
                rows.append((where, dict(zip(header, rec))))
            line = reader.line_num + 1
    except csv.Error as e:
        raise EdgeftError(f"{path}:{reader.line_num}: malformed CSV ({e}): check the quotes on this line") from None
    return rows


def rows_from_dataset(ds: Any, name: str = "dataset") -> list[Row]:
    """Rows of a ``datasets.Dataset`` or any iterable of dicts."""
    rows = []
    for i, r in enumerate(ds, 1):
        if not isinstance(r, dict):
            raise EdgeftError(f"{name} row {i}: expected a mapping of columns, got {type(r).__name__}")
        rows.append((f"{name} row {i}", dict(r)))
    return rows


def _conversation_kind(rows: list[Row], col: str) -> str:
    """ "messages" (role/content) or "sharegpt" (from/value), from the first message found."""
    for _, r in rows:
        msgs = _maybe_json(r.get(col))
        if isinstance(msgs, list) and msgs and isinstance(msgs[0], dict):
            if "from" in msgs[0] and "value" in msgs[0]:
                return "sharegpt"
            return "messages"
    return "messages"


def detect_format(rows: list[Row], source: str) -> tuple[str, str | None]:
    """(format, column) from the columns of the rows: see the module docstring."""
    if not rows:
        raise EdgeftError(f"{source}: the dataset is empty")
    cols = set(rows[0][1])
    for col in ("messages", "conversations", "conversation"):
        if col in cols:
            return _conversation_kind(rows, col), col
    if {"instruction", "output"} <= cols:
        return "alpaca", None
    if {"prompt", "completion"} <= cols:
        return "prompt-completion", None
    if "text" in cols:
        return "text", "text"
    raise EdgeftError(
        f"{source}: cannot tell the format from columns {sorted(cols)}; expected 'messages'/'conversations' "
        "(role/content or ShareGPT from/value), alpaca 'instruction'+'output', 'prompt'+'completion', 'text', "
        "or pass --prompt-template with --output-column to merge other columns"
    )


def _maybe_json(v: Any) -> Any:
    if isinstance(v, str) and v[:1] in "[{":  # CSV cells hold JSON text
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    return v


def _check_conversation(out: Messages, where: str) -> Messages:
    if not any(m["role"] == "assistant" for m in out):
        raise EdgeftError(f"{where}: the conversation has no assistant message to learn from")
    if all(is_empty(m["content"]) for m in out if m["role"] == "assistant"):
        # it would train on the end-of-turn token alone: teaching the model to answer nothing
        raise EdgeftError(f"{where}: every assistant message is empty; there is no answer to learn from")
    return out


def _messages(row: dict[str, Any], col: str, where: str) -> Messages:
    msgs = _maybe_json(row.get(col))
    if not isinstance(msgs, list) or not msgs:
        raise EdgeftError(f"{where}: '{col}' must be a non-empty list of messages (columns found: {sorted(row)})")
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise EdgeftError(
                f"{where}: message {j} needs string 'role' and 'content' (keys found: "
                f"{sorted(m) if isinstance(m, dict) else type(m).__name__})"
            )
        if m["role"] not in _ROLES:
            raise EdgeftError(f"{where}: message {j} has role {m['role']!r}; expected one of {sorted(_ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    return _check_conversation(out, where)


def standardize_sharegpt(msgs: Iterable[dict[str, Any]], where: str = "row") -> Messages:
    """ShareGPT turns (``from``: human/gpt/system, ``value``) as role/content messages."""
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("from"), str) or not isinstance(m.get("value"), str):
            raise EdgeftError(f"{where}: ShareGPT turn {j} needs string 'from' and 'value'")
        role = SHAREGPT_ROLES.get(m["from"].lower())
        if role is None:
            raise EdgeftError(
                f"{where}: ShareGPT turn {j} is from {m['from']!r}; expected one of {sorted(SHAREGPT_ROLES)}"
            )
        out.append({"role": role, "content": m["value"]})
    return out


def to_record(row: dict[str, Any], fmt: str, col: str | None, where: str) -> Messages | str:
    """One row in the given format as a conversation (or, for ``text``, the document string)."""
    if fmt == "alpaca":
        missing = [k for k in ("instruction", "output") if not isinstance(row.get(k), str) or is_empty(row.get(k))]
        if missing:
            raise EdgeftError(f"{where}: alpaca row is missing {missing} (columns found: {sorted(row)})")
        prompt = row["instruction"]
        extra = row.get("input")
        if not is_empty(extra):
            prompt = f"{prompt}\n\n{extra}"
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    if fmt == "prompt-completion":
        missing = [k for k in ("prompt", "completion") if not isinstance(row.get(k), str) or is_empty(row.get(k))]
        if missing:
            raise EdgeftError(f"{where}: row is missing {missing} (columns found: {sorted(row)})")
        return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    if fmt == "messages":
        return _messages(row, col or "messages", where)
    if fmt == "sharegpt":
        msgs = _maybe_json(row.get(col))
        if not isinstance(msgs, list) or not msgs:
            raise EdgeftError(f"{where}: '{col}' must be a non-empty list of turns (columns found: {sorted(row)})")
        return _check_conversation(standardize_sharegpt(msgs, where), where)
    if fmt == "text":
        text = row.get(col or "text")
        if not isinstance(text, str) or is_empty(text):
            raise EdgeftError(f"{where}: 'text' must be a non-empty string (columns found: {sorted(row)})")
        return text
    raise EdgeftError(f"unknown data format {fmt!r}")


def records_from_rows(rows: list[Row], source: str) -> list[Messages | str]:
    fmt, col = detect_format(rows, source)
    return [to_record(r, fmt, col, where) for where, r in rows]


def load_file(path: str | Path) -> list[Messages | str]:
    """A data file as conversations (or raw-text documents)."""
    return records_from_rows(read_rows(path), str(path))


# --- hub datasets ---------------------------------------------------------------------------------------------

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_name(spec: str) -> bool:
    return bool(_HUB_NAME.match(spec)) and Path(spec).suffix.lower() not in FILE_TYPES


def rows_from_hub(name: str, split: str) -> list[Row]:
    """A hub dataset split through ``datasets.load_dataset`` (needs network and the datasets package)."""
    try:
        import datasets
    except ImportError:
        raise EdgeftError(
            f"{name!r} is not a local file; loading hub datasets needs: pip install 'edgeft[data]'"
        ) from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown name, bad split...
        raise EdgeftError(
            f"data {name!r} is not a local file and the Hugging Face hub could not provide split {split!r} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
        ) from None
    return rows_from_dataset(ds, name)
