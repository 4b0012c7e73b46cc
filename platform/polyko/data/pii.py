"""PII masking for Korean text, as in Polyglot-Ko (step 3 of ``polyko.data.clean``).

Polyglot-Ko replaced bank account numbers, phone numbers and resident registration numbers with the
special tokens ``<|acc|>``, ``<|tel|>``, ``<|rrn|>`` (ids 30000-30002 of its tokenizer); polyko adds
``<|email|>``. Precision matters as much as recall: dates (2023-10-15, 23.10.15), prices
(15,000원), ISBNs (978-89-...), court case numbers (2020가합12345), times, scores, version numbers and
plain long numbers must survive. So every pattern is anchored on digit boundaries and uses the real
Korean numbering plans, and the riskier shapes are validated in Python (only on matches, which are rare):

* ``rrn`` - ``YYMMDD-GNNNNNN``: month 01-12, day 01-31 (checked against the month), G in 1-8
  (1-4 citizens, 5-8 registered foreigners). With a separator (``-``, space, en dash) the date check is
  enough; partially hidden forms (``900101-1******``) are masked too (birth date + sex are still PII).
  Without a separator 13 digits are an RRN if the check digit is valid (rejects 9 in 10 random
  13-digit numbers, e.g. EAN-13 barcodes 880...) OR if an RRN keyword (주민, 외국인등록) stands in
  the 16 characters before: numbers issued since October 2020 carry random last 6 digits (the
  registration-district digits and the check digit were dropped), so the check digit alone would miss
  9 in 10 of them; the keyword catches them where they are labelled, without masking every 13-digit
  number. A company registration number (법인등록번호, ``110111-1234567``) has the RRN's shape but is
  public by law (commercial registry; printed in site footers under the e-commerce act) and names no
  person: after 법인 in the 16 characters before, the number is left alone.
* ``tel`` - mobile 010/011/016/017/018/019, Seoul 02, regional 031-033/041-044/051-055/061-064,
  internet 070, personal 050x, free-call 080; separators ``-`` ``.`` space or none (``(02) 123-4567``,
  ``02)123-4567`` too); international ``+82 10-1234-5678``, ``+82-10-...``, ``+82 (0)2 ...``,
  ``+821012345678``; nationwide service numbers ``1588-1234`` (15xx/16xx/18xx with a hyphen or dot) unless
  the pair reads as a year range (``1950-1953``) or is followed by 년.
* ``acc`` - hyphenated digit groups in the layouts Korean banks print: 3-2-6 (SC, old 신한), 3-3-6 (신한,
  케이뱅크), 3-6-5 (하나), 4-3-6 (우리), 4-4-5, 6-2-6 (국민, 우체국, 단위농협), 3-4-4-2 (농협), 3-6-2-3 (기업),
  4-2-7 (카카오뱅크), 4-4-4 (토스뱅크), 3-6-3 (씨티), and 4-4-4-4 card numbers; plus any 10-14 digit
  number right after a bank name or 계좌/계좌번호/입금, plain, hyphenated or space-separated
  (``신한은행 110 123 456789``: people type the groups with spaces; only the leading groups that add
  up to 10-14 digits are masked, so a year after the number survives). Bank names that are everyday
  words -- 우리 (we), 하나 (one), 국민 (people), 기업 (company), 산업, the city names 부산/대구/광주/
  제주/경남/전북, the brands 카카오/토스 -- count only as 우리은행/하나은행/... or when the number
  follows them directly (``우리 1002123456789``): in ``주문번호 우리 집 12345678901`` a word stands
  between, and the order number survives. Phone and date shapes (3-4-4, 2-4-4, 4-2-2) are not
  account layouts, and the bank name itself is kept.
* ``email`` - RFC-ish ``local@domain.tld`` (ASCII local part, ASCII or IDN domain, TLD of letters).

Order: email, rrn, acc, tel (an e-mail may contain a phone number; an IBK account starts with 010).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PII_TOKENS: dict[str, str] = {"acc": "<|acc|>", "tel": "<|tel|>", "rrn": "<|rrn|>", "email": "<|email|>"}
PII_KINDS: tuple[str, ...] = ("email", "rrn", "acc", "tel")  # application order


@dataclass
class PIIConfig:
    """Which PII kinds to mask (each replaced by its ``PII_TOKENS`` token)."""

    acc: bool = True
    """Bank account / card numbers -> ``<|acc|>``."""
    tel: bool = True
    """Phone numbers (mobile, landline, 070/050x/080, 15xx service, +82) -> ``<|tel|>``."""
    rrn: bool = True
    """Resident registration numbers (주민등록번호, also 외국인등록번호) -> ``<|rrn|>``."""
    email: bool = True
    """E-mail addresses -> ``<|email|>``."""
    rrn_checksum_without_separator: bool = True
    """13 digits without a separator count as an RRN only if the check digit is valid (precision);
    False = date check only (higher recall, masks some barcodes)."""


# ---------------------------------------------------------------------------------------------------
# e-mail: local part ASCII; domain labels may be IDN (한글.kr) but the TLD is letters.
# A '.' or Hangul may directly precede the address ('드릴께요.joon@...', '주세요abc@...').
_EMAIL_RE = re.compile(
    r"(?<![A-Za-z0-9_%+-])[A-Za-z0-9](?:[A-Za-z0-9._%+-]{0,63})@"
    r"(?:[A-Za-z0-9가-힣](?:[A-Za-z0-9가-힣-]{0,62}[A-Za-z0-9가-힣])?\.)+"
    r"[A-Za-z]{2,24}(?![A-Za-z0-9-])"
)

# RRN: YYMMDD [sep] G NNNNNN. Day validated against month in _rrn_ok.
_RRN_RE = re.compile(
    r"(?<![\d-])(\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01]))"
    r"(?:(\s?[-–]\s?|\s)([1-8])([\d*]{6})|([1-8])(\d{6}))(?![\d*])"
)
_DAYS_IN_MONTH = (0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_RRN_WEIGHTS = (2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5)
_CONTEXT_CHARS = 16  # how far before a number a keyword (주민 / 법인) is looked for
_RRN_KEYWORDS = ("주민", "외국인등록")


def _rrn_ok(m: re.Match, checksum_no_sep: bool) -> bool:
    date = m.group(1)
    if int(date[4:6]) > _DAYS_IN_MONTH[int(date[2:4])]:
        return False
    before = m.string[max(0, m.start() - _CONTEXT_CHARS):m.start()]
    if "법인" in before:  # company registration number: same shape, public, not personal data
        return False
    if m.group(2) is not None:  # with separator: the date check is enough
        rest = m.group(4)
        # '900101-1******' or full digits; reject mixes like '12*4*6' (not a masking style).
        return rest.isdigit() or rest.lstrip("0123456789").count("*") == len(rest.lstrip("0123456789"))
    if not checksum_no_sep or any(k in before for k in _RRN_KEYWORDS):
        return True  # labelled as an RRN: numbers issued since Oct 2020 have no valid check digit
    digits = date + m.group(5) + m.group(6)
    check = (11 - sum(int(d) * w for d, w in zip(digits[:12], _RRN_WEIGHTS)) % 11) % 10
    return check == int(digits[12])


# Account layouts (digit-group lengths), hyphen required between groups. Longest first.
_ACC_LAYOUTS = (
    (4, 4, 4, 4), (3, 6, 2, 3), (3, 4, 4, 2), (6, 2, 6), (3, 6, 5), (4, 4, 5), (4, 3, 6), (4, 2, 7),
    (3, 3, 6), (3, 2, 6), (4, 4, 4), (3, 6, 3),
)
_ACC_LAYOUT_RE = re.compile(
    r"(?<![\d.,/-])(?:"
    + "|".join("-".join(r"\d{%d}" % n for n in layout) for layout in _ACC_LAYOUTS)
    + r")(?![\d-]|\.\d|,\d)"
)
# Names that only mean a bank (longest first within a family).
_BANKS = (
    "국민은행|KB국민|신한은행|신한|우리은행|하나은행|KEB하나|농협은행|농협|NH농협|"
    "기업은행|IBK기업|IBK|카카오뱅크|케이뱅크|토스뱅크|SC제일은행|SC제일|제일은행|씨티은행|"
    "새마을금고|신협|우체국|수협은행|수협|산업은행|대구은행|부산은행|경남은행|"
    "광주은행|전북은행|제주은행|iM뱅크|은행|뱅크"
)
# Bank names that are also everyday words / places / brands: a bank only with the number right after.
_AMBIGUOUS_BANKS = "우리|하나|국민|기업|산업|부산|대구|광주|제주|경남|전북|카카오|토스|KB|NH|씨티|새마을"
# Digits of an account after a keyword: one run, or groups joined by '-' or one space.
_ACC_NUMBER = r"(?<![\d-])(\d{2,14}(?:(?:-| )\d{2,8}){0,4})(?![\d]|-\d)"
# Bank name / account keyword, then within a few characters a 10-14 digit number.
_ACC_KEYWORD_RE = re.compile(
    r"((?:(?:" + _BANKS + r"|계좌번호|계좌|입금계좌|입금)\s?(?:계좌번호|계좌|번호)?\s?[:：]?\s?"
    r"(?:\(?[가-힣A-Za-z]{1,6}\)?\s?)?|(?<![가-힣A-Za-z])(?:" + _AMBIGUOUS_BANKS + r")\s?))" + _ACC_NUMBER
)

# Phone numbers. Separator: '-', '.', one space, or none; ')' after the area code.
_SEP = r"(?:\s?[-.]\s?|\s|\)\s?|)"
_AREA = r"(?:01[016789]|02|0(?:3[1-3]|4[1-4]|5[1-5]|6[1-4])|070|050\d|080)"
_TEL_RE = re.compile(
    # Not after a Latin letter, digit or URL/number punctuation; Hangul may precede ('번호010-...'),
    # and so may an ellipsis ('없나...010 2318 2919'), but not a decimal point ('3.0212345678').
    r"(?<![\dA-Za-z,/:_=&?-])(?<!\d\.)(?:"
    # +82 forms: +82 10-..., +82-2-..., +82 (0)10 ..., +821012345678
    r"\+\s?82[-.\s]?(?:\(0\)\s?)?0?(?:1[016789]|2|3[1-3]|4[1-4]|5[1-5]|6[1-4]|70|80)"
    + _SEP + r"\d{3,4}" + _SEP + r"\d{4}"
    # domestic: (02) 123-4567, 010-1234-5678, 01012345678
    r"|(?:\(" + _AREA + r"\)\s?|" + _AREA + _SEP + r")\d{3,4}(?:\s?[-.]\s?|\s|)\d{4}"
    r")(?![\d]|[.,-]\d)"
)
# Service numbers 15xx/16xx/18xx-xxxx (hyphen or dot only: 8 plain digits are too ambiguous).
_SERVICE_RE = re.compile(r"(?<![\dA-Za-z.,/:_-])(1[568]\d{2})[-.](\d{4})(?![\d]|[.,-]\d|\s?년)")


def _service_ok(m: re.Match) -> bool:
    a, b = int(m.group(1)), int(m.group(2))
    # '1950-1953', '1592-1598' read as year ranges; a service number's second group is arbitrary.
    return not (1500 <= b <= 2099 and b > a)


_DIGIT_RE = re.compile(r"\d\d\d")


def _acc_layout_ok(m: re.Match) -> bool:
    groups = m.group(0).split("-")
    # '2019-2020-2021' (4-4-4) is a run of years, not a Toss account.
    return not all(len(g) == 4 and 1900 <= int(g) <= 2099 for g in groups)


class _Masker:
    """Callable for re.sub that validates matches and counts replacements."""

    __slots__ = ("token", "ok", "n", "group")

    def __init__(self, token: str, ok=None, group: int = 0):
        self.token, self.ok, self.n, self.group = token, ok, 0, group

    def __call__(self, m: re.Match) -> str:
        if self.ok is not None and not self.ok(m):
            return m.group(0)
        self.n += 1
        if self.group:  # keep the prefix (bank name) before the masked number
            return m.group(self.group) + self.token
        return self.token


# A counter or unit right after a number makes it a quantity (하나 12345678901개, 입금 12345678901원).
_UNIT_RE = re.compile(r"\s?(?:개|원|명|건|회|번째|년|월|일|시간|분|초|달러|위|등|점|%|배|km|kg|톤|주|장|권|대|마리|살|세)")


class _AccKeywordMasker:
    """re.sub callback for ``_ACC_KEYWORD_RE``: masks the leading digit groups that add up to 10-14
    digits (the rest, e.g. a year typed after the number, is kept), never a phone number."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, m: re.Match) -> str:
        number = m.group(2)
        parts = re.split(r"([- ])", number)  # groups and the separators between them
        digits, best = 0, -1
        for k in range(0, len(parts), 2):  # the longest run of leading groups with 10-14 digits
            digits += len(parts[k])
            if digits > 14:
                break
            if digits >= 10:
                best = k
        if best < 0:
            return m.group(0)
        head = "".join(parts[: best + 1])
        if best + 1 == len(parts) and _UNIT_RE.match(m.string, m.end()):
            return m.group(0)  # '12345678901개', '...원': a count or an amount, not an account
        # a phone number after '은행 고객센터' is a phone number (masked as tel later)
        if _TEL_RE.fullmatch(head) is not None:
            return m.group(0)
        self.n += 1
        return m.group(1) + PII_TOKENS["acc"] + "".join(parts[best + 1:])


def may_contain_pii(text: str) -> bool:
    """Cheap pre-check (one C scan): False means ``mask_pii`` would certainly change nothing."""
    return "@" in text or _DIGIT_RE.search(text) is not None


def mask_pii(text: str, cfg: PIIConfig) -> tuple[str, dict[str, int]]:
    """Replace PII with ``PII_TOKENS``; returns (text, counts by kind). Counts only non-zero kinds."""
    counts: dict[str, int] = {}
    if cfg.email and "@" in text:
        text, n = _EMAIL_RE.subn(PII_TOKENS["email"], text)
        if n:
            counts["email"] = n
    # Every remaining kind contains a run of >= 3 digits; most text has none: skip the regexes.
    if _DIGIT_RE.search(text) is None:
        return text, counts
    if cfg.rrn:
        ck = cfg.rrn_checksum_without_separator
        mk = _Masker(PII_TOKENS["rrn"], lambda m: _rrn_ok(m, ck))
        text = _RRN_RE.sub(mk, text)
        if mk.n:
            counts["rrn"] = mk.n
    if cfg.acc:
        mk = _Masker(PII_TOKENS["acc"], _acc_layout_ok)
        if "-" in text:  # every layout is hyphenated; the alternation is the costliest scan here
            text = _ACC_LAYOUT_RE.sub(mk, text)
        mk2 = _AccKeywordMasker()
        text = _ACC_KEYWORD_RE.sub(mk2, text)
        if mk.n + mk2.n:
            counts["acc"] = mk.n + mk2.n
    if cfg.tel:
        text, n = _TEL_RE.subn(PII_TOKENS["tel"], text)
        mk = _Masker(PII_TOKENS["tel"], _service_ok)
        text = _SERVICE_RE.sub(mk, text)
        if n + mk.n:
            counts["tel"] = n + mk.n
    return text, counts
