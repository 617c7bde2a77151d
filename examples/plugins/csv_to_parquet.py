"""A jetflow plugin: a CSV of orders into Arrow batches, streamed (a file larger than
memory is read a block at a time), with a row filter from the job's args. Columns are
read as text and typed by the schema contract (``OUTPUTS``): jetflow casts each batch
to it, and a row whose value does not cast (or a null where none may be) goes to
``orders_quarantine`` with its reason instead of failing the job.

    jetflow plugin deploy examples/plugins/csv_to_parquet.py

Args: ``{"min_amount": 10}`` keeps the rows whose amount is at least that.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pv

NAME = "csv_to_parquet"
VERSION = "1.0.0"
OUTPUTS = {
    "orders": [
        {"name": "order_id", "type": "int64", "nullable": False},
        {"name": "customer", "type": "string", "nullable": False},
        {"name": "amount", "type": "float64", "nullable": True},
        {"name": "day", "type": "date32", "nullable": True},
    ],
}

TEXT = {c["name"]: pa.string() for c in OUTPUTS["orders"]}


def parse(path: str, ctx: Any = None) -> Iterator[pa.RecordBatch]:
    args = getattr(ctx, "args", None) or {}
    min_amount = args.get("min_amount")
    reader = pv.open_csv(path, read_options=pv.ReadOptions(block_size=4 << 20),
                         convert_options=pv.ConvertOptions(
                             column_types=TEXT, strings_can_be_null=True))
    for batch in reader:
        if min_amount is not None:  # an amount that is no number is left to the contract
            amount = pc.cast(pc.if_else(pc.utf8_is_numeric(pc.replace_substring(
                batch["amount"], ".", "")), batch["amount"], None), pa.float64())
            batch = batch.filter(pc.or_kleene(pc.greater_equal(amount, float(min_amount)),
                                              pc.is_null(amount)))
        yield batch
