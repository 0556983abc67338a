"""Independent reading of the benchmarks' package files, compared field by
field with what `tarpo data humaneval|champ` wrote.

Usage: python sources_check.py humaneval|champ|gsm-symbolic SOURCE OUT_JSONL
Prints "N problems ok", or the first difference.
"""
import gzip
import json
import sys


def expected(kind, source):
    if kind == "humaneval":
        with gzip.open(source, "rt") as f:
            rows = [json.loads(l) for l in f if l.strip()]
        return [{"id": r["task_id"], "prompt": r["prompt"], "answer": r["canonical_solution"],
                 "test": r["test"], "entry_point": r["entry_point"]} for r in rows]
    if kind == "gsm-symbolic":
        import os
        import tomllib
        rows = []
        for name in sorted(n for n in os.listdir(source) if n.endswith(".toml")):
            t = tomllib.load(open(os.path.join(source, name), "rb"))
            sol = t["answer"].strip()
            rows.append({"id": "gsm-symbolic/" + name[:-5], "prompt": t["question"].strip(),
                         "answer": sol.split("####")[-1].strip().replace(",", ""),
                         "solution": sol, "id_orig": t.get("id_orig"),
                         "template": name[:-5], "instance": 0})
        return rows
    problems = json.load(open(source))["problems"]  # dicts keep file order
    return [{"id": p["identifier"], "prompt": p["_text"], "answer": p["_answer"],
             "category": p["category"],
             "solution": "\n".join(s["_text"] for s in p["solution"]["steps"])}
            for p in problems.values()]


def main():
    kind, source, out = sys.argv[1:4]
    want = expected(kind, source)
    got = [json.loads(l) for l in open(out)]
    if len(got) != len(want):
        print(f"{len(got)} rows, expected {len(want)}")
        return
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            keys = [k for k in set(g) | set(w) if g.get(k) != w.get(k)]
            print(f"row {i + 1} ({w['id']}) differs in {sorted(keys)}")
            return
    print(f"{len(got)} problems ok")


if __name__ == "__main__":
    main()
