"""``aws_s3`` storage through boto3 (``endpoint_url`` for moto, MinIO, Ceph...)."""

from __future__ import annotations

import fnmatch
import os

from dask_lithops.storage.utils import StorageNoSuchKeyError

_NOT_FOUND = ("404", "NoSuchKey", "NoSuchBucket", "NotFound")


class StorageBackend:
    def __init__(self, config: dict):
        import boto3
        from botocore.config import Config

        self.config = config
        self.region = config.get("region") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self.session = boto3.Session(
            aws_access_key_id=config.get("access_key_id"),
            aws_secret_access_key=config.get("secret_access_key"),
            aws_session_token=config.get("session_token"),
            region_name=self.region,
        )
        self.s3_client = self.session.client(
            "s3", endpoint_url=config.get("endpoint_url") or config.get("endpoint") or None,
            config=Config(max_pool_connections=128, connect_timeout=10, read_timeout=60,
                          retries={"max_attempts": 5}))

    def get_client(self):
        return self.s3_client

    def generate_bucket_name(self) -> str:
        user = self.session.client("sts").get_caller_identity()["UserId"].split(":")[0][-4:].lower()
        return f"lithops-{self.region}-{user}"

    def _raise(self, e, bucket, key=""):
        import botocore.exceptions

        if isinstance(e, botocore.exceptions.ClientError):
            code = str(e.response.get("Error", {}).get("Code"))
            if code in _NOT_FOUND:
                raise StorageNoSuchKeyError(bucket, key) from e
        raise e

    def create_bucket(self, bucket):
        import botocore.exceptions

        try:
            self.s3_client.head_bucket(Bucket=bucket)
            return
        except botocore.exceptions.ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) not in _NOT_FOUND:
                raise
        if self.region == "us-east-1":
            self.s3_client.create_bucket(Bucket=bucket)
        else:
            self.s3_client.create_bucket(
                Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": self.region})

    def put_object(self, bucket, key, data):
        try:
            self.s3_client.put_object(Bucket=bucket, Key=key, Body=data)
        except Exception as e:
            self._raise(e, bucket, key)

    def get_object(self, bucket, key, stream=False, extra_get_args=None):
        try:
            r = self.s3_client.get_object(Bucket=bucket, Key=key, **(extra_get_args or {}))
        except Exception as e:
            self._raise(e, bucket, key)
        return r["Body"] if stream else r["Body"].read()

    def upload_file(self, file_name, bucket, key=None, extra_args=None, config=None):
        kwargs = {"ExtraArgs": extra_args} if extra_args else {}
        if config:
            kwargs["Config"] = config
        self.s3_client.upload_file(Filename=file_name, Bucket=bucket,
                                   Key=key or os.path.basename(file_name), **kwargs)
        return True

    def download_file(self, bucket, key, file_name=None, extra_args=None, config=None):
        kwargs = {"ExtraArgs": extra_args} if extra_args else {}
        if config:
            kwargs["Config"] = config
        self.s3_client.download_file(Bucket=bucket, Key=key, Filename=file_name or key, **kwargs)
        return True

    def head_object(self, bucket, key):
        try:
            return self.s3_client.head_object(Bucket=bucket, Key=key)["ResponseMetadata"]["HTTPHeaders"]
        except Exception as e:
            self._raise(e, bucket, key)

    def delete_object(self, bucket, key):
        return self.s3_client.delete_object(Bucket=bucket, Key=key)

    def delete_objects(self, bucket, key_list):
        key_list = list(key_list)
        return [self.s3_client.delete_objects(
                    Bucket=bucket, Delete={"Objects": [{"Key": k} for k in key_list[i:i + 1000]]})
                for i in range(0, len(key_list), 1000)]

    def head_bucket(self, bucket):
        try:
            return self.s3_client.head_bucket(Bucket=bucket)
        except Exception as e:
            self._raise(e, bucket)

    def _pages(self, bucket, prefix):
        paginator = self.s3_client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix or ""):
                yield from page.get("Contents", [])
        except Exception as e:
            self._raise(e, bucket, prefix or "")

    def list_objects(self, bucket, prefix=None, match_pattern=None):
        return [item for item in self._pages(bucket, prefix)
                if match_pattern is None or fnmatch.fnmatchcase(item["Key"], match_pattern)]

    def list_keys(self, bucket, prefix=None):
        return [item["Key"] for item in self._pages(bucket, prefix)]
