"""The S3 multipart upload API: the protocol (`protocol.py`), its XML documents
(`documents.py`), request bodies as the S3 tools send them (`body.py`) and AWS Signature
Version 4 (`sigv4.py`)."""

from shim.protocols.s3.protocol import S3

__all__ = ["S3"]
