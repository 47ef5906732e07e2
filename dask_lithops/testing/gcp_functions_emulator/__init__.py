"""An offline Google Cloud Run functions: the Cloud Functions v2 API and the HTTP front end.

>>> from dask_lithops.testing.gcp_functions_emulator import CloudFunctionsEmulator
>>> with CloudFunctionsEmulator(project="test-project") as emu:     # doctest: +SKIP
...     emu.endpoint_url, emu.credentials_file

Each instance is the real ``functions-framework`` serving the uploaded source,
built into an isolated environment from its ``requirements.txt``.  See
docs/gcp-functions-emulator.md.
"""

from .model import InstanceInfo, RequestRecord
from .server import CloudFunctionsEmulator

__all__ = ["CloudFunctionsEmulator", "InstanceInfo", "RequestRecord"]
