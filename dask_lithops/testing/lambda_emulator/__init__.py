"""An offline AWS Lambda: the Lambda API as boto3 calls it, real ``awslambdaric`` environments.

>>> from dask_lithops.testing.lambda_emulator import LambdaEmulator
>>> with LambdaEmulator() as emu:                       # doctest: +SKIP
...     client = emu.client()        # or boto3.client("lambda", endpoint_url=emu.endpoint_url)

See docs/lambda-emulator.md.
"""

from ..sandbox import sandbox_unavailable
from .managed_runtime import ensure_runtime
from .server import (
    ACCOUNT_ID,
    EnvironmentInfo,
    InvocationRecord,
    LambdaEmulator,
)

__all__ = ["ACCOUNT_ID", "EnvironmentInfo", "InvocationRecord", "LambdaEmulator",
           "ensure_runtime", "sandbox_unavailable"]
