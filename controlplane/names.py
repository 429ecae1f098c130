"""Names of the objects pvlun makes for others (an importer pod for a claim, its Service), kept
within what the API server accepts however long the name they derive from.

Kubernetes names are DNS-1123 subdomains of at most 253 characters; Service names and label
values at most 63. `importer-` + a claim name of 253 characters is too long, so a name over its
limit keeps its start and ends in a hash of the whole (CDI shortens its `importer-<claim>` and
`cdi-upload-<claim>` names the same way, with the same FNV-1a hash): the same input always
gives the same name, so a controller finds again what it made.
"""

from __future__ import annotations

SUBDOMAIN_MAX = 253  # object names (Pods, Secrets, claims)
LABEL_MAX = 63       # Service names (DNS-1035 labels) and label values


def fnv1a_32(text: str) -> str:
    """The 32-bit FNV-1a hash of the text, 8 hex digits."""
    value = 0x811C9DC5
    for byte in text.encode():
        value = ((value ^ byte) * 0x01000193) & 0xFFFFFFFF
    return f"{value:08x}"


def bounded_name(text: str, limit: int = SUBDOMAIN_MAX) -> str:
    """`text` itself when it fits in `limit` characters, else its start and `-<hash of text>`.
    The start loses trailing '-' and '.', so the name stays valid wherever the text was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit - 9].rstrip('-.')}-{fnv1a_32(text)}"


def service_name(text: str) -> str:
    """A Service name (a DNS-1035 label, at most 63 characters) for a resource named `text`:
    dots become dashes. The text must start with a letter (pvlun's prefixes do)."""
    return bounded_name(text.replace(".", "-"), LABEL_MAX)


def label_value(text: str) -> str:
    """An object name as a label value (at most 63 characters)."""
    return bounded_name(text, LABEL_MAX)
