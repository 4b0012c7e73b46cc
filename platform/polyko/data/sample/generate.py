"""Deterministic generator of polyko's bundled sample corpus (written by us; no third-party text).

    python platform/polyko/data/sample/generate.py        # rewrites the files next to this script

Clean natural-sounding Korean documents (news, reviews, dialogue, encyclopedia-like) are built from
templates x vocabulary lists with a seeded RNG and correct particles (은/는, 이/가, 을/를, 과/와, 으로/로),
and dirty records are mixed in on purpose, so the cleaning pipeline has something to do:
HTML pages and fragments with entities and script/style, FAKE personal data (phone numbers,
resident registration numbers, bank accounts, e-mails at example domains), exact and near
duplicates, ㅋㅋㅋ / !!!!! runs, very short lines, English/Japanese/Chinese lines, code, markup-only
lines, NFD-decomposed Hangul, zero-width characters, and repeated-line spam.

Outputs (committed): sample.jsonl (most documents; fields id, text, source, kind), sample.txt (one
document per line), sample.jsonl.gz, and bad.jsonl (a malformed JSON line, invalid UTF-8 bytes, NUL
bytes between good lines). ``kind`` says what a record was generated as ("clean", "html", "pii",
"dup", ...), so tests can check the pipeline against the intent. All personal data is invented.
"""

from __future__ import annotations

import gzip
import json
import random
import unicodedata
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20240501
N_CLEAN = 2000


def _batchim(word: str) -> int:
    """0 = no final consonant, 8 = ㄹ final, other = some final consonant (last Hangul syllable)."""
    ch = word[-1]
    if "가" <= ch <= "힣":
        return (ord(ch) - 0xAC00) % 28
    return 1 if ch in "0136781LMNRlmnr" else 0


def josa(word: str, pair: str) -> str:
    """word + the right particle of pair, e.g. josa('서울', '은/는') -> '서울은'."""
    a, b = pair.split("/")
    fin = _batchim(word)
    if pair == "으로/로":  # ㄹ-final takes 로 (서울로)
        return word + ("로" if fin in (0, 8) else "으로")
    return word + (a if fin else b)


CITIES = ["서울", "부산", "대구", "인천", "광주", "대전", "울산", "세종", "수원", "청주", "전주", "춘천", "강릉", "제주",
          "포항", "창원", "김해", "여수", "목포", "안동", "경주", "천안", "원주", "군산", "속초", "통영"]
ORGS = ["시청", "교육청", "구청", "도서관", "박물관", "문화재단", "상공회의소", "대학교", "연구원", "보건소", "소방본부",
        "관광공사", "체육회", "미술관", "과학관", "농업기술센터"]
TOPICS = ["청년 일자리", "탄소 중립", "전통 시장 활성화", "어린이 안전", "독서 문화", "노인 복지", "인공지능 교육",
          "대중교통 개선", "지역 축제", "미세먼지 저감", "문화유산 보존", "스마트 농업", "재난 대응", "관광 홍보",
          "소상공인 지원", "공공 와이파이", "도시 숲 조성", "반려동물 복지", "해양 쓰레기 수거", "기후 변화 적응"]
EVENTS = ["토론회", "설명회", "박람회", "공청회", "체험 행사", "전시회", "간담회", "워크숍", "캠페인", "음악회", "강연회"]
PEOPLE = ["시장", "교육감", "위원장", "연구원장", "관장", "대표", "교수", "센터장", "본부장", "이사장"]
SURNAMES = ["김", "이", "박", "최", "정", "강", "조", "윤", "장", "임", "한", "오", "서", "신", "권", "황", "안", "송", "류", "홍"]
GIVEN = ["민준", "서연", "도윤", "지우", "하준", "서윤", "은우", "지민", "시우", "수아", "예준", "하은", "주원", "윤서",
         "지호", "채원", "현우", "다은", "준서", "소율", "건우", "지안", "우진", "예린", "선우", "수빈"]
NUMS = ["2", "3", "5", "7", "10", "12", "15", "20", "25", "30", "40", "50", "100", "120", "300", "500"]
UNITS = ["명", "곳", "개", "건", "억 원", "만 원", "퍼센트", "가구", "개교", "대"]
ADJ_GOOD = ["따뜻한", "섬세한", "탄탄한", "유쾌한", "묵직한", "신선한", "아름다운", "깔끔한", "감동적인", "흥미로운", "잔잔한"]
ADJ_BAD = ["지루한", "뻔한", "어설픈", "산만한", "억지스러운", "밋밋한", "늘어지는", "과장된"]
MOVIE_PARTS = ["연출", "각본", "연기", "음악", "촬영", "편집", "결말", "대사", "미술", "액션", "캐릭터", "전개"]
GENRES = ["가족 영화", "스릴러", "로맨틱 코미디", "다큐멘터리", "애니메이션", "사극", "공포 영화", "청춘 드라마", "범죄 영화", "SF 영화"]
TITLES = ["바람의 정원", "마지막 편지", "푸른 골목", "별빛 기차", "겨울 항구", "달의 뒷면", "작은 식당", "여름의 끝",
          "빛나는 밤", "두 번째 봄", "고요한 숲", "오래된 약속", "붉은 지붕", "안개 도시", "하늘 정거장", "모래 시계"]
FOODS = ["김치찌개", "된장국", "비빔밥", "냉면", "떡볶이", "칼국수", "불고기", "순두부", "잡채", "김밥", "삼계탕", "수제비"]
PLACES = ["카페", "공원", "도서관", "시장", "영화관", "한강", "바닷가", "서점", "미술관", "산책로", "캠핑장", "온천"]
TIMES = ["오늘", "내일", "주말", "이번 주", "다음 달", "저녁", "아침", "퇴근 후", "점심시간"]
HOBBIES = ["등산", "요리", "사진", "독서", "자전거", "수영", "뜨개질", "피아노", "캠핑", "달리기", "그림", "텃밭 가꾸기"]
SUBJECTS = ["한글", "고려청자", "측우기", "판소리", "김치", "한옥", "온돌", "거북선", "훈민정음", "가야금", "탈춤", "씨름",
            "백두대간", "독도", "한라산", "지리산", "낙동강", "섬진강", "경복궁", "불국사", "석굴암", "수원 화성"]
FIELDS = ["역사", "과학", "예술", "지리", "음식 문화", "건축", "음악", "민속", "언어학", "생태"]
ERAS = ["조선 시대", "고려 시대", "삼국 시대", "통일 신라", "근대", "20세기 초", "1960년대", "1980년대"]
FEATURES = ["구조", "형태", "쓰임새", "제작 방법", "의미", "역사적 가치", "지역적 특징", "기록", "보존 상태"]


def _name(r: random.Random) -> str:
    return r.choice(SURNAMES) + r.choice(GIVEN)


def news(r: random.Random) -> str:
    city, org, topic, event = r.choice(CITIES), r.choice(ORGS), r.choice(TOPICS), r.choice(EVENTS)
    name, role = _name(r), r.choice(PEOPLE)
    month, day = r.randint(1, 12), r.randint(1, 28)
    n, unit = r.choice(NUMS), r.choice(UNITS)
    s = [
        f"{josa(city + ' ' + org, '은/는')} {month}월 {day}일 {josa(topic, '을/를')} 위한 {josa(event, '을/를')} 열었다고 밝혔다.",
        f"이번 {event}에는 시민과 전문가 등 {n}명 정도가 참석해 의견을 나눴다.",
        f"{josa(city, '은/는')} 지난해에도 {topic} 분야에 {n}{unit} 규모의 지원을 했다.",
        f"{name} {josa(role, '은/는')} \"{josa(topic, '은/는')} 한두 해에 끝나는 일이 아니다\"라며 \"꾸준히 현장의 목소리를 듣겠다\"고 말했다.",
        f"{josa(org, '은/는')} 올해 {topic} 관련 예산을 지난해보다 {r.choice(NUMS)}퍼센트 늘릴 계획이다.",
        f"행사에서는 {r.choice(TOPICS)} 사례도 함께 소개돼 눈길을 끌었다.",
        f"참가자들은 {josa(r.choice(TOPICS), '과/와')} {josa(topic, '을/를')} 함께 추진해야 한다는 데 뜻을 모았다.",
        f"{josa(city, '은/는')} 다음 달부터 {r.choice(PLACES)}에서 주민 설명회를 이어 갈 예정이다.",
        f"한편 {city}의 {topic} 지표는 {r.randint(2015, 2023)}년 이후 꾸준히 개선되고 있다.",
        f"자세한 내용은 {city + ' ' + org}의 누리집에서 확인할 수 있다.",
    ]
    k = r.randint(3, 7)
    return " ".join([s[0]] + r.sample(s[1:], k - 1))


def review(r: random.Random) -> str:
    title, genre = r.choice(TITLES), r.choice(GENRES)
    good, bad = r.choice(ADJ_GOOD), r.choice(ADJ_BAD)
    p1, p2 = r.sample(MOVIE_PARTS, 2)
    score = r.randint(1, 10)
    s = [
        f"{josa(title, '은/는')} 오랜만에 만난 {good} {genre}였다.",
        f"{josa(p1, '이/가')} 특히 좋았고 {josa(p2, '은/는')} 조금 {bad} 느낌이었다.",
        f"배우들의 연기가 {good} 분위기를 잘 살려 줬다.",
        f"중반부가 약간 {bad} 편이지만 마지막 장면 때문에 다시 보고 싶어졌다.",
        f"{r.choice(TIMES)}에 {r.choice(PLACES)}에서 보기 딱 좋은 영화다.",
        f"가족과 함께 봤는데 모두 만족했어요.",
        f"솔직히 기대를 많이 했는데 {josa(p2, '이/가')} 아쉬웠어요.",
        f"평점은 10점 만점에 {score}점 정도 주고 싶다.",
        f"원작을 읽은 사람이라면 {josa(p1, '을/를')} 비교해 보는 재미도 있을 것 같다.",
        f"음악이 {good} 여운을 남겨서 집에 오는 길에 계속 생각났다.",
    ]
    k = r.randint(2, 6)
    return " ".join(r.sample(s, k))


def dialogue(r: random.Random) -> str:
    a, b = _name(r), _name(r)
    food, place, time_, hobby = r.choice(FOODS), r.choice(PLACES), r.choice(TIMES), r.choice(HOBBIES)
    turns = [
        (f"{time_}에 뭐 해?", f"아직 계획은 없어. {josa(hobby, '이나/나')} 할까 생각 중이야."),
        (f"우리 {place}에 갈래?", f"좋아! {place}에서 {food}도 먹자."),
        (f"요즘 {josa(hobby, '을/를')} 배우고 있다며?", f"응, 생각보다 재미있어서 매일 조금씩 하고 있어."),
        (f"{josa(food, '이/가')} 먹고 싶다.", f"그럼 점심은 {food}{'으로' if _batchim(food) not in (0, 8) else '로'} 하자."),
        ("오늘 날씨 정말 좋다.", f"그러게, 이런 날은 {place}에 가야 하는데."),
        ("어제 잘 들어갔어?", "응, 덕분에 잘 들어갔어. 고마워."),
        ("이번 주말에 시간 괜찮아?", f"토요일은 괜찮고 일요일은 {hobby} 모임이 있어."),
    ]
    lines = []
    for q, ans in r.sample(turns, r.randint(2, 4)):
        lines.append(f"{a}: {q}")
        lines.append(f"{b}: {ans}")
    return "\n".join(lines)


def wiki(r: random.Random) -> str:
    subj, field, era, feat = r.choice(SUBJECTS), r.choice(FIELDS), r.choice(ERAS), r.choice(FEATURES)
    s = [
        f"{josa(subj, '은/는')} 한국의 {field}에서 중요한 위치를 차지하는 대상이다.",
        f"{era}에 널리 알려졌으며, 오늘날에도 많은 사람이 그 {josa(feat, '을/를')} 연구하고 있다.",
        f"{subj}의 {josa(feat, '은/는')} 지역과 시대에 따라 조금씩 다르게 나타난다.",
        f"학자들은 {josa(subj, '이/가')} {josa(r.choice([x for x in SUBJECTS if x != subj]), '과/와')} 밀접한 관계가 있다고 본다.",
        f"관련 기록은 {era}의 문헌에 처음 등장한다.",
        f"현재는 여러 박물관과 연구 기관에서 {josa(subj, '을/를')} 보존하고 소개하는 일을 맡고 있다.",
        f"{feat}에 대해서는 아직 밝혀지지 않은 부분도 많다.",
        f"이와 관련해 {r.choice(FIELDS)} 분야의 후속 연구가 꾸준히 이어지고 있다.",
    ]
    rest = r.sample(s[1:], len(s) - 1)  # disjoint sentences for the two paragraphs
    k = r.randint(2, 4)
    paras = [" ".join([s[0]] + rest[:k]), " ".join(rest[k:k + r.randint(2, 3)])]
    return "\n\n".join(paras[: r.randint(1, 2)])


GENERATORS = {"news": news, "review": review, "dialogue": dialogue, "wiki": wiki}


# --- dirty records (all personal data below is invented) ---------------------------------------------
def fake_phone(r: random.Random) -> str:
    fmt = r.choice(["010-{a}-{b}", "010 {a} {b}", "010{a}{b}", "02-{c}-{b}", "031-{c}-{b}", "+82 10-{a}-{b}",
                    "070-{a}-{b}"])
    return fmt.format(a=r.randint(2000, 9999), b=r.randint(1000, 9999), c=r.randint(200, 999))


def fake_rrn(r: random.Random) -> str:
    birth = f"{r.randint(60, 99):02d}{r.randint(1, 12):02d}{r.randint(1, 28):02d}"
    return f"{birth}-{r.choice('1234')}{r.randint(0, 999999):06d}"


def fake_acc(r: random.Random) -> str:
    bank, fmt = r.choice([("국민은행", "{6}-{2}-{6}"), ("신한은행", "{3}-{3}-{6}"), ("우리은행", "{4}-{3}-{6}"),
                          ("하나은행", "{3}-{6}-{5}"), ("카카오뱅크", "{4}-{2}-{7}"), ("농협", "{3}-{4}-{4}-{2}")])
    num = "-".join("".join(str(r.randint(0, 9)) for _ in range(int(g.strip("{}")))) for g in fmt.split("-"))
    return f"{bank} {num}"


def fake_email(r: random.Random) -> str:
    user = r.choice(["hong", "minji", "user", "kim.dev", "review_fan", "test"])
    return f"{user}{r.randint(1, 999)}@{r.choice(['example.com', 'example.kr', 'example.net'])}"


def pii_doc(r: random.Random) -> str:
    kind = r.choice(["tel", "rrn", "acc", "email", "mix"])
    base = r.choice([review, news])(r)
    if kind == "tel":
        extra = f"문의는 {josa(fake_phone(r), '으로/로')} 연락 주세요."
    elif kind == "rrn":
        extra = f"신청서에 주민등록번호 {fake_rrn(r)}를 적어 제출했다."
    elif kind == "acc":
        extra = f"후원금은 {fake_acc(r)} (예금주 {_name(r)})으로 보내 주시면 됩니다."
    elif kind == "email":
        extra = f"자막 파일 있으신 분은 {fake_email(r)} 으로 보내 주세요."
    else:
        extra = f"담당자 {_name(r)} 연락처 {fake_phone(r)}, 이메일 {fake_email(r)} 입니다."
    return base + " " + extra


def html_doc(r: random.Random) -> str:
    title = r.choice(TITLES)
    body = news(r)
    frag = r.choice([
        f"<p>{review(r)} &hearts;&hearts;</p>",
        f"<div class=\"post\">{review(r)}<br/>작성자 &amp; 관리자 &#39;공지&#39;</div>",
        f"<b>{josa(title, '은/는')}</b> 정말 &quot;명작&quot;이에요 &lt;강력 추천&gt;",
    ])
    if r.random() < 0.5:
        return frag
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{title} 소식</title>"
            f"<style>body {{ font-family: sans-serif; }} .ad {{ display: none; }}</style>"
            f"<script>var tracker = {{id: 42}}; function track() {{ return tracker.id; }}</script></head>"
            f"<body><h1>{title}</h1><p>{body}</p><!-- 광고 영역 --><ul><li>{r.choice(TOPICS)}</li>"
            f"<li>{r.choice(TOPICS)}</li></ul><p>{wiki(r)}</p></body></html>")


SHORT = ["최고", "굿", "ㅋㅋ", "별로", "최고의 영화!", "재밌어요", "강추", "ㅠㅠ", "노잼", "...", "감동", "10점", "!!", ""]
FOREIGN = [
    "This movie was absolutely wonderful and I would watch it again.",
    "The city council announced a new plan for public transport on Monday.",
    "今日はとても良い天気ですね。散歩に行きましょう。",
    "这部电影非常好看，我推荐给大家。",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit.",
    "Das Wetter ist heute schön und wir gehen in den Park.",
]
CODE = [
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
    "for (int i = 0; i < n; i++) { sum += arr[i]; }",
    "{\"name\": \"홍길동\", \"age\": 30, \"tags\": [\"a\", \"b\"], \"ok\": true}",
    ".container { display: flex; } .item[data-x=\"1\"] { color: #333; }",
    "SELECT id, name FROM users WHERE age > 20 ORDER BY name;",
    "if (x == null) { $result = []; } else { $result = [$x]; }",
]
MARKUP_ONLY = ["<div><span></span></div>", "&nbsp;&nbsp;&nbsp;", "<br><br><br>",
               "[[분류:문서]] {{틀:정보}} [[파일:그림.png]] | = |",
               "<table><tr><td></td></tr></table>"]


def spam_doc(r: random.Random) -> str:
    line = r.choice(["지금 바로 클릭하세요 최저가 보장", "무료 쿠폰 받아 가세요", "오늘만 특가 할인 행사"])
    return "\n".join([line] * r.randint(5, 10))


def runs_doc(r: random.Random) -> str:
    return review(r) + " " + r.choice(["ㅋ" * r.randint(6, 30), "ㅎ" * r.randint(5, 15), "!" * r.randint(5, 12),
                                        "." * r.randint(6, 20), "ㅠ" * r.randint(5, 12), "ㅋㅎ" * r.randint(4, 8)])


def odd_unicode_doc(r: random.Random) -> str:
    text = review(r)
    if r.random() < 0.5:
        return unicodedata.normalize("NFD", text)  # decomposed jamo, as from macOS copy-paste
    i = len(text) // 2
    return text[:i] + "\u200b\ufeff" + text[i:] + "\u00a0\u00a0\t\t 끝."


def build(seed: int = SEED) -> list[dict]:
    r = random.Random(seed)
    docs: list[dict] = []

    def add(text: str, source: str, kind: str) -> None:
        docs.append({"id": f"sample-{len(docs):06d}", "text": text, "source": source, "kind": kind})

    for _ in range(N_CLEAN):
        src = r.choices(list(GENERATORS), weights=[3, 3, 2, 2])[0]
        add(GENERATORS[src](r), src, "clean")
    for _ in range(60):
        add(pii_doc(r), "web", "pii")
    for _ in range(40):
        add(html_doc(r), "web", "html")
    for _ in range(40):
        add(runs_doc(r), "review", "runs")
    for _ in range(20):
        add(odd_unicode_doc(r), "review", "unicode")
    for t in SHORT:
        add(t, "review", "short")
    for t in FOREIGN:
        add(t, "web", "foreign")
    for t in CODE:
        add(t, "web", "code")
    for t in MARKUP_ONLY:
        add(t, "web", "markup")
    for _ in range(8):
        add(spam_doc(r), "web", "spam")
    # Exact duplicates and near duplicates (one punctuation mark / one word changed) of clean docs.
    clean = [d for d in docs if d["kind"] == "clean" and len(d["text"]) > 120]
    for d in r.sample(clean, 40):
        add(d["text"], d["source"], "dup_exact")
    for d in r.sample(clean, 40):
        t = d["text"]
        t = t.replace(".", "!", 1) if r.random() < 0.5 else t.replace(" ", "  ", 1) + " 정말로."
        add(t, d["source"], "dup_near")
    r.shuffle(docs)
    for i, d in enumerate(docs):
        d["id"] = f"sample-{i:06d}"
    return docs


def write(out: Path = HERE) -> dict:
    """Write the four sample files into ``out``; returns a summary (counts and byte sizes)."""
    out = Path(out)
    docs = build()
    # Most documents in jsonl; a slice as plain text (one doc per line) and as gzip jsonl, so the
    # pipeline's three readers are exercised. Multi-line docs cannot go to the .txt file.
    txt_docs = [d for d in docs if "\n" not in d["text"] and d["text"]][:150]
    gz_docs = [d for d in docs if d not in txt_docs][:150]
    taken = {d["id"] for d in txt_docs} | {d["id"] for d in gz_docs}
    main_docs = [d for d in docs if d["id"] not in taken]
    with open(out / "sample.jsonl", "w", encoding="utf-8") as f:
        for d in main_docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    with open(out / "sample.txt", "w", encoding="utf-8") as f:
        for d in txt_docs:
            f.write(d["text"] + "\n")
    with gzip.GzipFile(out / "sample.jsonl.gz", "wb", mtime=0) as f:  # mtime=0: byte-identical reruns
        for d in gz_docs:
            f.write((json.dumps(d, ensure_ascii=False) + "\n").encode("utf-8"))
    good = [json.dumps({"id": f"bad-{i}", "text": news(random.Random(i)), "source": "news", "kind": "clean"},
                       ensure_ascii=False).encode("utf-8") for i in range(4)]
    bad_lines = [
        good[0],
        # malformed JSON (no closing brace)
        b'{"id": "bad-broken", "text": "\xeb\x8b\xab\xed\x9e\x88\xec\xa7\x80 \xec\x95\x8a\xec\x9d\x80 JSON", '
        b'"source": "web"',
        good[1],
        # invalid UTF-8 (0xff 0xfe, a broken 2-byte sequence) inside otherwise valid JSON
        b'{"id": "bad-utf8", "text": "\xff\xfe\xc3\x28 \xea\xb9\xa8\xec\xa7\x84 '
        b'\xeb\xb0\x94\xec\x9d\xb4\xed\x8a\xb8", "source": "web"}',
        good[2],
        b'{"id": "bad-nul", "text": "NUL\x00\x00 \xeb\xb0\x94\xec\x9d\xb4\xed\x8a\xb8", "source": "web"}',
        b"\x00\x00\x00",
        good[3],
    ]
    (out / "bad.jsonl").write_bytes(b"\n".join(bad_lines) + b"\n")
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.name in FILES}
    return {"docs": len(docs), "jsonl": len(main_docs), "txt": len(txt_docs), "gz": len(gz_docs), "bytes": sizes}


FILES = ("sample.jsonl", "sample.txt", "sample.jsonl.gz", "bad.jsonl")


def main() -> None:
    print(json.dumps(write(HERE), ensure_ascii=False))


if __name__ == "__main__":
    main()
