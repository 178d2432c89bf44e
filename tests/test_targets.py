"""The one constructor for delivery targets: the legacy path is the operator's, the forwarded
fields are checked once, at creation (shim/targets.py)."""

from __future__ import annotations

import pytest

from shim.errors import ShimError
from shim.targets import (
    connection_fields,
    forwarded_fields,
    media_type,
    request_target,
    target,
    template_path,
)

UPLOAD_ID = "shim-id-123"


def refusal(call: object, *args: object, **kwargs: object) -> ShimError:
    with pytest.raises(ShimError) as refused:
        call(*args, **kwargs)  # type: ignore[operator]
    assert refused.value.status == 400
    return refused.value


@pytest.mark.parametrize(("template", "values", "path"), [
    ("/uploads/{id}", {}, f"/uploads/{UPLOAD_ID}"),
    ("/uploads/{id}", {"id": "../../etc/passwd"}, f"/uploads/{UPLOAD_ID}"),  # never the client's
    ("/u/{user}/{filename}", {"user": "ann", "filename": "a b/c?.txt"},
     "/u/ann/a%20b%2Fc%3F.txt"),
    ("/u/{filename}", {"filename": "été"}, "/u/%C3%A9t%C3%A9"),
    ("/u/{filename}", {"filename": "..."}, "/u/..."),  # three dots are a name
    ("/u/{filename}-{filename}", {"filename": "x"}, "/u/x-x"),
    ("/u/{a}/{a}/{id}.bin", {"a": "X y"}, f"/u/X%20y/X%20y/{UPLOAD_ID}.bin"),
    ("/u/{id}/{name}", {"name": "%2e%2e%2f"}, f"/u/{UPLOAD_ID}/%252e%252e%252f"),
])
def test_template_path_fills_in_the_shims_id_and_encoded_values(
        template: str, values: dict[str, str], path: str) -> None:
    assert template_path(template, UPLOAD_ID, values) == path


@pytest.mark.parametrize("value", ["", ".", "..", "%2e", "%2E%2e", ".%2e", "%2e."])
def test_a_dot_segment_value_refuses_the_creation_naming_the_key(value: str) -> None:
    error = refusal(template_path, "/u/{user}/{filename}", UPLOAD_ID,
                    {"user": "ann", "filename": value})
    assert "'filename'" in error.message


def test_a_missing_value_refuses_the_creation_naming_the_key() -> None:
    assert "'user'" in refusal(template_path, "/u/{user}", UPLOAD_ID, {}).message


def test_forwarded_fields_drop_hop_by_hop_connection_named_and_protocol_fields() -> None:
    fields = (("Authorization", "Bearer a"), ("Connection", "close, X-Hop"), ("X-Hop", "1"),
              ("Keep-Alive", "5"), ("Host", "shim"), ("Content-Length", "3"),
              ("Transfer-Encoding", "chunked"), ("Expect", "100-continue"),
              ("Tus-Resumable", "1.0.0"), ("Upload-Length", "3"), ("Content-Range", "bytes 0-2/3"),
              ("X-Custom", "kept"), ("Cookie", "c=1"))
    kept = forwarded_fields(fields, ("tus-", "upload-"), frozenset({"content-range"}))
    assert kept == (("Authorization", "Bearer a"), ("X-Custom", "kept"), ("Cookie", "c=1"))


def test_connection_fields_are_the_fixed_ones_and_those_connection_names() -> None:
    named = connection_fields((("Connection", "X-A , x-b"), ("connection", "X-C,X-E")))
    assert {"x-a", "x-b", "x-c", "x-e", "keep-alive", "host", "transfer-encoding"} <= named
    assert "x-d" not in named


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nb", "a\rb", "nul\x00", "\x01",
                                   "esc\x1b", "del\x7f"])
def test_a_field_value_with_a_control_character_refuses_the_creation(value: str) -> None:
    error = refusal(forwarded_fields, (("X-Note", value),))
    assert "X-Note" in error.message


@pytest.mark.parametrize("value", ["tab\tinside", "caf\udce9", "café", "", "a  b", "~!@#"])
def test_valid_field_values_obs_text_included_are_kept_as_received(value: str) -> None:
    assert forwarded_fields((("X-Note", value),)) == (("X-Note", value),)


@pytest.mark.parametrize("value", ["image/png", "text/plain; charset=utf-8",
                                   'multipart/x; boundary="a b;c"', "application/vnd.a+json",
                                   " text/csv ", "a/b;x=1;y=2"])
def test_media_types_are_accepted(value: str) -> None:
    assert media_type(value, "filetype") == value.strip()


@pytest.mark.parametrize("value", ["png", "image/", "/png", "image/png\r\nX: 1", "a/b; c",
                                   "a/b; c=", 'a/b; c="x', "image/png extra", "a b/c"])
def test_anything_but_a_media_type_refuses_naming_where_it_came_from(value: str) -> None:
    assert "the filetype metadata" in refusal(media_type, value, "the filetype metadata").message


def test_no_media_type_is_none() -> None:
    assert media_type(None, "x") is None and media_type("  ", "x") is None


def test_a_target_is_a_raw_body_by_default() -> None:
    built = target("PUT", "/x", ())
    assert (built.body, built.field, built.filename, built.content_type) == ("raw", "file", None, None)
    assert refusal(target, "PUT", "/x", (), content_type="nope").message.startswith(
        "Content-Type must be")


def test_target_puts_it_together_and_never_forwards_the_clients_content_type() -> None:
    built = target("POST", "/in/f", (("Content-Type", "evil/x"), ("X-A", "1"), ("Upload-X", "2")),
                   protocol_prefixes=("upload-",), content_type="image/png", body="multipart",
                   field="doc", filename="f.png")
    assert (built.method, built.path, built.headers) == ("POST", "/in/f", (("X-A", "1"),))
    assert (built.content_type, built.body, built.field, built.filename) == (
        "image/png", "multipart", "doc", "f.png")
    assert refusal(target, "PUT", "/x", (), content_type="nope", content_type_name="Z"
                   ).message.startswith("Z must be")


@pytest.mark.parametrize(("path", "wire"), [
    ("/in/a b", "/in/a%20b"), ("/in/\u00e9", "/in/%C3%A9"), ("/in/\udcff", "/in/%FF"),
    ("/in/%41?x=1&y=%20", "/in/%41?x=1&y=%20"), ("/in/\x00\x7f", "/in/%00%7F"),
])
def test_a_delivery_path_is_a_valid_request_target(path: str, wire: str) -> None:
    """RFC 9112 section 3.2: only visible ASCII; the rest percent-encoded from the bytes the
    client sent, escapes it wrote kept as written."""
    assert request_target(path) == wire
    assert target("PUT", path, ()).path == wire
