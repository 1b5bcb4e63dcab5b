"""``pfstorer restore-batch``'s output naming, without Ray."""

from __future__ import annotations


def test_output_uri_is_stable_and_unique() -> None:
    from pipelines.batch_restore import output_uri_for

    a = output_uri_for("s3://b/out/", "acme", "bob", "s3://x/1/photo 1.jpg")
    assert a == output_uri_for("s3://b/out", "acme", "bob", "s3://x/1/photo 1.jpg")
    assert a.startswith("s3://b/out/images/acme/bob/photo_1-") and a.endswith(".png")
    assert a != output_uri_for("s3://b/out", "acme", "bob", "s3://x/2/photo 1.jpg")
