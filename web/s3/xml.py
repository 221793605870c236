"""S3 XML: response documents built with xml.etree, request documents parsed with defusedxml.

Responses use S3's namespace (``http://s3.amazonaws.com/doc/2006-03-01/``). Request documents
(CreateBucketConfiguration, Delete, CompleteMultipartUpload) are accepted with or without it,
as S3 does. Client XML is parsed with defusedxml: no entities, no DTDs, no external resources.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from datetime import UTC, datetime
from xml.etree.ElementTree import Element

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from web.s3.errors import S3Error

S3_NS = "http://s3.amazonaws.com/doc/2006-03-01/"
XML_CONTENT_TYPE = "application/xml"
_DECLARATION = b'<?xml version="1.0" encoding="UTF-8"?>\n'

# Characters XML 1.0 cannot carry literally (keys may contain them). S3 writes them as numeric
# character references; the bytes of these characters never occur inside a multi-byte UTF-8
# sequence, so they can be replaced in the serialized document byte-wise.
_XML_INVALID_BYTES = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f]|\xef\xbf[\xbe\xbf]")


def _char_ref(match: re.Match[bytes]) -> bytes:
    return b"&#x%X;" % ord(match.group().decode())


def _percent_escape(match: re.Match[bytes]) -> bytes:
    return b"".join(b"%%%02X" % byte for byte in match.group())


def document(root_name: str) -> Element:
    """A response root element in S3's namespace."""
    return Element(root_name, xmlns=S3_NS)


def child(parent: Element, name: str, text: object = None) -> Element:
    """Append ``<name>text</name>`` (booleans as ``true``/``false``) and return it."""
    element = ET.SubElement(parent, name)
    if text is not None:
        element.text = ("true" if text else "false") if isinstance(text, bool) else str(text)
    return element


def children(parent: Element, pairs: Iterable[tuple[str, object]]) -> Element:
    """Append several text children; ``None`` values are skipped (optional elements)."""
    for name, text in pairs:
        if text is not None:
            child(parent, name, text)
    return parent


def owner(parent: Element, peer_id: str, name: str = "Owner") -> Element:
    element = child(parent, name)
    child(element, "ID", peer_id)
    child(element, "DisplayName", peer_id)
    return element


def to_bytes(root: Element, *, strictly_valid: bool = False) -> bytes:
    """Serialize with the XML declaration. Characters XML 1.0 cannot carry become character
    references as S3 writes them (listings: clients ask for encoding-type=url to avoid them), or,
    with ``strictly_valid``, percent escapes, so that any XML parser reads the document."""
    body = ET.tostring(root, encoding="utf-8", xml_declaration=False)
    return _DECLARATION + _XML_INVALID_BYTES.sub(_percent_escape if strictly_valid else _char_ref, body)


def iso8601(timestamp_us: int) -> str:
    """S3's timestamp format in XML: ``2009-10-12T17:50:30.000Z``."""
    moment = datetime.fromtimestamp(timestamp_us / 1_000_000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def error_document(code: str, message: str, resource: str | None, request_id: str,
                   extra: dict[str, str] | None = None) -> bytes:
    root = Element("Error")
    children(root, [("Code", code), ("Message", message)])
    for name, value in (extra or {}).items():
        child(root, name, value)
    children(root, [("Resource", resource), ("RequestId", request_id)])
    return to_bytes(root, strictly_valid=True)  # every client must be able to read its errors


# ---------------------------------------------------------------------------------------------
# Request documents
# ---------------------------------------------------------------------------------------------


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def parse(body: bytes, root_name: str) -> Element:
    """Parse a client document whose root must be ``root_name`` (any namespace); MalformedXML otherwise."""
    try:
        root = SafeET.fromstring(body, forbid_dtd=True)
    except (ET.ParseError, DefusedXmlException, ValueError) as exc:
        raise S3Error("MalformedXML") from exc
    if _local(root.tag) != root_name:
        raise S3Error("MalformedXML", f"Expected a <{root_name}> document.")
    return root


def _children_named(element: Element, name: str) -> list[Element]:
    return [item for item in element if _local(item.tag) == name]


def _text_of(element: Element, name: str) -> str | None:
    found = _children_named(element, name)
    return (found[0].text or "") if found else None


def parse_create_bucket(body: bytes) -> str | None:
    """The LocationConstraint of a CreateBucketConfiguration, or None (no body, or none given)."""
    if not body.strip():
        return None
    root = parse(body, "CreateBucketConfiguration")
    location = _text_of(root, "LocationConstraint")
    return location.strip() if location is not None else None


def parse_delete(body: bytes, max_objects: int = 1000) -> tuple[bool, list[str]]:
    """(quiet, keys) of a multi-object Delete document."""
    root = parse(body, "Delete")
    quiet_text = (_text_of(root, "Quiet") or "false").strip().lower()
    if quiet_text not in ("true", "false"):
        raise S3Error("MalformedXML", "Quiet must be true or false.")
    keys: list[str] = []
    for item in _children_named(root, "Object"):
        key = _text_of(item, "Key")
        if key is None:
            raise S3Error("MalformedXML", "Every <Object> needs a <Key>.")
        keys.append(key)
    if not keys:
        raise S3Error("MalformedXML", "The Delete document lists no objects.")
    if len(keys) > max_objects:
        raise S3Error("MalformedXML", f"At most {max_objects} objects can be deleted in one request.")
    return quiet_text == "true", keys


def parse_complete_multipart(body: bytes) -> list[tuple[int, str]]:
    """[(part number, ETag without quotes)] of a CompleteMultipartUpload document, in document order."""
    root = parse(body, "CompleteMultipartUpload")
    parts: list[tuple[int, str]] = []
    for item in _children_named(root, "Part"):
        number_text = _text_of(item, "PartNumber")
        etag = _text_of(item, "ETag")
        if number_text is None or etag is None:
            raise S3Error("MalformedXML", "Every <Part> needs a <PartNumber> and an <ETag>.")
        try:
            number = int(number_text.strip())
        except ValueError:
            raise S3Error("MalformedXML", f"Part number {number_text!r} is not an integer.") from None
        parts.append((number, etag.strip().strip('"')))
    if not parts:
        raise S3Error("MalformedXML", "The CompleteMultipartUpload document lists no parts.")
    return parts
