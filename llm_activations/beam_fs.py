"""Beam's filesystems for remote URLs (gs://, s3://, ...): the one place format/fileio reaches Beam.

format/ must stay importable where Beam is not installed (a training host reading a local
dataset), so fileio serves local paths with os alone and imports this module only at its first
URL. Everything here needs apache_beam (and, for gs://, its GCP extra).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor


def filesystems():
    from apache_beam.io.filesystems import FileSystems

    return FileSystems


def register_gcs() -> None:
    """Make gs:// known to FileSystems; ImportError without Beam's GCP extra."""
    import google.cloud.storage  # noqa: F401  (first: without it, importing Beam's io logs a warning of its own)
    import apache_beam.io.gcp.gcsfilesystem  # noqa: F401  (registers gs:// with FileSystems)


def list_gcs(prefix: str) -> list[tuple[str, int, str]]:
    """(url, size, crc32c) of every object whose name starts with prefix, in one paged listing
    through Beam's configured storage client (Beam's own list_files drops the crc32c)."""
    from apache_beam.io.gcp.gcsio import GcsIO, parse_gcs_path

    client = GcsIO().client
    bucket, name = parse_gcs_path(prefix, object_optional=True)
    return [(f"gs://{bucket}/{b.name}", int(b.size), b.crc32c) for b in client.list_blobs(client.bucket(bucket), prefix=name)]


def delete_gcs_objects(paths: list[str]) -> None:
    """One DELETE request per object, 16 at a time, instead of Beam's batch API: the same on GCS,
    and it also works against GCS emulators (fake-gcs-server), which cannot parse batch requests."""
    from apache_beam.io.gcp.gcsio import GcsIO

    gcs = GcsIO()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(gcs.delete, sorted(set(paths))))


def get_gcs_bucket(name: str):
    """The bucket, or None if it does not exist."""
    from apache_beam.io.gcp.gcsio import GcsIO

    return GcsIO().get_bucket(name)


def gcs_retry_policy():
    """Beam's own copy of the GCS client's retry policy (fileio.bound_gcs_retries bounds it too)."""
    from apache_beam.io.gcp import gcsio_retry

    return gcsio_retry.DEFAULT_RETRY_WITH_THROTTLING_COUNTER
