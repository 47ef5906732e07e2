"""The launch payload: encoding, validation and TLS material."""

import msgpack
import pytest
from distributed import Security

from dask_lithops.payload import (
    LaunchPayload,
    PayloadError,
    decode,
    decode_b64,
    encode,
    encode_b64,
    security_from_dict,
    security_to_dict,
)


def test_round_trip_keeps_every_field():
    payload = LaunchPayload(scheduler_address="tls://10.0.0.1:8786", name="lambda-3", nthreads=2,
                            memory_limit=2_000_000_000, nanny=False, lifetime=60.0,
                            relay={"address": "10.0.0.1:9000", "worker_id": "lambda-3-ab"},
                            config={"distributed": {"scheduler": {"work-stealing": False}}})
    assert decode(encode(payload)) == payload
    assert decode_b64(encode_b64(payload)) == payload


def test_temporary_tls_material_travels_once_and_comes_back_whole():
    security = Security.temporary(extra_conn_args={"relay_token": "t0k"})
    data = security_to_dict(security)
    pems = [v for v in data.values() if isinstance(v, str) and "BEGIN" in v]
    assert len(pems) == 2  # one certificate, one key
    restored = security_from_dict(data)
    for field in ("tls_ca_file", "tls_worker_cert", "tls_worker_key", "tls_client_cert",
                  "tls_client_key", "require_encryption", "tls_min_version"):
        assert getattr(restored, field) == getattr(security, field), field
    assert restored.extra_conn_args == {"relay_token": "t0k"}
    assert restored.get_connection_args("worker")["ssl_context"] is not None


@pytest.mark.parametrize("data, message", [
    ({"name": "w"}, "missing 'scheduler_address'"),
    ({"name": 5, "scheduler_address": "tcp://a:1"}, "must be a string"),
    ({"name": "w", "scheduler_address": "tcp://a:1", "nthreads": 0}, "nthreads"),
    ({"name": "w", "scheduler_address": "tcp://a:1", "colour": "red"}, "unknown launch payload keys"),
])
def test_bad_payload_is_named(data, message):
    with pytest.raises(PayloadError, match=message):
        decode(msgpack.packb(data))
    with pytest.raises(PayloadError, match="not valid base64"):
        decode_b64("%%%")
