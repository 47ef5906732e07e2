"""``backend="aws_ec2"``: :class:`~.provider.EC2Provider` (EC2's calls and config) and
:mod:`.dismantle` (the keeper's StopInstances/TerminateInstances call on the VM)."""

from .provider import (
    LIVE_STATES,
    TAG,
    TAG_CLUSTER,
    TAG_MODE,
    TAG_USER,
    EC2CapacityError,
    EC2Error,
    EC2Provider,
    VMUnreachableError,
    describe_client_error,
)

__all__ = ["EC2Provider", "EC2Error", "EC2CapacityError", "VMUnreachableError",
           "describe_client_error", "LIVE_STATES", "TAG", "TAG_CLUSTER", "TAG_USER", "TAG_MODE"]
