"""``lithops.wait``'s module path: ``from dask_lithops.wait import ALL_COMPLETED, wait``.

(``dask_lithops.wait`` itself is the function, as ``lithops.wait`` is.)
"""

from dask_lithops.executor.wait import (  # noqa: F401
    ALL_COMPLETED,
    ALWAYS,
    ANY_COMPLETED,
    THREADPOOL_SIZE,
    WAIT_DUR_SEC,
    get_result,
    wait,
)
