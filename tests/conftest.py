pytest_plugins = ["dask_lithops.testing.fixtures"]
