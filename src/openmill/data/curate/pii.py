"""PII masking: e-mail addresses, IPv4/IPv6 addresses and phone numbers (international and Chinese
mobile formats) are replaced by placeholders. Regex-based, as in datatrove's PIIFormatter and
BigScience's ROOTS; it masks, never drops, and counts what it masked."""

from __future__ import annotations

import ipaddress
import re

from openmill.data.curate.config import PiiConfig

EMAIL_RE = re.compile(r"\b[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b")
IPV4_RE = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\b")
IPV6_RE = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{1,4}(?![\w:])")
# +country code or a leading 0/1 area code, 9-15 digits in groups; Chinese mobiles (1[3-9]x xxxx xxxx).
PHONE_RE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?|\d{2,4}[\s.-])\d{3,4}[\s.-]\d{3,4}(?!\w)"
    r"|(?<!\d)1[3-9]\d[\s-]?\d{4}[\s-]?\d{4}(?!\d)"
)


def _valid_ipv6(m: re.Match) -> bool:
    try:
        ipaddress.IPv6Address(m.group(0))
        return True
    except ValueError:
        return False


class PiiMasker:
    name = "pii"

    def __init__(self, cfg: PiiConfig):
        self.cfg = cfg

    def mask(self, text: str) -> tuple[str, dict[str, int]]:
        """(masked text, {"emails": n, "ip_addresses": n, "phone_numbers": n})."""
        c, counts = self.cfg, {}
        if c.emails:
            text, counts["emails"] = EMAIL_RE.subn(c.email_replacement, text)
        if c.ip_addresses:
            text, n4 = IPV4_RE.subn(c.ip_replacement, text)
            n6 = 0
            if ":" in text:

                def sub6(m: re.Match) -> str:
                    nonlocal n6
                    if _valid_ipv6(m):
                        n6 += 1
                        return c.ip_replacement
                    return m.group(0)

                text = IPV6_RE.sub(sub6, text)
            counts["ip_addresses"] = n4 + n6
        if c.phone_numbers:
            text, counts["phone_numbers"] = PHONE_RE.subn(c.phone_replacement, text)
        return text, counts
