//! The options of the analysis primitives (charts, pages, the report,
//! counterfactual routing), part of the one table in `help`.
use super::opts::{opt, Def, Opt, Ty};

pub const PLOT: &[Opt] = &[
    opt("title", Def::Unset(Ty::Str), "chart title"),
    opt("bins", Def::Int(20), "histogram bins"),
    opt("bucket", Def::Int(16), "positions per bucket"),
];

pub const PLOT_LINES: &[Opt] = &[
    opt("x", Def::Str("step"), "column on the x axis"),
    opt("y", Def::Required(Ty::Str), "column on the y axis"),
    opt(
        "by",
        Def::Unset(Ty::Str),
        "one line per value of this column (e.g. \"run\")",
    ),
    opt("title", Def::Unset(Ty::Str), "chart title (default: y)"),
    opt(
        "x_label",
        Def::Unset(Ty::Str),
        "x-axis label with its unit (default: x)",
    ),
    opt(
        "y_label",
        Def::Unset(Ty::Str),
        "y-axis label with its unit (default: y)",
    ),
];

pub const PLOT_BARS: &[Opt] = &[
    opt("label", Def::Str("token"), "column of the bar labels"),
    opt("value", Def::Required(Ty::Str), "column of the bar lengths"),
    opt(
        "note",
        Def::Unset(Ty::Str),
        "column written at each bar's end (e.g. a count)",
    ),
    opt(
        "tokens",
        Def::Bool(true),
        "labels are token texts: quoted, whitespace escaped",
    ),
    opt("title", Def::Unset(Ty::Str), "chart title (default: value)"),
    opt(
        "x_label",
        Def::Unset(Ty::Str),
        "axis label with its unit (default: value)",
    ),
];

pub const PLOT_FRAME_HISTOGRAM: &[Opt] = &[
    opt("column", Def::Str("p_soft"), "the values"),
    opt(
        "by",
        Def::Unset(Ty::Str),
        "one overlaid histogram per value of this column (bars become fractions)",
    ),
    opt("bins", Def::Int(20), "bins"),
    opt(
        "lo",
        Def::Unset(Ty::Float),
        "low edge (default: the values' minimum)",
    ),
    opt(
        "hi",
        Def::Unset(Ty::Float),
        "high edge (default: the maximum)",
    ),
    opt(
        "title",
        Def::Unset(Ty::Str),
        "chart title (default: column)",
    ),
    opt(
        "x_label",
        Def::Unset(Ty::Str),
        "axis label (default: column)",
    ),
];

pub const PLOT_TEXT: &[Opt] = &[
    opt(
        "samples",
        Def::Unset(Ty::Any),
        "a samples Frame (run.samples()): prompts, reference answers, rewards",
    ),
    opt("max", Def::Int(6), "completions shown"),
    opt("title", Def::Str("soft tokens"), "page title"),
];

pub const WRITE_REPORT: &[Opt] = &[
    opt("title", Def::Str("run report"), "page title"),
    opt(
        "config",
        Def::Unset(Ty::Any),
        "a map shown as the run's configuration",
    ),
    opt(
        "tables",
        Def::Unset(Ty::Map),
        "#{caption: Frame} shown as tables",
    ),
    opt(
        "charts",
        Def::Unset(Ty::Array),
        "chart files (.svg or .png), embedded in order",
    ),
    opt(
        "text",
        Def::Unset(Ty::Any),
        "a tokens Frame: its first completions, highlighted",
    ),
    opt(
        "samples",
        Def::Unset(Ty::Any),
        "the samples Frame for `text`",
    ),
    opt("max", Def::Int(4), "completions shown from `text`"),
];

pub const COUNTERFACTUAL: &[Opt] = &[
    opt("mode", Def::Str("flip"), "\"flip\" each free decision, or set it \"hard\" or \"soft\" (positions already so are left out)"),
    opt("positions", Def::Unset(Ty::Array), "positions to change (default: every position)"),
    opt("rows", Def::Unset(Ty::Array), "completions to change (default: all)"),
    opt("reward", Def::Str("gsm8k"), "reward and answer format (gsm8k, math, format_gsm8k, format_math)"),
];
