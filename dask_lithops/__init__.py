"""dask-lithops: Lithops' execution modes as Dask clusters."""

__version__ = "0.1.0"
