"""The documents of the inputs that preprocessing reads, in batches, whatever the file format.

Formats, by file name:
- `.parquet`: the text column (`--text-key`), read in record batches.
- `.arrow`: Arrow IPC files or streams (`datasets` writes streams), the text column.
- a directory saved with `datasets`' `save_to_disk` (state.json + dataset_info.json next to Arrow
  files): its Arrow files, in the order state.json lists them. Read with pyarrow alone, so the
  `datasets` package is not needed at run time. A DatasetDict directory is refused: one split is
  chosen by giving its directory.
- `.jsonl`, `.jsonl.gz`, `.jsonl.zst` / `.jsonl.zstd`: one JSON object a line, text under the key.
- any other file: one document (UTF-8, undecodable bytes replaced).
- other directories: their files matching `--glob`, recursively, sorted by path.

An error names the file, the place in it (`file:line` for JSONL, lines counted from 1;
`file: row N` for Parquet/Arrow, rows counted from 0 as pyarrow and pandas index them) and the
reason, on one line.

Work is cut into inputs (`Input`): each data file is one; consecutive one-document text files are
grouped into one input of up to TEXT_GROUP_BYTES, so a directory of a million small files does not
make a million shards. The inputs depend only on the file list (and the files' sizes).
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

TEXT_GROUP_BYTES = 128 * 2**20
BATCH_CHARS = 2**18  # a quarter million characters: ~50 ms of tokenizing, small enough to keep workers even
_JSONL_SUFFIXES = {".jsonl": None, ".jsonl.gz": "gzip", ".jsonl.zst": "zstd", ".jsonl.zstd": "zstd"}


@dataclass(frozen=True)
class Input:
    """One unit of work (and of output shards): a data file, or a run of one-document text files."""
    kind: str  # "parquet", "arrow", "jsonl" or "text"
    files: tuple[Path, ...]
    nbytes: int

    def __str__(self) -> str:
        if len(self.files) == 1:
            return str(self.files[0])
        return f"{self.files[0]} .. {self.files[-1]} ({len(self.files)} files)"


def kind_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".arrow"):
        return "arrow"
    if any(name.endswith(suffix) for suffix in _JSONL_SUFFIXES):
        return "jsonl"
    return "text"


def is_saved_dataset(directory: Path) -> bool:
    """A directory written by `datasets.Dataset.save_to_disk`."""
    return (directory / "state.json").is_file() and (directory / "dataset_info.json").is_file()


def saved_dataset_files(directory: Path) -> list[Path]:
    """The Arrow files of a `save_to_disk` directory, in the dataset's row order."""
    state_path = directory / "state.json"
    try:
        files = [directory / entry["filename"] for entry in json.loads(state_path.read_text())["_data_files"]]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{state_path}: not a datasets state file ({_reason(error)}); give the Arrow files "
                         f"themselves as --input") from None
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"{state_path} lists Arrow files that are absent: {', '.join(missing)} (copy the whole "
                         f"save_to_disk directory)")
    return files


def _refuse_dataset_dict(directory: Path) -> None:
    if (directory / "dataset_dict.json").is_file():
        try:
            splits = ", ".join(json.loads((directory / "dataset_dict.json").read_text())["splits"])
        except (ValueError, KeyError, TypeError):
            splits = "?"
        raise ValueError(f"{directory} is a saved DatasetDict (splits: {splits}): give one split's directory, "
                         f"e.g. {directory / 'train'}")


def input_files(inputs: list[str], glob: str = "*") -> list[Path]:
    """The files named by `inputs` (directories expanded, sorted), failing on missing paths."""
    files = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"input path does not exist: {path} (give existing data files or directories)")
        if not path.is_dir():
            files.append(path)
        elif is_saved_dataset(path):
            files += saved_dataset_files(path)
        else:
            _refuse_dataset_dict(path)
            files += _directory_files(path, glob)
    if not files:
        raise ValueError(f"no input files found in {inputs} (directories are searched for {glob!r})")
    return files


def _directory_files(directory: Path, glob: str) -> list[Path]:
    """Files under `directory` matching `glob`, sorted by path; inside a saved dataset only its Arrow
    files (its json files and `.map` caches are not documents)."""
    datasets: dict[Path, set[Path] | None] = {}
    files = []
    for path in sorted(p for p in directory.rglob(glob) if p.is_file()):
        parent = path.parent
        if parent not in datasets:
            _refuse_dataset_dict(parent)
            datasets[parent] = set(saved_dataset_files(parent)) if is_saved_dataset(parent) else None
        if datasets[parent] is None or path in datasets[parent]:
            files.append(path)
    return files


def input_units(files: list[Path], group_bytes: int = TEXT_GROUP_BYTES) -> list[Input]:
    """The files cut into inputs: each data file alone, consecutive text files grouped up to group_bytes."""
    units, run, run_bytes = [], [], 0

    def close_run():
        nonlocal run, run_bytes
        if run:
            units.append(Input("text", tuple(run), run_bytes))
        run, run_bytes = [], 0

    for path in files:
        size = path.stat().st_size
        kind = kind_of(path)
        if kind == "text":
            run.append(path)
            run_bytes += size
            if run_bytes >= group_bytes:
                close_run()
        else:
            close_run()
            units.append(Input(kind, (path,), size))
    close_run()
    return units


def read_batches(unit: Input, text_key: str = "text", batch_chars: int = BATCH_CHARS
                 ) -> Iterator[tuple[list[str], int]]:
    """The documents of `unit` in batches of about batch_chars characters, each with the bytes of the
    unit read so far (for progress)."""
    if unit.kind == "text":
        yield from _text_batches(unit.files, batch_chars)
        return
    path = unit.files[0]
    if unit.kind == "jsonl":
        with path.open("rb") as raw:
            yield from _batched(_jsonl_texts(path, raw, text_key), raw.tell, batch_chars)
    elif unit.kind == "parquet":
        yield from _parquet_batches(path, text_key, batch_chars)
    else:
        yield from _arrow_batches(path, text_key, batch_chars)


def iter_documents(units: list[Input], text_key: str = "text") -> Iterator[str]:
    for unit in units:
        for texts, _ in read_batches(unit, text_key):
            yield from texts


def _batched(texts: Iterator[str], position: Callable[[], int], batch_chars: int) -> Iterator[tuple[list[str], int]]:
    batch, chars = [], 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if chars >= batch_chars:
            yield batch, position()
            batch, chars = [], 0
    if batch:
        yield batch, position()


def _reason(error: BaseException) -> str:
    """An exception's message on one line (pyarrow's span several)."""
    return " ".join(str(error).split()) or type(error).__name__


def _text_batches(files: tuple[Path, ...], batch_chars: int) -> Iterator[tuple[list[str], int]]:
    done = 0

    def texts():
        nonlocal done
        for path in files:
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError as error:
                raise ValueError(f"{path}: cannot read ({_reason(error)})") from None
            done += path.stat().st_size
            yield text

    yield from _batched(texts(), lambda: done, batch_chars)


# JSONL ------------------------------------------------------------------------------------------

def _decompressed(path: Path, raw) -> tuple[io.BufferedIOBase, tuple[type[BaseException], ...]]:
    """A binary line stream over `raw` and the errors its decompression raises on damaged data."""
    compression = next(c for suffix, c in _JSONL_SUFFIXES.items() if path.name.lower().endswith(suffix))
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb"), (OSError, EOFError, zlib.error)
    if compression == "zstd":
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=False)
        return io.BufferedReader(reader), (OSError, EOFError, zstandard.ZstdError)
    return raw, (OSError,)


def _records(path: Path, raw) -> Iterator[tuple[int, object]]:
    stream, read_errors = _decompressed(path, raw) if kind_of(path) == "jsonl" else (raw, (OSError,))
    line_number = 0
    try:
        for line_number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8
                raise ValueError(f"{path}:{line_number}: not valid JSON ({_reason(error)})") from None
            yield line_number, record
    except read_errors as error:
        raise ValueError(f"{path}:{line_number + 1}: cannot read ({_reason(error)}); the file is damaged: "
                         f"re-create it or leave it out of --input") from None


def iter_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON) of each non-empty line of a .jsonl(.gz/.zst) file; a bad line
    fails naming file:line."""
    path = Path(path)
    with path.open("rb") as raw:
        yield from _records(path, raw)


def _jsonl_texts(path: Path, raw, text_key: str) -> Iterator[str]:
    for line_number, record in _records(path, raw):
        if not isinstance(record, dict) or text_key not in record:
            raise ValueError(f"{path}:{line_number}: no {text_key!r} field (set --text-key)")
        text = record[text_key]
        if not isinstance(text, str):
            found = "null" if text is None else type(text).__name__
            raise ValueError(f"{path}:{line_number}: {text_key!r} is {found}, not a string "
                             f"(set --text-key to a text field, or drop the line)")
        yield text


# Parquet and Arrow ------------------------------------------------------------------------------

def _text_column(path: Path, schema, text_key: str) -> None:
    """Fails unless `schema` has a string column `text_key`."""
    import pyarrow as pa

    if text_key not in schema.names:
        raise ValueError(f"{path}: no {text_key!r} column (columns: {', '.join(schema.names)}; set --text-key)")
    kind = schema.field(text_key).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise ValueError(f"{path}: column {text_key!r} holds {kind}, not strings (set --text-key to a text column)")


def _column_texts(path: Path, column, first_row: int) -> list[str]:
    texts = column.to_pylist()
    if column.null_count:
        raise ValueError(f"{path}: row {first_row + texts.index(None)}: the text is null (drop or fill such rows)")
    return texts


def _record_batch_texts(path: Path, batches, text_key: str, read: dict) -> Iterator[str]:
    """The texts of Arrow record batches, counting the rows and batches read into `read` (the
    readers' progress); a batch that cannot be read names the row it starts at."""
    import pyarrow as pa

    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as error:
            raise ValueError(f"{path}: row {read['rows']}: cannot read ({_reason(error)}); the file is damaged: "
                             f"re-create it or leave it out of --input") from None
        if batch is None:
            return
        texts = _column_texts(path, batch.column(batch.schema.get_field_index(text_key)), read["rows"])
        read["rows"] += batch.num_rows
        read["batches"] += 1
        yield from texts


def _parquet_batches(path: Path, text_key: str, batch_chars: int) -> Iterator[tuple[list[str], int]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"{path}: not a readable Parquet file ({_reason(error)})") from None
    with parquet:
        _text_column(path, parquet.schema_arrow, text_key)
        total_rows = max(parquet.metadata.num_rows, 1)
        nbytes = path.stat().st_size
        read = {"rows": 0, "batches": 0}
        batches = parquet.iter_batches(batch_size=1024, columns=[text_key], use_threads=False)
        yield from _batched(_record_batch_texts(path, batches, text_key, read),
                            lambda: nbytes * read["rows"] // total_rows, batch_chars)


def _arrow_batches(path: Path, text_key: str, batch_chars: int) -> Iterator[tuple[list[str], int]]:
    import pyarrow as pa

    try:
        source = pa.memory_map(str(path))
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"{path}: cannot read ({_reason(error)})") from None
    with source:
        nbytes = path.stat().st_size
        read = {"rows": 0, "batches": 0}
        try:  # the IPC file format first; `datasets` writes the stream format
            reader = pa.ipc.open_file(source)
            count = max(reader.num_record_batches, 1)
            record_batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            position = lambda: nbytes * read["batches"] // count  # noqa: E731
        except pa.ArrowInvalid:
            source.seek(0)
            try:
                reader = pa.ipc.open_stream(source)
            except (pa.ArrowException, OSError) as error:
                raise ValueError(f"{path}: not an Arrow IPC file or stream ({_reason(error)})") from None
            record_batches = iter(reader)
            position = source.tell  # a stream is read front to back: the mapped file's position is the progress
        _text_column(path, reader.schema, text_key)
        yield from _batched(_record_batch_texts(path, record_batches, text_key, read), position, batch_chars)
