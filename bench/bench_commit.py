"""The ray engine's driver-side cost: one Lance Append commit of a worker's fragment, as fragments
accumulate in the table (256 rows x 512-d each, as `--batch-size 256` writes them).

    python bench/bench_commit.py
"""
import json
import shutil
import time

import lance
import numpy as np
import pyarrow as pa
from lance.fragment import write_fragments

uri = "/tmp/commitcost/t.lance"
shutil.rmtree("/tmp/commitcost", ignore_errors=True)
dim, rows = 512, 256


def batch(i):
    v = np.random.default_rng(i).normal(size=(rows, dim)).astype(np.float32)
    return pa.table({"id": pa.array(range(i*rows, (i+1)*rows), pa.int64()), "embedding": pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), dim)})


lance.write_dataset(batch(0), uri)
out = {}
for total in range(1, 2001):
    frags = write_fragments(batch(total), uri)
    t = time.perf_counter()
    lance.LanceDataset.commit(uri, lance.LanceOperation.Append(frags), read_version=lance.dataset(uri).version)
    dt = time.perf_counter() - t
    if total in (10, 100, 500, 1000, 2000):
        out[total] = round(dt * 1000, 2)
        print(total, "fragments:", out[total], "ms per commit", flush=True)
print(json.dumps(out))
