"""polyko.data.clean: normalization, quality filters, the composed clean_text, the bundled sample
corpus and the drop rates on the real shared corpus."""

from __future__ import annotations

import collections
import gzip
import json
import re
import unicodedata

import pytest

from polyko.config import apply_overrides, from_dict, to_dict
from polyko.data.clean import (
    FILTER_RULES,
    PII_TOKENS,
    SAMPLE_DIR,
    CleanConfig,
    CleanResult,
    FilterConfig,
    NormalizeConfig,
    clean_text,
)
from polyko.data.normalize import normalize_text

N = NormalizeConfig()


def norm(text: str, **kw) -> str:
    return normalize_text(text, NormalizeConfig(**kw) if kw else N)


def reason(text: str, **kw) -> str | None:
    return clean_text(text, CleanConfig(filters=FilterConfig(**kw))).reason


# --- public constants ------------------------------------------------------------------------------
def test_public_constants():
    assert PII_TOKENS == {"acc": "<|acc|>", "tel": "<|tel|>", "rrn": "<|rrn|>", "email": "<|email|>"}
    assert FILTER_RULES == ("empty", "too_short", "too_long", "low_hangul", "markup", "repetitive")


# --- normalization ---------------------------------------------------------------------------------
def test_nfd_hangul_is_composed():
    nfd = unicodedata.normalize("NFD", "한국어 문장을 정규화합니다")
    assert len(nfd) > len("한국어 문장을 정규화합니다")  # really decomposed into jamo
    assert norm(nfd) == "한국어 문장을 정규화합니다"
    r = clean_text(nfd + " 자모가 분리된 입력도 그대로 학습에 쓸 수 있어야 한다", CleanConfig())
    assert r.reason is None and unicodedata.is_normalized("NFC", r.text)


@pytest.mark.parametrize("raw,want", [
    ("&#39;기생충&#39; 최고 &hearts;&hearts;", "'기생충' 최고 ♥♥"),
    ("톰 &amp; 제리 &quot;명작&quot; &lt;강추&gt;", '톰 & 제리 "명작" <강추>'),
    ("&#xAC00;&#xB098;&#xB2E4; &#44032;", "가나다 가"),
    ("&#x1100;&#x1161;", "가"),  # jamo from entities are composed too
    ("가&#8203;나", "가나"),  # an entity-made zero-width space is removed
    ("R&D 투자, AT&T 주가, 링크 ?a=1&para=2&not=3", "R&D 투자, AT&T 주가, 링크 ?a=1&para=2&not=3"),  # no ';'
    ("&amp;lt;b&amp;gt; 이중 이스케이프", "&lt;b&gt; 이중 이스케이프"),  # decoded once, never twice
])
def test_html_entities(raw, want):
    assert norm(raw) == want


@pytest.mark.parametrize("raw,want", [
    ("<p>첫 문단입니다.</p><p>둘째 문단입니다.</p>", "첫 문단입니다.\n\n둘째 문단입니다."),  # </p><p> = paragraph break
    ("줄 하나<br>줄 둘<br/>줄 셋", "줄 하나\n줄 둘\n줄 셋"),
    ('<a href="https://example.com/x?a=1&b=2">링크</a> 입니다 <b>굵게</b>', "링크 입니다 굵게"),
    ("<script>var x = '<b>숨김</b>';</script>본문<style>p { color: red; }</style>만 남는다", "본문만 남는다"),
    ("앞<!-- 주석\n여러 줄 -->뒤", "앞뒤"),
    ("<SCRIPT type='text/javascript'>alert(1)</SCRIPT>대문자 태그", "대문자 태그"),
    ("<기생충>은 <올드보이>보다 좋다", "<기생충>은 <올드보이>보다 좋다"),  # Korean title brackets are not tags
    ("3 < 5 이고 7 > 2 이다", "3 < 5 이고 7 > 2 이다"),
    ("<!DOCTYPE html><html><head><title>제목</title></head><body><div>내용</div></body></html>", "제목\n\n내용"),
])
def test_html_tags(raw, want):
    assert norm(raw) == want


def test_html_switches_off():
    raw = "<b>굵게</b> &amp;"
    assert norm(raw, strip_html=False, unescape_html=False) == raw


@pytest.mark.parametrize("raw,want", [
    ("가\u200b나\u200d다\ufeff라\u00ad마", "가나다라마"),
    ("제어\x00문자\x07\x1b제거\x7f\x9f", "제어문자제거"),
    ("\u202e뒤집힌\u202c 글자", "뒤집힌 글자"),
    ("탭\t\t과 공백\u00a0\u3000\u2003섞임", "탭 과 공백 섞임"),
    ("윈도\r\n줄바꿈\r옛 맥", "윈도\n줄바꿈\n옛 맥"),
    ("  앞뒤 공백   여러    칸  ", "앞뒤 공백 여러 칸"),
    ("문단 하나\n\n\n\n\n문단 둘", "문단 하나\n\n문단 둘"),
    ("  줄 하나  \n   줄 둘   ", "줄 하나\n줄 둘"),
    ("줄\u2028바꿈\n다음", "줄\n바꿈\n다음"),
])
def test_control_and_whitespace(raw, want):
    assert norm(raw) == want


def test_blank_line_limit_is_configurable():
    assert norm("가\n\n\n나", max_blank_lines=0) == "가\n나"
    assert norm("가\n\n\n\n\n나", max_blank_lines=2) == "가\n\n\n나"


@pytest.mark.parametrize("raw,want", [
    ("ㅋㅋㅋㅋㅋㅋㅋㅋㅋㅋ 웃기다", "ㅋㅋㅋ 웃기다"),
    ("최고!!!!!!!!", "최고!!!"),
    ("그래서......", "그래서..."),
    ("슬퍼요 ㅠㅠㅠㅠㅠㅠ", "슬퍼요 ㅠㅠㅠ"),
    ("ㅎㅎㅎㅎ 좋다", "ㅎㅎㅎ 좋다"),
    ("ㅋㅋㅋ 적당한 웃음", "ㅋㅋㅋ 적당한 웃음"),
    ("와아아아아아아 대박", "와아아아 대박"),
    ("ㅋㅎㅋㅎㅋㅎㅋㅎㅋㅎㅋㅎ", "ㅋㅎㅋㅎㅋㅎ"),
    ("노잼노잼노잼노잼노잼", "노잼노잼노잼"),
    ("^^;^^;^^;^^;^^;", "^^;^^;^^;"),
    ("관객 1000000명, 상금 5,000,000원, 번호 0000", "관객 1000000명, 상금 5,000,000원, 번호 0000"),
    ("www.example.com", "www.example.com"),
])
def test_runs_are_shortened(raw, want):
    assert norm(raw) == want


def test_run_limits_are_configurable():
    assert norm("ㅋㅋㅋㅋㅋㅋ", max_char_repeat=2) == "ㅋㅋ"
    assert norm("ㅋㅋㅋㅋㅋㅋ", max_char_repeat=0, max_unit_repeat=0) == "ㅋㅋㅋㅋㅋㅋ"
    assert norm("ㅋㅎㅋㅎㅋㅎㅋㅎ", max_unit_repeat=2) == "ㅋㅎㅋㅎ"
    with pytest.raises(ValueError, match="max_char_repeat"):
        NormalizeConfig(max_char_repeat=1)
    with pytest.raises(ValueError, match="max_blank_lines"):
        NormalizeConfig(max_blank_lines=-1)


def test_normalize_is_idempotent_on_dirty_text():
    raw = "<p>&#39;가&#39;\u200b  ㅋㅋㅋㅋㅋ</p>\r\n\r\n\r\n<div>둘째!!!!!! ^^;^^;^^;^^;</div>"
    once = norm(raw)
    assert once == "'가' ㅋㅋㅋ\n\n둘째!!! ^^;^^;^^;"
    assert norm(once) == once


# --- filters ---------------------------------------------------------------------------------------
GOOD = [
    "연출도 좋고 배우들 연기도 최고",
    "솔직히 기대 안 했는데 생각보다 훨씬 재미있었어요. 가족이랑 다시 보러 갈 생각입니다 ㅋㅋㅋ",
    "서울시는 15일 청년 일자리 대책을 발표했다. 시는 올해 관련 예산을 20% 늘려 1,234억 원을 투입한다.",
    "훈민정음은 1443년 세종대왕이 창제한 문자로, 오늘날 한글이라 불린다.\n\n자음 17자와 모음 11자로 이루어져 있었다.",
    "A: 오늘 점심 뭐 먹을까?\nB: 비빔밥 어때?\nA: 좋아, 12시에 만나자.",
    "제이홉 사랑해 ♡ Happy birthday",
    "삼성전자는 AI 반도체와 HBM 메모리 투자를 늘린다고 밝혔다. CEO는 'Global Top'을 강조했다.",
    "http://blog.naver.com/example/220330200151 네이버 평점 9점 이상 영화들 모아둠",
    "<기생충>은 <올드보이>와 함께 [포토] 기사에도 자주 나온다 ^^;; 최고>>>>>다른 영화",
    "정말 정말 재밌어요 진짜로",
    "美 中 정상회담이 열렸다. 양국 정상은 무역 문제를 논의했다.",
]


@pytest.mark.parametrize("text", GOOD)
def test_keeps_good_korean_text(text):
    r = clean_text(text, CleanConfig())
    assert r.reason is None and r.text, r


@pytest.mark.parametrize("text,rule", [
    ("", "empty"),
    ("   \n\t\u3000 ", "empty"),
    ("<div><span></span></div>", "empty"),
    ("\u200b\ufeff", "empty"),
    ("최고", "too_short"),
    ("최고의 영화!", "too_short"),
    ("ㅋㅋㅋㅋㅋㅋㅋㅋㅋㅋㅋㅋ", "too_short"),  # shortened to 3 first
    ("This movie was absolutely wonderful, I would watch it again.", "low_hangul"),
    ("今日はとても良い天気ですね。散歩に行きましょう。", "low_hangul"),
    ("这部电影非常好看，我推荐给大家。", "low_hangul"),
    ("1234567890 !!! 10/10 *^^*", "low_hangul"),
    ("def add(a, b):\n    return a + b\n\nprint(add(1, 2))", "low_hangul"),
    ("[[분류:한국의 영화]] {{틀:영화 정보|제목=기생충|감독=봉준호|개봉=2019}} [[파일:포스터.jpg|섬네일]]", "markup"),
    ('const 설정 = {"이름": "홍길동", "나이": [30, 31]}; if (설정) { 출력(설정); }', "markup"),
    ("좋아요 좋아요 좋아요 좋아요 좋아요", "repetitive"),
    ("지금 바로 클릭하세요 최저가 보장\n" * 6, "repetitive"),
])
def test_drops_with_named_rule(text, rule):
    assert rule in FILTER_RULES
    r = clean_text(text, CleanConfig())
    assert r.reason == rule and r.text is None and r.pii == {}, r


def test_escaped_markup_is_dropped():
    # Entities are decoded after tag stripping, so escaped tags survive as text -- and get dropped.
    raw = "&lt;div class=&quot;본문&quot;&gt;&lt;span&gt;내용&lt;/span&gt;&lt;/div&gt;&lt;div&gt;&lt;/div&gt;"
    assert reason(raw) in ("markup", "low_hangul")
    raw = "&lt;표&gt;{가|나|다}&lt;/표&gt; [[틀:정보]] {{{값}}} 항목=값; 항목=값; $변수"
    assert reason(raw) == "markup"


SENTENCES = [
    "올해 지역 축제는 지난해보다 규모가 커졌다.", "주최 측은 안전 요원을 두 배로 늘렸다.",
    "시민들은 대중교통을 이용해 행사장을 찾았다.", "전통 음식 장터에는 긴 줄이 늘어섰다.",
    "어린이를 위한 체험 공간도 새로 마련됐다.", "저녁에는 불꽃놀이와 음악 공연이 이어졌다.",
    "상인들은 매출이 크게 늘었다며 반겼다.", "일부 주민은 소음 문제를 지적하기도 했다.",
    "시는 내년에도 축제를 이어 갈 계획이다.", "관광객 수는 사흘 동안 십만 명을 넘었다.",
    "자원봉사자 수백 명이 쓰레기 줍기에 나섰다.", "축제 기간 교통사고는 한 건도 없었다.",
]


def test_gopher_ngram_rules_on_long_documents():
    unique = " ".join(SENTENCES)
    assert len(unique.split()) >= 30
    assert reason(unique) is None
    assert reason(unique + " " + " ".join(SENTENCES[:5])) == "repetitive"  # duplicated 5..10-grams
    assert reason(" ".join(f"{i}번째 문장은 서로 다른 내용을 담고 있다." for i in range(12))) == "repetitive"  # top n-gram
    # short texts are judged by distinct-word share, not by Gopher's n-gram shares
    assert reason("정말 정말 정말 재밌어요 추천합니다") is None
    assert reason("정말 정말 정말 재밌어요 추천합니다", ngram_min_words=3, max_top_ngram_frac=(0.1,)) == "repetitive"


def test_duplicate_lines_rule():
    assert reason("\n".join(SENTENCES)) is None
    assert reason("\n".join(SENTENCES + SENTENCES[:2]), ngram_min_words=1000) is None  # 2/14 lines
    assert reason("\n".join(SENTENCES + SENTENCES[:6]), ngram_min_words=1000) == "repetitive"  # 6/18 = 33 %


def test_thresholds_are_configurable():
    assert reason("최고의 영화!", min_chars=5) is None
    assert reason("가나다라마바사아자차카", min_chars=1, max_chars=5) == "too_long"
    assert reason("제이홉 사랑해 ♡ Happy birthday", min_hangul_ratio=0.5) == "low_hangul"
    assert reason("This is English only text here", min_hangul_ratio=0.0) is None
    with pytest.raises(ValueError, match="min_hangul_ratio"):
        FilterConfig(min_hangul_ratio=1.5)
    with pytest.raises(ValueError, match="max_chars"):
        FilterConfig(min_chars=100, max_chars=10)


# --- composition -----------------------------------------------------------------------------------
def test_clean_text_pipeline_order():
    raw = ("<p>연락처 010-1234-5678 ㅋㅋㅋㅋㅋㅋ</p><p>정말 재미있는 영화였어요 &hearts; "
           "메일 fan@example.com</p>")
    r = clean_text(raw, CleanConfig())
    assert isinstance(r, CleanResult)
    assert r == CleanResult("연락처 <|tel|> ㅋㅋㅋ\n\n정말 재미있는 영화였어요 ♥ 메일 <|email|>", None, {"tel": 1, "email": 1})


def test_non_string_input_is_dropped_not_raised():
    assert clean_text(None, CleanConfig()).reason == "empty"  # type: ignore[arg-type]


def test_config_roundtrip_and_overrides():
    cfg = CleanConfig()
    d = to_dict(cfg)
    assert d["filters"]["max_top_ngram_frac"] == [0.2, 0.18, 0.16]
    assert from_dict(CleanConfig, d) == cfg
    cfg2 = apply_overrides(cfg, ["filters.min_chars=5", "pii.email=false", "normalize.max_char_repeat=2"])
    assert cfg2.filters.min_chars == 5 and cfg2.pii.email is False and cfg2.normalize.max_char_repeat == 2
    with pytest.raises(ValueError, match="unknown"):
        from_dict(CleanConfig, {"filters": {"min_char": 3}})


# --- the bundled sample corpus ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def sample_docs():
    with open(SAMPLE_DIR / "sample.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_sample_files_exist_and_parse(sample_docs):
    size = (SAMPLE_DIR / "sample.jsonl").stat().st_size
    assert 300_000 < size < 1_500_000
    assert all(set(d) >= {"id", "text", "source"} for d in sample_docs)
    with gzip.open(SAMPLE_DIR / "sample.jsonl.gz", "rt", encoding="utf-8") as f:
        gz = [json.loads(line) for line in f]
    txt = (SAMPLE_DIR / "sample.txt").read_text(encoding="utf-8").splitlines()
    assert len(gz) >= 100 and len(txt) >= 100
    ids = [d["id"] for d in sample_docs + gz]
    assert len(ids) == len(set(ids))


def test_sample_bad_file_has_the_advertised_defects():
    lines = (SAMPLE_DIR / "bad.jsonl").read_bytes().split(b"\n")
    good, broken_json, bad_utf8, nul = 0, 0, 0, 0
    for raw in filter(None, lines):
        nul += b"\x00" in raw
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            bad_utf8 += 1
            continue
        try:
            json.loads(text)
            good += 1
        except json.JSONDecodeError:
            broken_json += 1
    assert good >= 4 and broken_json >= 1 and bad_utf8 >= 1 and nul >= 2


def test_sample_is_reproducible_from_its_generator(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("sample_generate", SAMPLE_DIR / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.write(tmp_path)
    for name in gen.FILES:
        assert (tmp_path / name).read_bytes() == (SAMPLE_DIR / name).read_bytes(), name


def test_sample_kinds_are_cleaned_as_intended(sample_docs):
    cfg = CleanConfig()
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    pii_total: collections.Counter = collections.Counter()
    for d in sample_docs:
        r = clean_text(d["text"], cfg)
        by_kind[d["kind"]][r.reason] += 1
        pii_total.update(r.pii)
        if r.text is None:
            continue
        assert "<p>" not in r.text and "&amp;" not in r.text and "\u200b" not in r.text
        assert unicodedata.is_normalized("NFC", r.text)
        assert not re.search(r"([^\d\s])\1{3}", r.text), r.text
        if d["kind"] == "pii":
            assert r.pii, d["text"]
            assert not re.search(r"\d{3,4}[- ]\d{4}\b|@example\.", r.text), r.text
    assert set(by_kind["clean"]) == {None}  # natural text is never dropped
    for kind in ("pii", "html", "runs", "unicode", "dup_exact", "dup_near"):
        assert set(by_kind[kind]) == {None}, (kind, by_kind[kind])
    assert set(by_kind["short"]) <= {"too_short", "empty"}
    assert set(by_kind["foreign"]) | set(by_kind["code"]) <= {"low_hangul", "markup"}
    assert set(by_kind["spam"]) == {"repetitive"}
    assert set(by_kind["markup"]) <= {"markup", "empty"}
    assert set(pii_total) == {"acc", "tel", "rrn", "email"}


# --- the real corpus -------------------------------------------------------------------------------
def test_real_corpus_drop_rates(corpus_dir):
    """Edited text (KLUE sentences, Yonhap news) is kept almost entirely; noisy reviews lose their
    short and non-Korean entries. Exact counts for the whole corpus are in the README."""
    cfg = CleanConfig()
    stats: dict[str, collections.Counter] = {}
    for name in ("klue_dev_sentences", "soynlp_news_sample", "korean_news_parallel_ko", "nsmc_raw_sample"):
        c = collections.Counter()
        for path in sorted((corpus_dir / name).glob("*.jsonl"))[:1]:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    c[clean_text(json.loads(line)["text"], cfg).reason] += 1
        stats[name] = c
    kept = {k: c[None] / sum(c.values()) for k, c in stats.items()}
    assert kept["klue_dev_sentences"] > 0.995, stats["klue_dev_sentences"]
    assert kept["soynlp_news_sample"] > 0.99, stats["soynlp_news_sample"]
    assert kept["korean_news_parallel_ko"] > 0.95, stats["korean_news_parallel_ko"]
    assert 0.75 < kept["nsmc_raw_sample"] < 0.97, stats["nsmc_raw_sample"]
    assert stats["nsmc_raw_sample"]["too_short"] > stats["nsmc_raw_sample"]["low_hangul"] > 0
    assert set().union(*stats.values()) <= set(FILTER_RULES) | {None}


def _adversarial(real: list[str]) -> list[str]:
    """Real documents with the edits every normalisation/PII/filter rule reacts to spliced in."""
    import random

    bits = ["  ", " ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u200b", "\x85", "<b>", "</p>", "&amp;", "&#44032;",
            "@", "a@b.co", "010-1234-5678", "123", "12", "1", "ㅋㅋㅋㅋ", "ㅋㅋㅋ", "하하하하하하하하", "^^;^^;^^;^^;",
            "abab", "ababababab", "http://x.y/z", "www.naver.com", "/>", "{}", "[[", "$$", "|=|", "ᄀ", "ᅡ",
            "\u0301", "Ω", "ΑΣ ", "english words here", "Σ", "①②③", "١٢٣", "_", "가 가 가 가 가", "좋아요 " * 60,
            "x", "\x01", "\x00", "\ud800", "\U0001F600", "\U0001D400\U0001D401", "ＡＢＣ", "１２３"]
    rng = random.Random(7)
    out = []
    for t in real:
        for _ in range(rng.randint(0, 3)):
            i = rng.randint(0, len(t))
            t = t[:i] + rng.choice(bits) + t[i:]
        out.append(t)
    return out + bits + ["", " ", "가", "가나다라마바사아자차", " 가나다라마바사아자차카", "가나다라마바사아자차카 "]


def test_batch_fast_path_equals_clean_text(corpus_dir):
    """fast_decisions settles most documents of a batch at once; what it settles must be exactly what
    clean_text returns (text unchanged, no PII, same reason), on real and on adversarial text."""
    from polyko.data.clean import fast_decisions

    real = []
    for p in sorted(corpus_dir.rglob("*.jsonl"))[:8]:
        with open(p, encoding="utf-8") as f:
            real += [json.loads(l)["text"] for _, l in zip(range(1500), f)]
    docs = real + _adversarial(real[:4000]) + [None, 5]
    for cfg in (CleanConfig(), CleanConfig(filters=FilterConfig(min_unique_word_ratio=0.6, ngram_min_words=8,
                                                                 min_hangul_ratio=0.5, max_symbol_ratio=0.02)),
                CleanConfig(normalize=NormalizeConfig(max_char_repeat=2, max_unit_repeat=0))):
        decided, reasons = fast_decisions(docs, cfg)
        assert decided.sum() > 0.3 * len(real)
        for i in map(int, decided.nonzero()[0]):
            r = clean_text(docs[i], cfg)
            assert (r.text, r.reason, r.pii) == ((docs[i] if reasons[i] is None else None), reasons[i], {}), docs[i]
        # switched-off normalisation steps: no fast path (the per-document path decides everything)
        assert not fast_decisions(docs, CleanConfig(normalize=NormalizeConfig(strip_html=False)))[0].any()
