"""Python polars' reading of a parquet file the workbench wrote: the schema
and every value, as JSON {"height", "schema": [[name, dtype], ...],
"columns": {name: [values]}} (floats as repr strings, so no digit is lost;
NaN as "nan"; null as null).

Usage: python polars_read.py FILE.parquet
"""
import json
import sys

import polars as pl

df = pl.read_parquet(sys.argv[1])


def cell(v):
    if isinstance(v, float):
        return repr(v)
    return v


out = {
    "height": df.height,
    "schema": [[name, str(dtype)] for name, dtype in df.schema.items()],
    "columns": {name: [cell(v) for v in df[name].to_list()] for name in df.columns},
}
print(json.dumps(out))
