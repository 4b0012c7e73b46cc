"""PII masking (polyko.data.pii via polyko.data.clean): both directions, on realistic Korean sentences
and on the real shared corpus (NSMC reviews with real e-mail addresses and phone numbers)."""

from __future__ import annotations

import json
import re

import pytest

from polyko.data.clean import PII_TOKENS, CleanConfig, PIIConfig, clean_text
from polyko.data.normalize import NormalizeConfig, normalize_text
from polyko.data.pii import mask_pii


def _rrn_with_check(first12: str) -> str:
    """A syntactically valid 13-digit RRN (correct check digit) for the no-separator case."""
    w = (2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5)
    check = (11 - sum(int(d) * k for d, k in zip(first12, w)) % 11) % 10
    return first12 + str(check)


VALID_RRN_NOSEP = _rrn_with_check("900101123456")
INVALID_RRN_NOSEP = VALID_RRN_NOSEP[:-1] + str((int(VALID_RRN_NOSEP[-1]) + 1) % 10)
# Issued since Oct 2020: birth date + sex digit + 6 random digits, so the check digit is usually wrong.
NEW_RRN = _rrn_with_check("210315473829")[:-1] + str((int(_rrn_with_check("210315473829")[-1]) + 3) % 10)

# (sentence, the PII substring, kind) -- every PII string here is invented.
POSITIVE = [
    ("제 번호는 010-1234-5678입니다. 편하게 연락 주세요.", "010-1234-5678", "tel"),
    ("영화 있으신 분 문자 주세요 010 2872 0000", "010 2872 0000", "tel"),
    ("급하면 01012345678로 전화해", "01012345678", "tel"),
    ("연락처: 010.9876.5432 (저녁에만 받아요)", "010.9876.5432", "tel"),
    ("옛날 번호 011-318-7000 아직 쓰세요?", "011-318-7000", "tel"),
    ("사무실 대표번호는 (02) 123-4567입니다.", "(02) 123-4567", "tel"),
    ("본사 대표번호 02-3456-7890, 평일 9시부터", "02-3456-7890", "tel"),
    ("부산 지사 051-987-6543 로 오세요", "051-987-6543", "tel"),
    ("경기 지사 031-123-4567로 문의 바랍니다", "031-123-4567", "tel"),
    ("제주 매장 064 712 3456 영업시간 10시부터", "064 712 3456", "tel"),
    ("인터넷 전화 070-8765-4321 입니다", "070-8765-4321", "tel"),
    ("안심번호 0505-123-4567로 주문 접수", "0505-123-4567", "tel"),
    ("수신자 부담 080-234-5678", "080-234-5678", "tel"),
    ("해외에서는 +82 10-1234-5678로 거세요", "+82 10-1234-5678", "tel"),
    ("WhatsApp +82-10-2345-6789", "+82-10-2345-6789", "tel"),
    ("국제 표기 +821034567890 도 됩니다", "+821034567890", "tel"),
    ("서울 사무소 +82 (0)2 123 4567", "+82 (0)2 123 4567", "tel"),
    ("고객센터 1588-1234로 문의하세요", "1588-1234", "tel"),
    ("예약은 1577.9999 로", "1577.9999", "tel"),
    ("그분 연락처가...010 2318 0000 이래요", "010 2318 0000", "tel"),
    ("주민등록번호 900101-1234567을 적어 주세요", "900101-1234567", "rrn"),
    ("주민번호: 851231 - 2345678", "851231 - 2345678", "rrn"),
    ("외국인등록번호 990505-5123456 확인", "990505-5123456", "rrn"),
    ("뒷자리 가린 주민번호 880808-1******도 개인정보다", "880808-1******", "rrn"),
    (f"붙여 쓴 주민번호 {VALID_RRN_NOSEP} 입력", VALID_RRN_NOSEP, "rrn"),
    ("국민은행 123456-12-123456 (예금주 홍길동)", "123456-12-123456", "acc"),
    ("신한 110-123-456789로 입금해 주세요", "110-123-456789", "acc"),
    ("우리은행 1002-123-456789", "1002-123-456789", "acc"),
    ("하나은행 123-123456-12345 입금 확인", "123-123456-12345", "acc"),
    ("농협 301-1234-1234-11", "301-1234-1234-11", "acc"),
    ("기업은행 010-123456-01-011 로 보내주세요", "010-123456-01-011", "acc"),
    ("카카오뱅크 3333-01-1234567 이체 완료", "3333-01-1234567", "acc"),
    ("계좌번호: 1002123456789", "1002123456789", "acc"),
    ("국민은행 12345678901234로 송금", "12345678901234", "acc"),
    ("토스뱅크 1000-1234-5678", "1000-1234-5678", "acc"),
    ("카드번호 1234-5678-9012-3456 유출", "1234-5678-9012-3456", "acc"),
    # space-separated groups after a bank name (people type them so)
    ("신한은행 110 123 456789 로 입금", "110 123 456789", "acc"),
    ("우리은행 1002 123 456789 예금주 김철수", "1002 123 456789", "acc"),
    ("입금계좌 농협 301 1234 1234 11", "301 1234 1234 11", "acc"),
    # an everyday-word bank name counts when the number follows it directly
    ("우리 1002123456789로 입금", "1002123456789", "acc"),
    ("하나은행 12345678901234 (홍길동)", "12345678901234", "acc"),
    # RRNs issued since Oct 2020 (no valid check digit) where they are labelled
    (f"주민등록번호 {NEW_RRN} 입력", NEW_RRN, "rrn"),
    (f"주민번호:{NEW_RRN}", NEW_RRN, "rrn"),
    (f"외국인등록번호 {NEW_RRN[:6]}{'5'}{NEW_RRN[7:]} 확인", f"{NEW_RRN[:6]}5{NEW_RRN[7:]}", "rrn"),
    ("신생아 주민등록번호 210315-4738291 발급", "210315-4738291", "rrn"),
    ("메일은 hong.gildong@example.com 입니다", "hong.gildong@example.com", "email"),
    ("자막 있으신 분 review_fan+kr@example.co.kr로 보내주세요", "review_fan+kr@example.co.kr", "email"),
    ("부탁드립니다abc123@example.net감사합니다", "abc123@example.net", "email"),
    ("드릴께요.joon@example.org 입니다", "joon@example.org", "email"),
    ("회사 메일 user@회사.kr 로", "user@회사.kr", "email"),
]

# Numbers that are NOT personal data and must survive byte for byte.
NEGATIVE = [
    "개봉일은 2023-10-15이고 재개봉은 2023.12.01이다.",
    "23.10.15 기준 관객 수가 발표됐다.",
    "2019년 10월 3일에 촬영을 시작했다.",
    "티켓은 15,000원, 굿즈는 1,234,567원어치 팔렸다.",
    "누적 관객 1,234,567명을 돌파했다.",
    "ISBN 978-89-7012-345-6 으로 검색하면 나온다.",
    "구판 ISBN은 89-7012-345-6이다.",
    "평점 8/10, 별점 9.5점을 줬다.",
    "상영 시간은 오후 10:30부터 12:45까지.",
    "서울중앙지법 2020가합12345 사건과 대법원 2019도1234 판결",
    "버전 v1.2.3에서 2.10.11로 올렸다.",
    "한국전쟁(1950-1953년)을 다룬 영화",
    "임진왜란 1592-1598 사이의 이야기",
    "원주율은 3.1415926535로 계산했다.",
    "날짜를 20231015 형식으로 적는다.",
    "연락처는 010-xxxx-xxxx 로 가렸습니다.",
    "상금 1000000원을 받았다.",
    "2019-2020-2021 시즌 연속 우승",
    "은행 영업일 2023-10-15 기준",
    "사업자등록번호 123-45-67890 (상호 명시)",
    "평점 1010101010 드립니다",
    "좋아요@@ 최고@ 대박@.@",
    "@원작포스터 보러 가기",
    "0.0123456789 정도의 오차",
    "제1588회 로또 당첨 번호",
    "12시 30분에 만나요, 방 번호 1203호",
    "지번 주소 123-45, 우편번호 06236",
    "시속 300km로 2시간 30분 달렸다.",
    "1234567890123 같은 바코드는 주민번호가 아니다",
    f"체크 숫자가 틀린 {INVALID_RRN_NOSEP} 은 주민번호가 아니다",
    "990231-1234567 은 2월 31일이라 주민번호가 아니다",
    "전화 010 해도 돼",
    # everyday words that are also bank names, followed (not directly) by a long number
    "주문번호 우리 집 12345678901 배송 조회",
    "하나 더 주문했어요 주문번호 12345678901",
    "국민 여러분 접수번호 123456789012 로 조회하세요",
    "기업 고객 전용 송장번호 12345678901234",
    "대구 매장 재고 코드 12345678901",
    "하나 12345678901개의 별이 있다",
    "은행 잔고 12345678901원",
    # company registration numbers (public, not personal) in site footers
    "상호 (주)폴리코 | 대표 홍길동 | 법인등록번호 110111-1234567 | 사업자등록번호 123-45-67890",
    "법인번호: 1101111234567",
    "법인 등록번호 134511-0012345",
    # a new-style 13-digit number without an RRN label stays (barcodes, order numbers)
    f"상품 바코드 {NEW_RRN} 재고 있음",
    f"주문번호 {NEW_RRN}",
]


@pytest.mark.parametrize("sentence,pii,kind", POSITIVE, ids=[f"{k}-{i}" for i, (_, _, k) in enumerate(POSITIVE)])
def test_masks_pii(sentence, pii, kind):
    out, counts = mask_pii(sentence, PIIConfig())
    assert pii not in out, out
    assert PII_TOKENS[kind] in out, out
    assert counts.get(kind, 0) >= 1 and sum(counts.values()) == 1, counts
    # everything around the PII is untouched
    before, after = sentence.split(pii, 1)
    assert out == before + PII_TOKENS[kind] + after


@pytest.mark.parametrize("sentence", NEGATIVE)
def test_leaves_non_pii_alone(sentence):
    out, counts = mask_pii(sentence, PIIConfig())
    assert out == sentence and counts == {}


def test_bank_name_is_kept_and_phone_after_bank_is_tel():
    out, counts = mask_pii("국민은행 123456-12-123456, 은행 콜센터 02-1234-5678", PIIConfig())
    assert out == "국민은행 <|acc|>, 은행 콜센터 <|tel|>" and counts == {"acc": 1, "tel": 1}


def test_counts_several_kinds_in_one_text():
    text = ("담당자 연락처 010-1111-2222, 02-333-4444, 메일 a@example.com, b@example.kr, "
            "주민번호 900101-1234567, 계좌 신한 110-123-456789")
    out, counts = mask_pii(text, PIIConfig())
    assert counts == {"tel": 2, "email": 2, "rrn": 1, "acc": 1}
    assert not re.search(r"\d{3}", out), out


def test_kinds_can_be_switched_off():
    text = "010-1234-5678 / a@example.com / 900101-1234567 / 신한 110-123-456789"
    out, counts = mask_pii(text, PIIConfig(tel=False, email=False))
    assert "010-1234-5678" in out and "a@example.com" in out
    assert counts == {"rrn": 1, "acc": 1}
    out, counts = mask_pii(text, PIIConfig(acc=False, tel=False, rrn=False, email=False))
    assert out == text and counts == {}


def test_new_rrn_needs_its_label_and_company_number_is_not_rrn():
    """Both directions for the post-2020 RRN rule and the company registration number rule."""
    assert _rrn_with_check(NEW_RRN[:12]) != NEW_RRN  # really fails the check digit
    assert mask_pii(f"주민등록번호 {NEW_RRN}", PIIConfig())[1] == {"rrn": 1}
    assert mask_pii(f"코드 {NEW_RRN}", PIIConfig())[1] == {}
    # the same digits with a separator are an RRN (date check), unless labelled as a company number
    dashed = f"{NEW_RRN[:6]}-{NEW_RRN[6:]}"
    assert mask_pii(f"번호 {dashed}", PIIConfig())[1] == {"rrn": 1}
    assert mask_pii(f"법인등록번호 {dashed}", PIIConfig())[1] == {}
    # a labelled person's number next to a company number in one footer
    out, counts = mask_pii(f"법인등록번호 110111-1234567, 대표자 주민번호 {dashed}", PIIConfig())
    assert out == "법인등록번호 110111-1234567, 대표자 주민번호 <|rrn|>" and counts == {"rrn": 1}


def test_account_keyword_masks_only_the_account_digits():
    out, counts = mask_pii("신한은행 110 123 456789 2023년 개설", PIIConfig())
    assert out == "신한은행 <|acc|> 2023년 개설" and counts == {"acc": 1}
    out, _ = mask_pii("주문번호 우리 집 12345678901 배송 조회", PIIConfig())
    assert out == "주문번호 우리 집 12345678901 배송 조회"


def test_rrn_checksum_switch():
    bad = f"번호 {INVALID_RRN_NOSEP}"
    assert mask_pii(bad, PIIConfig())[1] == {}
    assert mask_pii(bad, PIIConfig(rrn_checksum_without_separator=False))[1] == {"rrn": 1}


def test_clean_text_reports_pii_counts():
    r = clean_text("이 영화 자막 있으신 분 제 메일 fan@example.com 으로 꼭 보내주세요 010-1234-5678", CleanConfig())
    assert r.reason is None
    assert r.text == "이 영화 자막 있으신 분 제 메일 <|email|> 으로 꼭 보내주세요 <|tel|>"
    assert r.pii == {"email": 1, "tel": 1}


def test_pii_does_not_decide_filters():
    # The address's Latin letters must not make this review 'low_hangul'.
    r = clean_text("kimminsu1987@example.com 본방사수 합니다 기대돼요", CleanConfig())
    assert r.reason is None and r.pii == {"email": 1}
    # Only a phone number: nothing is left to learn from once it is masked.
    assert clean_text("010-1234-5678", CleanConfig()).reason == "empty"
    assert clean_text("연락 주세요 010-1234-5678", CleanConfig()).reason == "too_short"


# --- the real corpus ------------------------------------------------------------------------------
# Independent, deliberately simple detectors (not the masker's patterns).
_EMAIL = re.compile(r"[A-Za-z0-9._-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_MOBILE = re.compile(r"(?<![\d=])01[016789][-. ]?\d{3,4}[-. ]?\d{4}(?!\d)")
_DATE = re.compile(r"(?<!\d)(?:19|20)\d{2}[-./](?:0?[1-9]|1[0-2])[-./](?:0?[1-9]|[12]\d|3[01])(?!\d)")
_PRICE = re.compile(r"\d{1,3}(?:,\d{3})+\s?(?:원|명|달러|개)")


@pytest.fixture(scope="module")
def masked_corpus(corpus_dir):
    """(source, normalized text, masked text, counts) for every document of the shared corpus that
    has two adjacent digits, an '@' or a numeric entity (all others cannot hold PII, dates or prices)."""
    ncfg, pcfg = NormalizeConfig(), PIIConfig()
    candidate = re.compile(r"\d\d|@|&#")
    out, n_docs = [], 0
    for path in sorted(corpus_dir.glob("*/*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                n_docs += 1
                text = json.loads(line)["text"]
                if not candidate.search(text):
                    continue
                norm = normalize_text(text, ncfg)
                masked, counts = mask_pii(norm, pcfg)
                out.append((path.parent.name, norm, masked, counts))
    assert n_docs > 200_000 and len(out) > 10_000
    return out


def test_real_corpus_emails_and_phones_are_masked(masked_corpus):
    emails = phones = 0
    for _, norm, out, counts in masked_corpus:
        if _EMAIL.search(norm):
            emails += 1
            assert not _EMAIL.search(out), out
            assert counts.get("email", 0) >= 1
        if _MOBILE.search(norm):
            phones += 1
            assert not _MOBILE.search(out), out
            assert counts.get("tel", 0) + counts.get("email", 0) >= 1  # '0114868595@naver.com' is an e-mail
    # The NSMC sample's README lists 48 reviewer e-mails (a few share a line or are malformed);
    # its phone numbers are mostly mobile numbers.
    assert emails >= 40 and phones >= 5, (emails, phones)


def test_real_corpus_dates_and_prices_survive(masked_corpus):
    checked = 0
    for _, norm, out, _ in masked_corpus:
        keep = _DATE.findall(norm) + _PRICE.findall(norm)
        for s in keep:
            assert s in out, (s, out)
        checked += bool(keep)
    assert checked > 40  # 54 documents with dates or prices in the shared corpus


def test_real_corpus_precision_budget(masked_corpus):
    """Across 222k real documents, acc/rrn masks are absent (nobody posts them in reviews/news) and
    tel masks stay few: a regression that starts masking ordinary numbers shows up here."""
    total: dict[str, int] = {}
    for _, _, _, counts in masked_corpus:
        for k, v in counts.items():
            total[k] = total.get(k, 0) + v
    assert total.get("acc", 0) == 0 and total.get("rrn", 0) == 0, total
    assert 5 <= total.get("tel", 0) <= 20, total
    assert 40 <= total.get("email", 0) <= 60, total
