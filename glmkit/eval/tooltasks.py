"""The tool-use task suite: synthetic, checkable tasks that need a tool, in English and Chinese.

Four families, each a question with one exact answer that a tool makes easy and the model's head
does not:
- `arithmetic`: products and sums of 4-6 digit numbers (`48213 × 7719 + 3502`), through `python`;
- `counting`: how often a letter occurs in a string of invented words, or a character in a string of
  Chinese characters, through `python`;
- `lookup`: a fact (founding year, founder, staff) about an invented place that exists only in the
  suite's generated document store, through the browser (search, then open), cited `【id†quote】`;
- `functions`: choosing the right one of three user functions (`WORLD_FUNCTIONS`: currency
  conversion, a weather forecast, days between dates) with the right typed arguments.

Splits are disjoint by construction: a task's split is a function of its identity (`ToolTask.key`:
the operands and form, the string and letter, the invented place, the function and its arguments),
`split_of(key)` = "heldout" for the keys whose SHA-256 falls in the held-out share, else "train". The
same key is never in both, whatever the seed or the counts; within a split keys are unique.

Each task carries what a correct episode looks like (`ToolTask.calls`, dialect-neutral: `python`
{code}, `search` {query}, `open` {source}, or a user function's name and arguments) and what checks
one: `check_answer(task, text)` (the final answer; numbers compared as numbers, the last one in the
text, citations removed) and `check_calls(task, calls, results)` (the tool names in order, and the
arguments: a user function's after its own type coercion, a `python` call's by what the code returned,
which must state the answer). A lookup answer must also cite the
task's document (`cited_sources`). `ExactPython` computes the `python` observations of the suite's own
code exactly, in-process, for machines without a sandbox (it evaluates only integer arithmetic and
`str.count`).

Conversations for training are written by `glmkit.eval.toolsft`.
"""

from __future__ import annotations

import ast
import datetime
import hashlib
import json
import random
import re
import unicodedata
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Literal

from glmkit.chat.functions import function_tool
from glmkit.chat.sandbox import ExecResult
from glmkit.errors import GlmkitError

FAMILIES = ("arithmetic", "counting", "lookup", "functions")
LANGS = ("en", "zh")
SPLITS = ("train", "heldout")
HELDOUT_SHARE = 0.2


def split_of(key: str, heldout_share: float = HELDOUT_SHARE) -> str:
    """The split a task identity belongs to: a pure function of the key, so no key is in both."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0 ** 64
    return "heldout" if h < heldout_share else "train"


@dataclass(frozen=True)
class Call:
    """One expected tool call, dialect-neutral: tool is `python`, `search`, `open` or a user function."""
    tool: str
    args: dict


@dataclass(frozen=True)
class ToolTask:
    id: str
    family: str
    lang: str
    split: str
    key: str        # the identity the split is drawn from
    question: str
    answer: str     # the exact answer ("97404", "230.50", "Ilse Marven")
    calls: tuple[Call, ...]
    reply: str      # the final answer a correct episode writes (lookup: `{}` stands for the document id)
    source: str = ""  # lookup: the document that must be cited
    quote: str = ""   # lookup: the sentence of that document that states the fact


# ----------------------------------------------------------------------------- arithmetic
FORMS = {  # name: (how the question shows it, the code, the value)
    "mul_add": ("{a} × {b} + {c}", "{a} * {b} + {c}", lambda a, b, c: a * b + c),
    "mul_sub": ("{a} × {b} − {c}", "{a} * {b} - {c}", lambda a, b, c: a * b - c),
    "sum_mul": ("({a} + {b}) × {c}", "({a} + {b}) * {c}", lambda a, b, c: (a + b) * c),
    "mul3": ("{a} × {b} × {c}", "{a} * {b} * {c}", lambda a, b, c: a * b * c),
}


def _arithmetic(rng: random.Random, lang: str) -> ToolTask:
    form = rng.choice(sorted(FORMS))
    shown, code, value = FORMS[form]
    a, b = rng.randrange(10_000, 1_000_000), rng.randrange(1_000, 100_000)
    c = rng.randrange(12, 1_000) if form == "mul3" else rng.randrange(1_000, 100_000)
    expr, code = shown.format(a=a, b=b, c=c), code.format(a=a, b=b, c=c)
    answer = str(value(a, b, c))
    if lang == "en":
        question, reply = f"What is {expr}?", f"{expr} = {answer}."
    else:
        question, reply = f"请计算 {expr} 的值。", f"{expr} 的结果是 {answer}。"
    return _task("arithmetic", lang, f"arithmetic:{form}:{a}:{b}:{c}", question, answer,
                 (Call("python", {"code": code}),), reply)


# ----------------------------------------------------------------------------- counting
EN_SYLLABLES = ("ba", "ker", "lo", "mi", "ran", "so", "tul", "ve", "qui", "dor", "fen", "gal", "hap", "jin",
                "kor", "lem", "nus", "pri", "rel", "sta", "tro", "wix", "yel", "zan", "bre", "cla", "dri")
ZH_CHARS = "山水木火土石金云风雨花草月星天海河江湖田林竹松梅兰菊春夏秋冬东南西北长青白红黄绿"


def _pseudo_word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(EN_SYLLABLES) for _ in range(syllables))


def _counting(rng: random.Random, lang: str) -> ToolTask:
    if lang == "en":
        text = " ".join(_pseudo_word(rng, rng.randint(2, 4)) for _ in range(rng.randint(3, 6)))
        unit = rng.choice(sorted(set(text) - {" "}))
        n = text.count(unit)
        question = f"How many times does the letter '{unit}' appear in \"{text}\"?"
        reply = f"The letter '{unit}' appears {n} times in \"{text}\"." if n != 1 else \
            f"The letter '{unit}' appears 1 time in \"{text}\"."
    else:
        text = "".join(rng.choice(ZH_CHARS) for _ in range(rng.randint(12, 30)))
        unit = rng.choice(sorted(set(text)))
        n = text.count(unit)
        question = f"“{text}”中有几个“{unit}”字？"
        reply = f"“{text}”中“{unit}”字出现了 {n} 次。"
    return _task("counting", lang, f"counting:{text}:{unit}", question, str(n),
                 (Call("python", {"code": f"{text!r}.count({unit!r})"}),), reply)


# ----------------------------------------------------------------------------- lookup (invented facts)
EN_KINDS = ("Observatory", "Bridge", "Library", "Lighthouse", "Museum", "Academy", "Brewery", "Archive")
ZH_KINDS = ("天文台", "大桥", "图书馆", "灯塔", "博物馆", "书院", "酒坊", "档案馆")
EN_GIVEN = ("Ilse", "Tomas", "Greta", "Oren", "Mira", "Jonas", "Petra", "Elias", "Nadia", "Lukas")
ZH_SURNAMES = "赵钱孙李周吴郑王冯陈褚卫蒋沈韩杨"
ZH_GIVEN = "明华强伟芳娜敏静丽军洋勇艳杰涛"
ZH_NAME_CHARS = "苍澜翠岚霁渊墨璃琅珂玥瑶琪筠汐溪沅沐洛泠芷蘅蓁莘"


@dataclass(frozen=True)
class Place:
    """An invented place and its facts; its document is the only place they are written."""
    lang: str
    name: str
    town: str
    founded: int
    founder: str
    staff: int

    @property
    def source(self) -> str:
        return f"facts/{self.lang}/{hashlib.sha256(self.name.encode()).hexdigest()[:10]}"

    def sentences(self) -> dict[str, str]:
        if self.lang == "en":
            return {"founded": f"The {self.name} was founded in {self.founded}.",
                    "founder": f"Its founder was {self.founder}.",
                    "staff": f"Today the {self.name} employs {self.staff} people."}
        return {"founded": f"{self.name}始建于{self.founded}年。", "founder": f"创建者是{self.founder}。",
                "staff": f"{self.name}现有员工{self.staff}人。"}

    def document(self) -> tuple[str, str, str]:
        s = self.sentences()
        where = (f"The {self.name} stands in the town of {self.town}." if self.lang == "en"
                 else f"{self.name}位于{self.town}。")
        return self.name, self.source, "\n".join([self.name, where, s["founded"], s["founder"], s["staff"]])


def _place(rng: random.Random, lang: str) -> Place:
    if lang == "en":
        base = _pseudo_word(rng, 3).capitalize()
        name = f"{base} {rng.choice(EN_KINDS)}"
        town = _pseudo_word(rng, 2).capitalize() + "ford"
        founder = f"{rng.choice(EN_GIVEN)} {_pseudo_word(rng, 2).capitalize()}"
    else:
        base = "".join(rng.sample(ZH_NAME_CHARS, 3))
        name = base + rng.choice(ZH_KINDS)
        town = "".join(rng.sample(ZH_NAME_CHARS, 2)) + "镇"
        founder = rng.choice(ZH_SURNAMES) + "".join(rng.sample(ZH_GIVEN, 2))
    return Place(lang, name, town, rng.randrange(1600, 1990), founder, rng.randrange(12, 5000))


def places(lang: str, seed: int, count: int) -> list[Place]:
    """The first `count` invented places of (lang, seed); a place's base name is unique, so a search for
    its full name finds its own document first. A larger count extends the same sequence."""
    rng = random.Random(f"places:{lang}:{seed}")
    out, bases = [], set()
    while len(out) < count:
        p = _place(rng, lang)
        base = p.name.split()[0] if lang == "en" else p.name[:3]
        if base not in bases:
            bases.add(base)
            out.append(p)
    return out


def _lookup(place: Place, attribute: str) -> ToolTask:
    value = {"founded": place.founded, "founder": place.founder, "staff": place.staff}[attribute]
    quote = place.sentences()[attribute]
    if place.lang == "en":
        question = {"founded": f"In which year was the {place.name} founded?",
                    "founder": f"Who founded the {place.name}?",
                    "staff": f"How many people does the {place.name} employ?"}[attribute]
    else:
        question = {"founded": f"{place.name}建于哪一年？", "founder": f"{place.name}的创建者是谁？",
                    "staff": f"{place.name}现有多少名员工？"}[attribute]
    reply = f"{quote}【{{}}†{quote}】"
    return _task("lookup", place.lang, f"lookup:{place.lang}:{place.name}", question, str(value),
                 (Call("search", {"query": place.name}), Call("open", {"source": place.source})), reply,
                 source=place.source, quote=quote)


# ----------------------------------------------------------------------------- user functions
CURRENCIES = ("USD", "EUR", "GBP", "CNY", "JPY")
USD_RATES = {"USD": Decimal("1"), "EUR": Decimal("0.92"), "GBP": Decimal("0.79"), "CNY": Decimal("7.24"),
             "JPY": Decimal("151")}  # units of each currency per US dollar, fixed in this world
Currency = Literal["USD", "EUR", "GBP", "CNY", "JPY"]


def convert_currency(amount: float, source: Currency, target: Currency) -> str:
    """Convert an amount of money from one currency to another at today's rate.

    Args:
        amount: The amount in the source currency.
        source: The currency the amount is in.
        target: The currency to convert to.
    """
    value = Decimal(str(amount)) / USD_RATES[source] * USD_RATES[target]
    return f"{Decimal(str(amount)).normalize():f} {source} = {value.quantize(Decimal('0.01'))} {target}"


def get_weather(city: str, days: int = 1) -> dict:
    """Get the forecast daily high temperatures (Celsius) of a city for the coming days.

    Args:
        city: The city name.
        days: How many days ahead to forecast (1 to 7).
    """
    if not 1 <= days <= 7:
        raise ValueError(f"days must be between 1 and 7, got {days}")
    seed = hashlib.sha256(city.encode()).digest()
    return {"city": city, "highs_c": [int(seed[i]) % 41 - 10 for i in range(days)]}


def days_between(start: str, end: str) -> int:
    """Count the days from one date to another (negative if end is before start).

    Args:
        start: The first date, YYYY-MM-DD.
        end: The second date, YYYY-MM-DD.
    """
    return (datetime.date.fromisoformat(end) - datetime.date.fromisoformat(start)).days


WORLD_FUNCTIONS = (convert_currency, get_weather, days_between)
EN_CITIES = ("Oslo", "Lima", "Cairo", "Hanoi", "Quito", "Dakar", "Perth", "Riga", "Tunis", "Porto", "Kyiv",
             "Seoul", "Dublin", "Zagreb", "Nairobi", "Lisbon", "Bogota", "Manila", "Ottawa", "Vienna")
ZH_CITIES = ("北京", "上海", "广州", "深圳", "成都", "杭州", "南京", "武汉", "西安", "重庆", "天津", "苏州",
             "长沙", "郑州", "青岛", "厦门", "昆明", "大连", "济南", "哈尔滨")
ZH_CURRENCY = {"USD": "美元", "EUR": "欧元", "GBP": "英镑", "CNY": "人民币", "JPY": "日元"}


def _functions(rng: random.Random, lang: str) -> ToolTask:
    kind = rng.choice(("convert_currency", "get_weather", "days_between"))
    en = lang == "en"
    if kind == "convert_currency":
        amount = rng.randrange(2, 5000)
        source, target = rng.sample(CURRENCIES, 2)
        args = {"amount": amount, "source": source, "target": target}
        answer = convert_currency(amount, source, target).split(" = ")[1].split()[0]
        question = (f"How much is {amount} {source} in {target}?" if en
                    else f"{amount}{ZH_CURRENCY[source]}能换多少{ZH_CURRENCY[target]}？")
        reply = (f"{amount} {source} is {answer} {target}." if en
                 else f"{amount}{ZH_CURRENCY[source]}可以换 {answer} {ZH_CURRENCY[target]}。")
    elif kind == "get_weather":
        city, days = rng.choice(EN_CITIES if en else ZH_CITIES), rng.randint(1, 7)
        args = {"city": city, "days": days}
        answer = str(get_weather(city, days)["highs_c"][-1])
        question = (f"What will the high temperature in {city} be {days} day{'s' * (days > 1)} from now, in °C?"
                    if en else f"{days}天后{city}的最高气温是多少摄氏度？")
        reply = (f"The high in {city} {days} day{'s' * (days > 1)} from now will be {answer} °C." if en
                 else f"{days}天后{city}的最高气温是 {answer} 摄氏度。")
    else:
        start = datetime.date(2000, 1, 1) + datetime.timedelta(days=rng.randrange(0, 11_000))
        end = start + datetime.timedelta(days=rng.randrange(40, 4000))
        args = {"start": start.isoformat(), "end": end.isoformat()}
        answer = str((end - start).days)
        question = (f"How many days are there from {start} to {end}?" if en
                    else f"从{start}到{end}一共有多少天？")
        reply = f"From {start} to {end} there are {answer} days." if en else f"从{start}到{end}共有 {answer} 天。"
    return _task("functions", lang, f"functions:{kind}:{json.dumps(args, sort_keys=True, ensure_ascii=False)}",
                 question, answer, (Call(kind, args),), reply)


# ----------------------------------------------------------------------------- the suite
def _task(family, lang, key, question, answer, calls, reply, **extra) -> ToolTask:
    return ToolTask("", family, lang, split_of(key), key, question, answer, calls, reply, **extra)


@dataclass
class ToolSuite:
    """`per_split[split]` tasks of every (family, language), drawn from `seed`. The lookup family's
    invented places of both splits make up one document store (`documents()`): the held-out questions
    are answerable, and train conversations only ever ask about train places."""
    seed: int = 0
    per_split: dict = field(default_factory=lambda: {"train": 40, "heldout": 10})
    families: tuple[str, ...] = FAMILIES
    langs: tuple[str, ...] = LANGS

    def __post_init__(self):
        bad = [f for f in self.families if f not in FAMILIES] + [lang for lang in self.langs if lang not in LANGS]
        if bad:
            raise GlmkitError(f"unknown task families or languages {bad}; families are {', '.join(FAMILIES)}, "
                              f"languages {', '.join(LANGS)}")
        if set(self.per_split) - set(SPLITS) or any(n < 0 for n in self.per_split.values()):
            raise GlmkitError(f"per_split must map {SPLITS} to counts >= 0, got {self.per_split}")
        self._tasks: dict[str, list[ToolTask]] = {s: [] for s in SPLITS}
        self._places: list[Place] = []
        for lang in self.langs:
            for family in self.families:
                self._draw(family, lang)

    def tasks(self, split: str) -> list[ToolTask]:
        if split not in SPLITS:
            raise GlmkitError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        return list(self._tasks[split])

    def documents(self) -> list[tuple[str, str, str]]:
        """(title, source, text) of every invented place, for `glmkit.chat.docstore.build_store`."""
        return [p.document() for p in self._places]

    def _draw(self, family: str, lang: str) -> None:
        want = {s: self.per_split.get(s, 0) for s in SPLITS}
        got: dict[str, list[ToolTask]] = {s: [] for s in SPLITS}
        seen: set[str] = set()
        if family == "lookup":
            candidates = self._lookup_candidates(lang, want)
        else:
            rng = random.Random(f"{family}:{lang}:{self.seed}")
            make = {"arithmetic": _arithmetic, "counting": _counting, "functions": _functions}[family]
            candidates = (make(rng, lang) for _ in range(200 * (sum(want.values()) + 10)))
        for task in candidates:
            if task.key in seen or len(got[task.split]) >= want[task.split]:
                continue
            seen.add(task.key)
            got[task.split].append(task)
            if all(len(got[s]) >= want[s] for s in SPLITS):
                break
        for split in SPLITS:
            if len(got[split]) < want[split]:
                raise GlmkitError(f"only {len(got[split])} distinct {family} tasks in {lang} for the {split} "
                                  f"split (asked for {want[split]}); ask for fewer")
            for i, t in enumerate(got[split]):
                self._tasks[split].append(_with_id(t, f"{family}-{lang}-{split}-{i:04d}"))

    def _lookup_candidates(self, lang: str, want: dict[str, int]):
        # places are drawn until each split has enough; all drawn places go in the store
        count, pool = 0, []
        while any(sum(p.split == s for p in pool) < want[s] for s in SPLITS) and count < 100_000:
            count = max(2 * count, 64)
            pool = [_lookup(p, a) for p, a in zip(places(lang, self.seed, count),
                                                   _attributes(self.seed, lang, count))]
        keep = {s: [t for t in pool if t.split == s][:want[s]] for s in SPLITS}
        last = max((pool.index(keep[s][-1]) for s in SPLITS if keep[s]), default=-1)
        self._places += places(lang, self.seed, last + 1)
        return [t for t in pool[:last + 1]]


def _attributes(seed: int, lang: str, count: int) -> list[str]:
    rng = random.Random(f"attributes:{lang}:{seed}")
    return [rng.choice(("founded", "founder", "staff")) for _ in range(count)]


def _with_id(task: ToolTask, task_id: str) -> ToolTask:
    from dataclasses import replace
    return replace(task, id=task_id)


# ----------------------------------------------------------------------------- checking
_CITATION = re.compile(r"【(\d+)†[^】]*】")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _normal(text: str) -> str:
    return unicodedata.normalize("NFKC", text).replace("−", "-").casefold()


def check_answer(task: ToolTask, text: str) -> bool:
    """Whether a final answer states the task's answer: for a number, the last number of the text
    (citations and thousands separators removed) equals it; for a name, the text contains it."""
    text = _normal(_CITATION.sub("", text or ""))
    try:
        expected = Decimal(task.answer)
    except InvalidOperation:
        return _normal(task.answer) in text
    numbers = _NUMBER.findall(re.sub(r"(?<=\d),(?=\d{3})", "", text))
    return bool(numbers) and Decimal(numbers[-1]) == expected


def neutral_calls(calls: list[tuple[str, dict]]) -> list[Call]:
    """(name, parsed arguments) in either dialect to dialect-neutral calls (`glm4`'s `simple_browser`
    commands and `glm45`'s `browser_search` / `browser_open`)."""
    out = []
    for name, args in calls:
        if name == "simple_browser":
            command = str(args.get("command", "")).strip()
            try:
                call = ast.parse(command, mode="eval").body
                verb = call.func.id
                values = [ast.literal_eval(a) for a in call.args]
            except (SyntaxError, ValueError, AttributeError):
                out.append(Call("simple_browser", args))
                continue
            key = {"search": "query", "open": "id"}.get(verb, "args")
            out.append(Call(verb, {key: values[0]} if values else {}))
        elif name in ("browser_search", "browser_open", "browser_find"):
            out.append(Call(name.removeprefix("browser_"), dict(args)))
        else:
            out.append(Call(name, dict(args)))
    return out


def check_calls(task: ToolTask, calls: list[tuple[str, dict]],
                results: list[str | None] | None = None) -> tuple[bool, bool]:
    """(the tool names are the expected ones in order, and the arguments are right as well). Arguments:
    user functions exactly, after the function's own type coercion (`"250"` for a float is 250.0);
    `python` code that computes the task's answer: valid Python whose result states it (`check_answer`
    on the result), so `(a + b) * c` and `c * (a + b)` are both right and valid but wrong code is not;
    a search whose query contains the place's name. The id opened is checked through the citation
    (`cited_sources`). `results`: what each call returned, in the order of `calls` (None where a call
    never ran); without it the python code is evaluated by `ExactPython` (the suite's own forms: other
    code counts as wrong)."""
    got = neutral_calls(calls)
    if [c.tool for c in got] != [c.tool for c in task.calls]:
        return False, False
    for k, (want, have) in enumerate(zip(task.calls, got)):
        if want.tool == "python":
            code = str(have.args.get("code", ""))
            result = _exact_result(code) if results is None else (results[k] if k < len(results) else None)
            if not _valid_python(code) or result is None or not check_answer(task, result):
                return True, False
        elif want.tool == "search":
            if _normal(want.args["query"]) not in _normal(str(have.args.get("query", ""))):
                return True, False
        elif want.tool != "open" and not _same_arguments(want.tool, want.args, have.args):
            return True, False
    return True, True


def _valid_python(code: str) -> bool:
    try:
        ast.parse(code)
    except SyntaxError:
        return False
    return True


def _exact_result(code: str) -> str | None:
    """What `ExactPython` returns for `code`; None where it cannot run it."""
    try:
        return ExactPython().run(code).value
    except (GlmkitError, ArithmeticError, RecursionError):
        return None


def _same_arguments(name: str, want: dict, have: dict) -> bool:
    tool = function_tool({f.__name__: f for f in WORLD_FUNCTIONS}[name])
    try:
        return tool.check(dict(have)) == tool.check(dict(want))
    except Exception:  # refused by the schema: not the right arguments
        return False


_SHOWN_SOURCE = re.compile(r"【(\d+)†(?:[^†】]*†)?([^†】]*)】")


def cited_sources(answer: str, observations: list[str]) -> list[str]:
    """The sources the answer's citations name, through the ids the browser showed in `observations`
    (`【id†title†source】` in results, `【id†source】` in pages); an id never shown gives ""."""
    shown: dict[int, str] = {}
    for text in observations:
        for m in _SHOWN_SOURCE.finditer(text):
            shown[int(m.group(1))] = m.group(2)
    return [shown.get(int(m.group(1)), "") for m in _CITATION.finditer(answer or "")]


# ----------------------------------------------------------------------------- python without a sandbox
class ExactPython:
    """The `python` tool's observations for the suite's own code, computed in-process: integer
    arithmetic (+ - * and parentheses) and `'text'.count('x')`. Anything else is refused, so it never
    stands in for the sandbox on code it does not understand."""

    def run(self, code: str) -> ExecResult:
        try:
            value = _evaluate(ast.parse(code.strip(), mode="eval").body)
        except (SyntaxError, ValueError) as e:
            raise GlmkitError(f"ExactPython evaluates only the task suite's own code, not {code!r} ({e}); "
                              "use glmkit.chat.sandbox.Sandbox for other code") from None
        return ExecResult(value=repr(value))


def _evaluate(node):
    ops = {ast.Add: int.__add__, ast.Sub: int.__sub__, ast.Mult: int.__mul__}
    if isinstance(node, ast.Constant) and type(node.value) in (int, str):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in ops:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if type(left) is int and type(right) is int:
            return ops[type(node.op)](left, right)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and len(node.args) == 1 and not node.keywords):
        text, unit = _evaluate(node.func.value), _evaluate(node.args[0])
        if type(text) is str and type(unit) is str:
            return text.count(unit)
    raise ValueError(f"unsupported expression {ast.dump(node)[:80]}")
