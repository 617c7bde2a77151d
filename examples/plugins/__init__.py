"""Example plugins (``jetflow plugin deploy examples/plugins/csv_to_parquet.py``)."""
