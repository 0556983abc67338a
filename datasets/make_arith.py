"""Generates the shipped synthetic arithmetic task (GSM8K format: the answer
follows `####`). Deterministic: `python datasets/make_arith.py` rewrites
datasets/arith_train.jsonl (400 rows) and datasets/arith_test.jsonl (100 rows)
identically. One- and two-step word problems over small numbers, so a 135M
model on CPU has a chance and the router has numbers to go soft on."""
import json
import os
import random

NAMES = ["Ava", "Ben", "Cleo", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivo", "June"]
THINGS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "coins", "shells"]
INSTR = " Think step by step, then give the final answer after ####."


def problem(rng):
    n, t = rng.choice(NAMES), rng.choice(THINGS)
    a, b, c = rng.randint(2, 40), rng.randint(2, 20), rng.randint(2, 9)
    kind = rng.randrange(5)
    if kind == 0:
        return f"{n} has {a} {t} and gets {b} more. How many {t} does {n} have now?", a + b
    if kind == 1:
        a = a + b
        return f"{n} has {a} {t} and gives away {b}. How many {t} are left?", a - b
    if kind == 2:
        return f"{n} buys {c} bags with {b} {t} in each bag. How many {t} is that?", c * b
    if kind == 3:
        return (f"{n} has {a} {t}, finds {b} more, then loses {c}. How many {t} does {n} have?",
                a + b - c)
    return f"{n} has {c} boxes of {b} {t} and {a} loose {t}. How many {t} in all?", c * b + a


def write(path, rows):
    with open(path, "w") as f:
        for q, ans in rows:
            f.write(json.dumps({"prompt": q + INSTR, "answer": str(ans)}) + "\n")


rng = random.Random(42)
seen, rows = set(), []
while len(rows) < 500:
    q, a = problem(rng)
    if q not in seen:
        seen.add(q)
        rows.append((q, a))
here = os.path.dirname(os.path.abspath(__file__))
write(os.path.join(here, "arith_train.jsonl"), rows[:400])
write(os.path.join(here, "arith_test.jsonl"), rows[400:])
