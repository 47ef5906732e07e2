"""Existing Dask code, unchanged, on a dask-lithops cluster.

    python examples/quickstart.py                 # LocalhostCluster (the default)
    DASK_LITHOPS__MODE=serverless python examples/quickstart.py   # whatever is configured

The cluster comes from `dask_lithops.Cluster()`, which picks the mode from
keywords, dask config or the Lithops config file, like Lithops' FunctionExecutor.
"""

import time

import dask
import dask.array as da
import dask.bag as db
import dask.dataframe as dd
import pandas as pd
from distributed import Client, progress

from dask_lithops import Cluster


def main():
    t0 = time.perf_counter()
    with Cluster() as cluster, Client(cluster) as client:
        print(f"{type(cluster).__name__} up in {time.perf_counter() - t0:.1f}s: "
              f"{len(client.scheduler_info()['workers'])} workers, dashboard {cluster.dashboard_link}")

        # futures
        squares = client.map(lambda x: x * x, range(1000))
        print("futures   sum of squares:", client.submit(sum, squares).result())

        # delayed
        @dask.delayed
        def inc(x):
            return x + 1

        print("delayed   sum(inc(i)):", dask.delayed(sum)([inc(i) for i in range(100)]).compute())

        # array
        x = da.random.default_rng(42).random((4000, 4000), chunks=(1000, 1000))
        y = (x + x.T).mean(axis=0).persist()
        progress(y)
        print("\narray     mean of (x + x.T):", round(float(y.mean().compute()), 4))

        # dataframe with a p2p shuffle
        pdf = pd.DataFrame({"key": [i % 10 for i in range(100_000)], "value": range(100_000)})
        ddf = dd.from_pandas(pdf, npartitions=10)
        result = ddf.shuffle("key", method="p2p").groupby("key").value.sum().compute()
        assert result.sort_index().tolist() == pdf.groupby("key").value.sum().tolist()
        print("dataframe groupby-sum after p2p shuffle:", result.sort_index().tolist()[:3], "...")

        # bag
        words = db.from_sequence(["dask", "lithops", "dask", "lambda"] * 250, npartitions=4)
        print("bag       frequencies:", dict(words.frequencies().compute()))
    print(f"done in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
