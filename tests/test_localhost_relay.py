"""LocalhostCluster(relay=True): workers behind the relay:// comm, with and without TLS."""

import dask
import dask.array as da
import numpy as np
import pytest
from distributed import Client

from dask_lithops import LocalhostCluster


@pytest.mark.parametrize("tls", [False, True])
def test_workers_behind_relay_exchange_data(tls):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    import dask.dataframe as dd

    with LocalhostCluster(n_workers=2, threads_per_worker=1, relay=True, tls=tls,
                          dashboard_address=":0") as cluster, Client(cluster) as client:
        addresses = list(client.scheduler_info()["workers"])
        assert len(addresses) == 2
        assert all(a.startswith(f"relay://{cluster.relay_address}/") for a in addresses)
        assert cluster.scheduler_address.startswith("tls://" if tls else "tcp://")
        assert "relay_token" in cluster.security.extra_conn_args

        # worker-to-worker transfers: a p2p shuffle and an array transpose
        pdf = pd.DataFrame({"k": [i % 7 for i in range(5000)], "v": range(5000)})
        with dask.config.set({"dataframe.shuffle.method": "p2p"}):
            got = dd.from_pandas(pdf, npartitions=6).shuffle("k").groupby("k").v.sum().compute()
        assert got.sort_index().tolist() == pdf.groupby("k").v.sum().sort_index().tolist()

        x = np.arange(400 * 400).reshape(400, 400)
        y = da.from_array(x, chunks=(100, 400)).rechunk((400, 100)).T
        assert (y.compute() == x.T).all()

        # a result held on one worker, fetched by a task pinned to the other
        a, b = addresses
        held = client.submit(lambda: bytes(2_000_000), workers=[a], pure=False)
        assert client.submit(len, held, workers=[b]).result() == 2_000_000


def test_relay_refuses_a_client_without_the_token():
    with LocalhostCluster(n_workers=1, relay=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        worker = next(iter(client.scheduler_info()["workers"]))

        async def probe():
            from distributed.comm import connect

            comm = await connect(worker, timeout=5)  # no relay_token
            await comm.close()

        with pytest.raises(Exception, match="(?i)refused|token"):
            client.sync(probe)
