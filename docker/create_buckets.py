"""Create the S3 buckets that the single-host stack's URIs name, once, before anything uses them.

docker-compose.yaml runs this in the MLflow image (which has boto3) against MinIO. The buckets come
from the same variables the services read (DDPM_STORAGE for the pipeline's shared storage,
MLFLOW_ARTIFACTS_DESTINATION for the MLflow server), so a changed URI cannot leave its bucket
uncreated. Existing buckets are kept; credentials and endpoint come from the usual AWS_* variables.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

URI_VARIABLES = ("DDPM_STORAGE", "MLFLOW_ARTIFACTS_DESTINATION")


def buckets(env: Mapping[str, str]) -> list[str]:
    """The distinct buckets of the s3:// URIs in URI_VARIABLES, in order; other schemes are skipped
    (a local or NFS path needs no bucket)."""
    found: list[str] = []
    for name in URI_VARIABLES:
        uri = env.get(name, "")
        if uri.startswith("s3://"):
            bucket = uri[len("s3://") :].split("/", 1)[0]
            if bucket and bucket not in found:
                found.append(bucket)
    return found


def main() -> int:
    import boto3
    from botocore.exceptions import ClientError

    wanted = buckets(os.environ)
    if not wanted:
        print(f"no s3:// URI in {', '.join(URI_VARIABLES)}; nothing to create", flush=True)
        return 0
    # boto3 reads AWS_ENDPOINT_URL itself; passing it explicitly also covers older botocores.
    client = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)
    for bucket in wanted:
        try:
            client.create_bucket(Bucket=bucket)
            print(f"created bucket {bucket}", flush=True)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                raise
            print(f"bucket {bucket} exists", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
