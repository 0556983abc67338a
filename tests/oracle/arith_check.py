"""Independent check of the synthetic task: re-derives every answer from the
question text alone (the person's count followed sentence by sentence,
distractors about someone else ignored) and checks the worked solution's
equations and its `#### answer`.

Usage: python arith_check.py DATA.jsonl   (prints "N problems ok" or fails)
"""
import json
import re
import sys

FACTOR = {"doubles": 2, "triples": 3, "quadruples": 4}


def solve(prompt):
    sentences = [s.strip() for s in re.split(r"(?<=[.?])\s+", prompt) if s.strip()]
    who, count, thing = re.match(r"^(\w+) has (\d+) (\w+)\.$", sentences[0]).groups()
    count, ops = int(count), []
    for s in sentences[1:]:
        if s.startswith("How many"):
            assert s == f"How many {thing} does {who} have now?", s
            break
        if m := re.match(rf"^{who} (buys|finds|gets) (\d+) more {thing}\.$", s):
            ops.append((count, "+", int(m[2]), count + int(m[2])))
        elif m := re.match(rf"^{who} gives (\d+) {thing} to \w+\.$", s):
            ops.append((count, "-", int(m[1]), count - int(m[1])))
        elif m := re.match(rf"^{who}'s number of {thing} (doubles|triples|quadruples)\.$", s):
            ops.append((count, "*", FACTOR[m[1]], count * FACTOR[m[1]]))
        elif m := re.match(rf"^{who} splits the {thing} into (\d+) equal piles and keeps one pile\.$", s):
            k = int(m[1])
            assert count % k == 0, (prompt, count, k)
            ops.append((count, "/", k, count // k))
        elif re.match(rf"^(?!{who}\b)\w+ has \d+ \w+\.$", s):
            continue  # a distractor about someone else
        else:
            raise AssertionError(f"unparsed sentence {s!r} in {prompt!r}")
        count = ops[-1][3]
        assert count >= 0, prompt
    return count, ops


def main():
    n = 0
    for line in open(sys.argv[1]):
        row = json.loads(line)
        answer, ops = solve(row["prompt"])
        assert str(answer) == row["answer"], (row, answer)
        lines = row["solution"].split("\n")
        assert lines[-1] == f"#### {answer}", row
        eqs = [l for l in lines if " = " in l]
        assert len(eqs) == len(ops) == row["steps"], row
        for eq, (a, op, b, c) in zip(eqs, ops):
            assert eq == f"{a} {op} {b} = {c}.", (eq, (a, op, b, c))
        n += 1
    print(f"{n} problems ok")


if __name__ == "__main__":
    main()
