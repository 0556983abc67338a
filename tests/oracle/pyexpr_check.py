"""Python's own answer for each expression on the command line, one repr per
line ("error" when Python raises), in the scope tests/pyexpr.rs builds: the
GSM-Symbolic package's condition helpers (is_int, divides, round, Fraction,
...) and a = Fraction(1, 2), b = 7, c = 2.5, s = "it's".

Usage: python pyexpr_check.py PACKAGE_DIR EXPR...
"""
import importlib
import sys
import types
from fractions import Fraction

mod = types.ModuleType("multilingual_gsm_symbolic")
mod.__path__ = [sys.argv[1]]
sys.modules["multilingual_gsm_symbolic"] = mod
h = importlib.import_module("multilingual_gsm_symbolic._helpers")

scope = h.EVAL_CONTEXT_HELPERS | {"a": Fraction(1, 2), "b": 7, "c": 2.5, "s": "it's"}
for expr in sys.argv[2:]:
    try:
        print(repr(eval(expr, {"__builtins__": {}}, dict(scope))))
    except Exception:
        print("error")
