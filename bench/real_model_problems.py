"""The problems bench/real_model.py puts to a real model: small, each with one right answer, each
needing the computer (arithmetic and counting too long to do in the head, a fact in a file too
long to read, a strict output format). Input files are generated from fixed seeds, so every
machine sees the same bytes; each problem carries a reference solution computed from its inputs,
and `check_problems` holds every expected answer to it (`python bench/real_model.py --check`).
"""

from __future__ import annotations

import datetime
import math
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Problem:
    id: str
    kind: str  # compute | file | format
    prompt: str
    expected: str
    reference: Callable[[dict[str, str]], str]
    files: dict[str, str] = field(default_factory=dict)
    # Thousands separators and spaces are not held against a numeric answer.
    numeric: bool = True


def _primes_below(n: int) -> list[int]:
    sieve = bytearray([1]) * n
    sieve[0:2] = b"\x00\x00"
    for i in range(2, math.isqrt(n) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytearray(len(range(i * i, n, i)))
    return [i for i in range(n) if sieve[i]]


def _fibonacci(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def _vault_file() -> str:
    rng = random.Random(17)
    words = [
        "audit",
        "ledger",
        "quarterly",
        "review",
        "filing",
        "memo",
        "archive",
        "batch",
        "index",
        "record",
    ]
    lines = [f"entry {i:05d}: {' '.join(rng.choice(words) for _ in range(8))}" for i in range(4000)]
    lines[2718] = "entry 02718: vault 17 access code is K4821Q (do not share)"
    return "\n".join(lines) + "\n"


def _log_file() -> str:
    rng = random.Random(5)
    levels = ["INFO"] * 12 + ["WARN"] * 3 + ["ERROR"]
    lines = []
    for i in range(3000):
        level = rng.choice(levels)
        lines.append(f"2026-11-{1 + i // 120:02d} {level:<5} worker-{rng.randint(1, 9)} job {i}")
    return "\n".join(lines) + "\n"


def _prices_file() -> str:
    rng = random.Random(42)
    rows = ["item,price"]
    rows += [f"widget-{i:04d},{rng.randint(100, 99999) / 100:.2f}" for i in range(1, 2001)]
    return "\n".join(rows) + "\n"


def _orders_file() -> str:
    rng = random.Random(7)
    rows = ["order,customer,quantity"]
    rows += [f"{1000 + i},c{rng.randint(1, 300)},{rng.randint(1, 40)}" for i in range(1500)]
    return "\n".join(rows) + "\n"


def _words_file() -> str:
    rng = random.Random(11)
    vocab = [
        "river",
        "lantern",
        "stone",
        "meadow",
        "copper",
        "lanterns",
        "willow",
        "harbor",
        "ember",
    ]
    return "\n".join(" ".join(rng.choice(vocab) for _ in range(6)) for _ in range(2500)) + "\n"


def _access_file() -> str:
    rng = random.Random(3)
    hosts = [f"10.0.{rng.randint(0, 9)}.{rng.randint(1, 254)}" for _ in range(40)]
    weights = [rng.randint(1, 30) for _ in hosts]
    return (
        "\n".join(
            f'{rng.choices(hosts, weights)[0]} - - "GET /item/{rng.randint(1, 999)}" 200'
            for _ in range(5000)
        )
        + "\n"
    )


def _csv_rows(text: str) -> list[list[str]]:
    return [line.split(",") for line in text.splitlines()[1:]]


def _price(files: dict[str, str]) -> str:
    return next(row[1] for row in _csv_rows(files["prices.csv"]) if row[0] == "widget-1337")


def _busiest(files: dict[str, str]) -> str:
    return Counter(line.split()[0] for line in files["access.log"].splitlines()).most_common(1)[0][
        0
    ]


def _word_lines(files: dict[str, str]) -> str:
    return str(sum("lantern" in line.split() for line in files["words.txt"].splitlines()))


def _vault(files: dict[str, str]) -> str:
    found = re.search(r"vault 17 access code is (\w+)", files["notes.txt"])
    assert found is not None
    return found.group(1)


def _constant(value: Callable[[], object]) -> Callable[[dict[str, str]], str]:
    return lambda files: str(value())


NUMBER_ONLY = " Answer with the number only."
PROBLEMS: list[Problem] = [
    Problem(
        "digit-sum-2-100",
        "compute",
        "What is the sum of the decimal digits of 2**100?" + NUMBER_ONLY,
        "115",
        _constant(lambda: sum(map(int, str(2**100)))),
    ),
    Problem(
        "primes-below-10000",
        "compute",
        "How many prime numbers are there below 10000?" + NUMBER_ONLY,
        "1229",
        _constant(lambda: len(_primes_below(10_000))),
    ),
    Problem(
        "prime-1000th",
        "compute",
        "What is the 1000th prime number (2 is the first)?" + NUMBER_ONLY,
        "7919",
        _constant(lambda: _primes_below(10_000)[999]),
    ),
    Problem(
        "last-six-digits",
        "compute",
        "What are the last six decimal digits of 7**777? Answer with the six digits only.",
        "979207",
        _constant(lambda: f"{pow(7, 777, 10**6):06d}"),
        numeric=False,
    ),
    Problem(
        "three-or-five",
        "compute",
        "How many integers from 1 to 10000 are divisible by 3 or by 5, but not by 15?"
        + NUMBER_ONLY,
        "4001",
        _constant(
            lambda: sum(1 for i in range(1, 10_001) if (i % 3 == 0 or i % 5 == 0) and i % 15)
        ),
    ),
    Problem(
        "fibonacci-90",
        "compute",
        "With F(1) = F(2) = 1 and F(n) = F(n-1) + F(n-2), what is F(90)?" + NUMBER_ONLY,
        "2880067194370816120",
        _constant(lambda: _fibonacci(90)),
    ),
    Problem(
        "divisors-720720",
        "compute",
        "How many positive divisors does 720720 have?" + NUMBER_ONLY,
        "240",
        _constant(lambda: sum(1 for d in range(1, 720_721) if 720_720 % d == 0)),
    ),
    Problem(
        "digit-sum-50-factorial",
        "compute",
        "What is the sum of the decimal digits of 50! (50 factorial)?" + NUMBER_ONLY,
        "216",
        _constant(lambda: sum(map(int, str(math.factorial(50))))),
    ),
    Problem(
        "digits-of-3-200",
        "compute",
        "How many decimal digits does 3**200 have?" + NUMBER_ONLY,
        "96",
        _constant(lambda: len(str(3**200))),
    ),
    Problem(
        "pythagorean-pairs",
        "compute",
        "How many ordered pairs of positive integers (a, b) with a, b <= 100 make a*a + b*b a "
        "perfect square?" + NUMBER_ONLY,
        "126",
        _constant(
            lambda: sum(
                1
                for a in range(1, 101)
                for b in range(1, 101)
                if math.isqrt(a * a + b * b) ** 2 == a * a + b * b
            )
        ),
    ),
    Problem(
        "vault-code",
        "file",
        "The input file notes.txt is a long list of entries. One of them gives the access code "
        "of vault 17. What is that code? Answer with the code only.",
        "K4821Q",
        _vault,
        {"notes.txt": _vault_file()},
        numeric=False,
    ),
    Problem(
        "error-lines",
        "file",
        "How many lines of the input file app.log have the level ERROR?" + NUMBER_ONLY,
        "194",
        lambda files: str(
            sum(line.split()[1] == "ERROR" for line in files["app.log"].splitlines())
        ),
        {"app.log": _log_file()},
    ),
    Problem(
        "widget-price",
        "file",
        "The input file prices.csv lists items and their prices. What is the price of "
        "widget-1337? Answer with the price exactly as the file gives it.",
        "230.46",
        _price,
        {"prices.csv": _prices_file()},
        numeric=False,
    ),
    Problem(
        "total-quantity",
        "file",
        "What is the sum of the quantity column of the input file orders.csv?" + NUMBER_ONLY,
        "30042",
        lambda files: str(sum(int(row[2]) for row in _csv_rows(files["orders.csv"]))),
        {"orders.csv": _orders_file()},
    ),
    Problem(
        "lantern-lines",
        "file",
        "How many lines of the input file words.txt contain the word lantern (the exact word: "
        "lanterns does not count)?" + NUMBER_ONLY,
        "1275",
        _word_lines,
        {"words.txt": _words_file()},
    ),
    Problem(
        "busiest-address",
        "file",
        "The input file access.log is a web server log whose first field is the client's IP "
        "address. Which address made the most requests? Answer with the address only.",
        "10.0.9.4",
        _busiest,
        {"access.log": _access_file()},
        numeric=False,
    ),
    Problem(
        "reversed-upper",
        "format",
        "Write the text sandbox-operator reversed and in upper case. Answer with that text only.",
        "ROTAREPO-XOBDNAS",
        _constant(lambda: "sandbox-operator"[::-1].upper()),
        numeric=False,
    ),
    Problem(
        "primes-listed",
        "format",
        "List the prime numbers between 10 and 30 in increasing order, separated by commas with "
        "no spaces, and nothing else.",
        "11,13,17,19,23,29",
        _constant(lambda: ",".join(str(p) for p in _primes_below(30) if p > 10)),
        numeric=False,
    ),
    Problem(
        "sorted-words",
        "format",
        "Sort these words alphabetically: pear apple fig banana cherry. Answer with the sorted "
        "words separated by single spaces, in lower case, and nothing else.",
        "apple banana cherry fig pear",
        _constant(lambda: " ".join(sorted(["pear", "apple", "fig", "banana", "cherry"]))),
        numeric=False,
    ),
    Problem(
        "weekday",
        "format",
        "On which day of the week did 1 January 2000 fall? Answer with the English name of the "
        "day only, capitalised (for example a day such as Monday).",
        "Saturday",
        _constant(lambda: datetime.date(2000, 1, 1).strftime("%A")),
        numeric=False,
    ),
]


def normalise(answer: str, numeric: bool) -> str:
    """What is compared: surrounding space, quotes, backticks and a final full stop dropped;
    for a number also thousands separators and inner spaces. Nothing else is forgiven."""
    text = answer.strip().strip("`'\"").strip()
    text = text.removesuffix(".").strip()
    if numeric:
        text = text.replace(",", "").replace(" ", "")
    return text


def is_right(problem: Problem, answer: str | None) -> bool:
    if answer is None:
        return False
    return normalise(answer, problem.numeric) == normalise(problem.expected, problem.numeric)


def check_problems() -> list[str]:
    """Every problem whose expected answer its reference solution does not give, in words."""
    wrong = []
    for problem in PROBLEMS:
        got = problem.reference(problem.files)
        if got != problem.expected:
            wrong.append(f"{problem.id}: expected {problem.expected!r}, reference gives {got!r}")
    ids = [p.id for p in PROBLEMS]
    if len(set(ids)) != len(ids):
        wrong.append("problem ids repeat")
    return wrong
