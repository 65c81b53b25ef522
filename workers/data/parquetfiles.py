"""Parquet files as numbered records, read in small batches within their row groups, within bounds.

The footer and each row group are checked before any value is decoded: a small file can hold a huge cell.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, BinaryIO

from workers.data.bounds import MB, PIECE_BYTES, Limits, Problem, ProblemSink, human_size, too_deep

PARQUET_BATCH_BYTES = 8 * MB  # a Parquet batch is sized to decode to about this much
PARQUET_BATCH_ROWS = 1024


def parquet_records(source: BinaryIO, report: ProblemSink, limits: Limits) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows batch by batch, after the footer's figures (rows, sizes, nesting) are checked against the bounds."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(source, pre_buffer=False, buffer_size=PIECE_BYTES)
        schema = parquet.schema_arrow
    except Exception as exc:  # pyarrow raises several unrelated types for a corrupt file
        report.add(Problem(0, f"not a readable Parquet file: {exc}", unit="row"))
        return
    problems = _footer_problems(parquet.metadata, schema, limits)
    for problem in problems:
        report.add(problem)
    if problems:
        return
    number, decoded = 0, 0
    for group in range(parquet.metadata.num_row_groups):
        try:
            batches = parquet.iter_batches(batch_size=_batch_rows(parquet, source, group), row_groups=[group],
                                           use_threads=False)
            for batch in batches:
                decoded += batch.nbytes  # dictionary-encoded values decode past what the footer says
                if decoded > limits.max_decoded_bytes:
                    report.add(Problem(number + 1, f"the file decodes to more than "
                                       f"{human_size(limits.max_decoded_bytes)}, the most that is read "
                                       "(TUNEDECK_DATASET_MAX_DECODED_MB)", unit="row"))
                    return
                yield from _batch_records(batch, number, report, limits)
                number += batch.num_rows
        except Exception as exc:  # a corrupt page
            report.add(Problem(number + 1, f"unreadable Parquet data: {exc}", unit="row"))
            return


def _footer_problems(meta: Any, schema: Any, limits: Limits) -> list[Problem]:
    problems = [Problem(0, too_deep(limits), field.name, "row")
                for field in schema if _type_depth(field.type, limits.max_depth) + 1 > limits.max_depth]
    if meta.num_rows > limits.max_rows:
        problems.append(Problem(0, f"the file holds {meta.num_rows:,} rows: at most {limits.max_rows:,} are read "
                                   "(TUNEDECK_DATASET_MAX_ROWS)", unit="row"))
    groups = [meta.row_group(i) for i in range(meta.num_row_groups)]
    total = sum(group.total_byte_size for group in groups)
    if total > limits.max_decoded_bytes:
        problems.append(Problem(0, f"the file decodes to {human_size(total)}: at most "
                                   f"{human_size(limits.max_decoded_bytes)} are read (TUNEDECK_DATASET_MAX_DECODED_MB)",
                                unit="row"))
    first = 1
    for index, group in enumerate(groups):
        problems += _row_group_problems(index, group, first, limits)
        first += group.num_rows
    return problems


def _row_group_problems(index: int, group: Any, first: int, limits: Limits) -> list[Problem]:
    sizes: dict[str, int] = {}
    for i in range(group.num_columns):
        chunk = group.column(i)
        field = chunk.path_in_schema.split(".")[0]
        sizes[field] = sizes.get(field, 0) + chunk.total_uncompressed_size
    if group.num_rows == 1:
        bound = human_size(limits.max_row_bytes)
        return [Problem(first, f"decodes to {human_size(size)}: a row may hold at most {bound} "
                               "(TUNEDECK_DATASET_MAX_ROW_KB)", field, "row")
                for field, size in sizes.items() if size > limits.max_row_bytes]
    if group.total_byte_size <= limits.max_row_group_bytes:
        return []
    largest = max(sizes, key=sizes.__getitem__)
    fitting = max(1, group.num_rows * limits.max_row_group_bytes // group.total_byte_size // 2)
    last = first + group.num_rows - 1
    return [Problem(first, f"rows {first:,} to {last:,} (row group {index + 1}) decode to "
                           f"{human_size(group.total_byte_size)}, {human_size(sizes[largest])} of it in this field: a "
                           f"row group may decode to at most {human_size(limits.max_row_group_bytes)} "
                           "(TUNEDECK_DATASET_MAX_ROW_GROUP_MB); write the file with smaller row groups, e.g. "
                           f"pyarrow.parquet.write_table(table, path, row_group_size={fitting:,})", largest, "row")]


def _type_depth(arrow_type: Any, limit: int) -> int:
    """How deeply lists, structs and maps nest in a column's type (stops counting past `limit`)."""
    import pyarrow as pa

    if limit < 0:
        return 1
    if pa.types.is_dictionary(arrow_type):
        return _type_depth(arrow_type.value_type, limit)
    if pa.types.is_struct(arrow_type):
        return 1 + max((_type_depth(f.type, limit - 1) for f in arrow_type), default=0)
    if pa.types.is_map(arrow_type):
        return 1 + max(_type_depth(arrow_type.key_type, limit - 1), _type_depth(arrow_type.item_type, limit - 1))
    if hasattr(arrow_type, "value_type"):  # list, large list, fixed-size list, list view
        return 1 + _type_depth(arrow_type.value_type, limit - 1)
    return 0


def _batch_rows(parquet: Any, source: BinaryIO, group: int) -> int:
    """Rows per batch so that a batch decodes to about PARQUET_BATCH_BYTES.

    A dictionary-encoded column decodes each row to a dictionary value, whatever the footer's sizes: a row group
    of 500 rows that share one 64 KB value says 64 KB and decodes to 32 MB. Its largest dictionary value is read
    (one page) to size the batches."""
    meta = parquet.metadata.row_group(group)
    rows = max(1, meta.num_rows)
    per_row = meta.total_byte_size / rows
    for i in range(meta.num_columns):
        chunk = meta.column(i)
        if chunk.has_dictionary_page and chunk.physical_type == "BYTE_ARRAY":
            values_per_row = max(1.0, chunk.num_values / rows)
            per_row += _largest_dictionary_value(parquet, source, group, chunk.path_in_schema) * values_per_row
    return int(min(PARQUET_BATCH_ROWS, max(1, PARQUET_BATCH_BYTES // max(1.0, per_row))))


def _largest_dictionary_value(parquet: Any, source: BinaryIO, group: int, path: str) -> int:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    probe = pq.ParquetFile(source, metadata=parquet.metadata, read_dictionary=[path], pre_buffer=False,
                           buffer_size=PIECE_BYTES)
    column = path.split(".")[0]
    batch = next(probe.iter_batches(batch_size=1, row_groups=[group], columns=[column], use_threads=False), None)
    dictionary = _dictionary_in(batch.column(0)) if batch is not None else None
    if dictionary is None or len(dictionary) == 0:
        return 0
    return int(pc.max(pc.binary_length(dictionary)).as_py() or 0)


def _dictionary_in(array: Any) -> Any:
    """The dictionary of the (first) dictionary-encoded array inside `array`, or None."""
    import pyarrow as pa

    if pa.types.is_dictionary(array.type):
        return array.dictionary
    if pa.types.is_struct(array.type):
        for i in range(array.type.num_fields):
            found = _dictionary_in(array.field(i))
            if found is not None:
                return found
        return None
    if hasattr(array, "values"):
        return _dictionary_in(array.values)
    return None


def _batch_records(batch: Any, before: int, report: ProblemSink, limits: Limits) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        records: list[dict[str, Any] | None] = batch.to_pylist()
    except Exception:  # a string column holding bytes that are not UTF-8: find the rows and columns
        records = [_parquet_row(batch, offset, before + offset + 1, report) for offset in range(batch.num_rows)]
    check_sizes = batch.nbytes > limits.max_row_bytes  # else no row of the batch can be past the bound
    for offset, record in enumerate(records):
        number = before + offset + 1
        if record is None:
            continue
        if check_sizes:
            sizes = {name: _value_size(value) for name, value in record.items()}
            if sum(sizes.values()) > limits.max_row_bytes:
                largest = max(sizes, key=sizes.__getitem__)
                report.add(Problem(number, f"decodes to {human_size(sum(sizes.values()))}, "
                                           f"{human_size(sizes[largest])} of it in this field: a row may hold at most "
                                           f"{human_size(limits.max_row_bytes)} (TUNEDECK_DATASET_MAX_ROW_KB)",
                                   largest, "row"))
                continue
        yield number, record


def _value_size(value: Any) -> int:
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, dict):
        return sum(_value_size(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_value_size(v) for v in value)
    return 8


def _parquet_row(batch: Any, offset: int, number: int, report: ProblemSink) -> dict[str, Any] | None:
    record = {}
    for name in batch.schema.names:
        try:
            (record[name],) = batch.column(name).slice(offset, 1).to_pylist()
        except UnicodeDecodeError as exc:
            report.add(Problem(number, f"not valid UTF-8 (byte 0x{exc.object[exc.start]:02x})", name, "row"))
            return None
        except Exception as exc:
            report.add(Problem(number, f"unreadable value: {exc}", name, "row"))
            return None
    return record
