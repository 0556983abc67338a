//! Rhai scripting over the workbench's primitives: one engine with every
//! type and primitive registered, the embedded standard library
//! (`import "tarpo" as tarpo;`), errors with file, line and column, and a
//! session whose variables, functions and imports persist between inputs
//! (what `tarpo run` and `tarpo repl` share).
pub mod bind_analysis;
pub mod bind_chart;
pub mod bind_code;
pub mod bind_counterfactual;
pub mod bind_data;
pub mod bind_dist;
pub mod bind_model;
pub mod bind_offline;
pub mod bind_rollout;
pub mod bind_run;
pub mod bind_stream;
pub mod bind_train;
pub mod help;
mod help_analysis;
pub mod opts;
mod run_checkpoint;
pub mod types;

use rhai::module_resolvers::FileModuleResolver;
use rhai::{Dynamic, Engine, EvalAltResult, Map, Module, ModuleResolver, Position, Scope, AST};
use std::path::Path;
use std::rc::Rc;

/// The standard library: method scripts compiled into the binary.
pub const STDLIB: &[(&str, &str)] = &[
    ("tarpo", include_str!("../../stdlib/tarpo.rhai")),
    ("grpo", include_str!("../../stdlib/grpo.rhai")),
    ("drgrpo", include_str!("../../stdlib/drgrpo.rhai")),
    ("dapo", include_str!("../../stdlib/dapo.rhai")),
    ("aapo", include_str!("../../stdlib/aapo.rhai")),
    ("rltt", include_str!("../../stdlib/rltt.rhai")),
    ("rpo", include_str!("../../stdlib/rpo.rhai")),
    (
        "soft_thinking",
        include_str!("../../stdlib/soft_thinking.rhai"),
    ),
    ("coconut", include_str!("../../stdlib/coconut.rhai")),
    ("hrpo", include_str!("../../stdlib/hrpo.rhai")),
    ("eval", include_str!("../../stdlib/eval.rhai")),
    ("sft", include_str!("../../stdlib/sft.rhai")),
];

/// `import "NAME"` finds the stdlib first, then files (relative to the importer).
struct Resolver {
    files: FileModuleResolver,
}

impl ModuleResolver for Resolver {
    fn resolve(
        &self,
        engine: &Engine,
        source: Option<&str>,
        path: &str,
        pos: Position,
    ) -> Result<Rc<Module>, Box<EvalAltResult>> {
        match STDLIB.iter().find(|(name, _)| *name == path) {
            Some((name, src)) => {
                let mut ast = engine.compile(*src)?;
                ast.set_source(format!("stdlib/{name}.rhai"));
                let m = Module::eval_ast_as_new(Scope::new(), &ast, engine)?;
                Ok(Rc::new(m))
            }
            None => self.files.resolve(engine, source, path, pos),
        }
    }
}

/// What a script may use before it fails with an error naming the limit
/// and its flag (`tarpo run`/`tarpo repl` `--max-array`, `--max-map`,
/// `--max-string`, `--max-call-depth`, `--max-operations`); 0 is no limit.
///
/// They exist so that a runaway REPL line (`let a = []; loop { a.push(1) }`)
/// fails within seconds instead of taking the machine's memory. How rhai
/// (1.27) enforces them decides the defaults:
///
/// - Sizes are of a whole value, nested ones counted: an array of 10 arrays
///   of 10 is 110 elements, a map holding an array of maps counts every entry
///   of every map. rhai measures the value again after every change made
///   through a method or operator (`push`, `+=`, `+`, `append`, string
///   concatenation, property writes) and on every value a function returns,
///   and `pad`/string padding are refused before they allocate. Measuring is
///   linear in the value's size, so with any of the three size limits set
///   even `a.len()` walks `a`, and filling an array by `push` costs time
///   quadratic in its length (0.6 ns x n^2 / 2 here: 3 s for 100,000 ints,
///   about 5 minutes for 1,000,000). The limit also bounds that cost.
/// - `m[key] = v` adding a key is not measured by rhai at all, so a map in a
///   variable is also checked, in constant time, whenever the variable is read
///   (`map_guard`).
///
/// The defaults, against what the stdlib and the scripts do (arrays of a few
/// thousand rewards, a metrics history of one map of ~45 numbers per step,
/// option maps of a few dozen keys, completions of up to ~100 KB):
///
/// - `array` 100,000 elements: 16 MB of numbers; a runaway `push` loop stops
///   in ~3 s (a per-step routing frame's column, 64 x 512 tokens, fits).
/// - `map` 1,000,000 entries (~100 MB): the metrics history of a 20,000-step
///   run fits; a runaway `m[k] = v` loop stops in ~2 s.
/// - `string` 16 MiB: 160 completions of 100 KB; a doubling loop stops at once.
/// - `call_depth` 256: deeper than any script recursion here, and far from
///   the 8 MB main stack (a level takes 5 to 15 KB; ~600 to 2000 levels
///   overflow it, which aborts the process instead of failing the script).
/// - `operations` none: a training loop runs for hours, a loop that only
///   spins takes no memory, and Ctrl-C stops it.
///
/// With all three size limits at 0 rhai skips measuring entirely (`push`
/// and `len` are constant time again): the way to build arrays of millions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Array (and BLOB) elements, nested arrays' elements counted.
    pub array: usize,
    /// Object map entries, nested maps' entries counted.
    pub map: usize,
    /// String length in bytes.
    pub string: usize,
    /// Nested calls of script functions and closures.
    pub call_depth: usize,
    /// Operations in one `tarpo run` script or one REPL input.
    pub operations: u64,
}

impl Limits {
    pub const DEFAULT: Limits = Limits {
        array: 100_000,
        map: 1_000_000,
        string: 16 << 20,
        call_depth: 256,
        operations: 0,
    };
}

impl Default for Limits {
    fn default() -> Limits {
        Limits::DEFAULT
    }
}

/// A Rhai engine with every workbench type and primitive, under the default limits.
pub fn engine() -> Engine {
    engine_with(&Limits::DEFAULT)
}

/// A Rhai engine with every workbench type and primitive, under `limits`.
pub fn engine_with(limits: &Limits) -> Engine {
    let mut e = Engine::new();
    e.set_module_resolver(Resolver {
        files: FileModuleResolver::new(),
    });
    // Ctrl-C: long native work polls ctl itself; script loops stop here
    // (rhai counts an operation, checks --max-operations, then calls this).
    e.on_progress(|_| crate::ctl::is_interrupted().then(|| Dynamic::from("interrupted")));
    e.set_max_expr_depths(256, 256);
    e.set_max_array_size(limits.array);
    e.set_max_map_size(limits.map);
    e.set_max_string_size(limits.string);
    e.set_max_operations(limits.operations);
    // rhai's 0 would forbid calls; ours is no limit.
    e.set_max_call_levels(match limits.call_depth {
        0 => usize::MAX,
        n => n,
    });
    if limits.map > 0 {
        map_guard(&mut e, limits.map);
    }
    bind_data::register(&mut e);
    bind_model::register(&mut e);
    bind_rollout::register(&mut e);
    bind_code::register(&mut e);
    bind_offline::register(&mut e);
    bind_train::register(&mut e);
    bind_run::register(&mut e);
    bind_chart::register(&mut e);
    bind_analysis::register(&mut e);
    bind_counterfactual::register(&mut e);
    bind_stream::register(&mut e);
    bind_dist::register(&mut e);
    // In a job only rank 0 prints (one summary, as one process would);
    // `debug` prints on every rank, marked with it.
    e.on_print(|s| {
        if crate::dist::world().is_main() {
            println!("{s}");
        }
    });
    e.on_debug(|s, _, pos| {
        let w = crate::dist::world();
        match w.launched() {
            true => eprintln!("[rank {}] {pos:?} {s}", w.rank),
            false => eprintln!("{pos:?} {s}"),
        }
    });
    e.register_fn("help", || print!("{}", help::overview()));
    e.register_fn("help", |name: &str| match help::one(name) {
        Some(s) => print!("{s}"),
        None => println!("no primitive {name:?}; help() lists them"),
    });
    e.register_fn("env", |name: &str| -> Dynamic {
        std::env::var(name).map_or(Dynamic::UNIT, Into::into)
    });
    register_math(&mut e);
    e
}

/// rhai checks a map's size after method calls and property writes, but not
/// after `m[key] = v` adds a key (rhai 1.27, `eval/chaining.rs`), so
/// `loop { m["k" + i] = i; i += 1 }` would grow until memory runs out.
/// Every read of a variable holding a map checks its number of keys instead:
/// constant time (a nested map grown by `m.inner[key] = v` is measured only
/// by rhai, at the next method call on it or on `m`). A map is reported once at a
/// given size, so the over-limit variable can still be read, cleared or
/// replaced afterwards (`m = #{}`); growing it further fails again.
fn map_guard(e: &mut Engine, max: usize) {
    let reported: std::cell::RefCell<Option<(String, usize)>> = Default::default();
    #[allow(deprecated)] // on_var is marked volatile, not deprecated
    e.on_var(move |name, index, ctx| {
        let scope = ctx.scope();
        // `index` counts from the end of the scope when rhai knows it (0: unknown).
        let found = match index {
            0 => scope.get(name),
            i => scope
                .iter_raw()
                .nth(i - 1)
                .filter(|(n, _, _)| *n == name)
                .map(|(_, _, v)| v)
                .or_else(|| scope.get(name)),
        };
        let Some(len) = found.and_then(|v| v.as_map_ref().ok().map(|m| m.len())) else {
            return Ok(None);
        };
        let mut last = reported.borrow_mut();
        let same = last.as_ref().is_some_and(|(n, _)| n == name);
        if len <= max {
            if same {
                *last = None; // back under the limit: report the next growth
            }
            return Ok(None);
        }
        if same && last.as_ref().is_some_and(|(_, l)| *l == len) {
            return Ok(None);
        }
        *last = Some((name.to_string(), len));
        Err(EvalAltResult::ErrorDataTooLarge(MAP_TOO_LARGE.into(), Position::NONE).into())
    });
}

/// rhai's names of its size limits in `ErrorDataTooLarge`.
const MAP_TOO_LARGE: &str = "Size of object map";

/// The message of an error that hit one of `limits`, naming the limit and
/// the flag that raises it; None for other errors.
fn limit_message(e: &EvalAltResult, limits: &Limits) -> Option<String> {
    let (what, value, flag) = match e {
        EvalAltResult::ErrorDataTooLarge(name, _) => match name.as_str() {
            MAP_TOO_LARGE => (
                format!("map grew past {} entries", limits.map),
                limits.map,
                "--max-map N",
            ),
            "Length of string" => (
                format!("string grew past {} bytes", limits.string),
                limits.string,
                "--max-string BYTES",
            ),
            // "Size of array/BLOB", "Size of BLOB"
            _ => (
                format!("array grew past {} elements", limits.array),
                limits.array,
                "--max-array N",
            ),
        },
        EvalAltResult::ErrorStackOverflow(_) => (
            format!("function calls nested deeper than {}", limits.call_depth),
            limits.call_depth,
            "--max-call-depth N",
        ),
        EvalAltResult::ErrorTooManyOperations(_) => (
            format!("ran more than {} operations", limits.operations),
            limits.operations as usize,
            "--max-operations N",
        ),
        _ => return None,
    };
    // A limit of 0 cannot be hit; an error all the same comes from elsewhere.
    (value > 0).then(|| format!("{what} (the limit; raise it with {flag}, 0 for none)"))
}

/// Array statistics scripts need for custom advantages and reports.
fn register_math(e: &mut Engine) {
    use types::{floats, rt};
    e.register_fn("sum", |a: rhai::Array| {
        rt(floats(&a, "array").map(|v| v.iter().sum::<f64>()))
    });
    e.register_fn("mean", |a: rhai::Array| {
        rt(floats(&a, "array").and_then(|v| {
            anyhow::ensure!(!v.is_empty(), "mean of an empty array");
            Ok(v.iter().sum::<f64>() / v.len() as f64)
        }))
    });
    // Unbiased (Bessel), as the group std of GRPO's advantages.
    e.register_fn("std", |a: rhai::Array| {
        rt(floats(&a, "array").and_then(|v| {
            anyhow::ensure!(v.len() >= 2, "std needs at least 2 values, got {}", v.len());
            let m = v.iter().sum::<f64>() / v.len() as f64;
            let ss: f64 = v.iter().map(|x| (x - m) * (x - m)).sum();
            Ok((ss / (v.len() - 1) as f64).sqrt())
        }))
    });
}

/// An engine plus the state that persists between inputs.
pub struct Session {
    pub engine: Engine,
    pub scope: Scope<'static>,
    /// Functions defined so far (REPL lines see earlier definitions).
    fns: AST,
    limits: Limits,
}

impl Session {
    /// `args` becomes the constant map `args` (from `--set key=value`); the
    /// default limits.
    pub fn new(args: Map) -> Session {
        Session::with_limits(args, Limits::DEFAULT)
    }

    /// A session under `limits` (`--max-array` and co.).
    pub fn with_limits(args: Map, limits: Limits) -> Session {
        let mut scope = Scope::new();
        scope.push_constant("args", args);
        Session {
            engine: engine_with(&limits),
            scope,
            fns: AST::empty(),
            limits,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Runs `code` (named `source` in errors); variables, functions and
    /// imports persist. Errors come back formatted; a panic inside native
    /// code becomes an error too, and the session stays usable.
    pub fn eval(&mut self, code: &str, source: &str) -> Result<Dynamic, String> {
        crate::ctl::clear();
        let limits = self.limits;
        let mut ast = self
            .engine
            .compile_with_scope(&self.scope, code)
            .map_err(|e| format_error_with(&e.into(), source, &limits))?;
        ast.set_source(source);
        let run = self.fns.merge(&ast);
        let engine = &self.engine;
        let scope = &mut self.scope;
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            engine.eval_ast_with_scope::<Dynamic>(scope, &run)
        }));
        let out = match out {
            Ok(r) => r.map_err(|e| format_error_with(&e, source, &limits)),
            Err(p) => Err(format!(
                "{source}: internal error (please report): {}",
                panic_text(&p)
            )),
        };
        self.fns = self.fns.merge(&ast.clone_functions_only());
        if out.is_ok() {
            self.keep_imports(code);
        }
        crate::ctl::clear();
        out
    }

    /// A value as the REPL prints it: the workbench's types through their
    /// `to_string` (a Frame as a table with its shape), others as Rhai shows them.
    pub fn show(&self, v: &Dynamic) -> String {
        if !v.is_variant() {
            return v.to_string();
        }
        let mut scope = Scope::new();
        scope.push("value", v.clone());
        self.engine
            .eval_with_scope::<String>(&mut scope, "value.to_string()")
            .unwrap_or_else(|e| format!("{v} (not shown: {e})"))
    }

    /// Runs a script file.
    pub fn run_file(&mut self, path: &Path) -> Result<Dynamic, String> {
        let code = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        self.eval(&code, &path.display().to_string())
    }

    /// `import "x" as y;` at the top level of an input stays visible to later
    /// inputs (the engine forgets imports between runs).
    fn keep_imports(&mut self, code: &str) {
        for stmt in code.split(';') {
            let words: Vec<&str> = stmt.split_whitespace().collect();
            if let ["import", path, "as", alias] = words.as_slice() {
                let path = path.trim_matches('"');
                let resolver = Resolver {
                    files: FileModuleResolver::new(),
                };
                if let Ok(m) = resolver.resolve(&self.engine, None, path, Position::NONE) {
                    self.engine.register_static_module(*alias, m);
                }
            }
        }
    }

    /// The names of the variables in scope (cheap: no value is copied or shown).
    pub fn variable_names(&self) -> Vec<String> {
        self.scope
            .iter_raw()
            .map(|(n, _, _)| n.to_string())
            .collect()
    }

    /// Variables in scope: (name, type, value shown briefly).
    pub fn variables(&self) -> Vec<(String, String, String)> {
        self.scope
            .iter()
            .map(|(name, _, v)| {
                // Workbench handles print as their Rust type name: show none.
                let mut shown = if v.to_string() == v.type_name() {
                    String::new()
                } else {
                    v.to_string()
                };
                if shown.chars().count() > 60 {
                    shown = shown.chars().take(57).collect::<String>() + "...";
                }
                let ty = self.engine.map_type_name(v.type_name()).to_string();
                (name.to_string(), ty, shown)
            })
            .collect()
    }

    /// The methods and properties of variable `name`'s type, when it is one of
    /// the workbench's types (completion after `name.`).
    pub fn methods_of(&self, name: &str) -> Option<Vec<String>> {
        // By reference: a variable may be a large array (no copy per prompt).
        let v = self.scope.get(name)?;
        let ty = self.engine.map_type_name(v.type_name());
        let (_, list) = help::METHODS.iter().find(|(t, _)| *t == ty)?;
        Some(
            list.split_whitespace()
                .map(|m| m.split('(').next().unwrap_or(m).to_string())
                .collect(),
        )
    }

    /// Names completion may offer: primitives, methods, keywords, variables,
    /// functions defined in the session.
    pub fn completion_words(&self) -> Vec<String> {
        let mut w: Vec<String> = help::completion_words()
            .into_iter()
            .map(String::from)
            .collect();
        w.extend(self.scope.iter_raw().map(|(n, _, _)| n.to_string()));
        w.extend(self.fns.iter_functions().map(|f| f.name.to_string()));
        w.sort();
        w.dedup();
        w
    }
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}

fn location(source: &str, pos: Position) -> String {
    match (pos.line(), pos.position()) {
        (Some(l), Some(c)) => format!("{source}:{l}:{c}"),
        (Some(l), None) => format!("{source}:{l}"),
        _ => source.to_string(),
    }
}

/// `file:line:col: message`, then the chain of script functions it happened
/// in; a limit's error names the default limits (`format_error_with`).
pub fn format_error(err: &EvalAltResult, file: &str) -> String {
    format_error_with(err, file, &Limits::DEFAULT)
}

/// `format_error` for an engine under `limits`: hitting one names it, its
/// value and its flag (rhai passes these errors up without the chain of
/// calls). A chain of calls (an error deep in a recursion, say) shows a run
/// of the same call once with its count, and at most its 10 innermost and
/// 10 outermost calls.
pub fn format_error_with(err: &EvalAltResult, file: &str, limits: &Limits) -> String {
    let mut calls = Vec::new();
    let mut source = file.to_string();
    let mut e = err;
    loop {
        match e {
            EvalAltResult::ErrorInFunctionCall(name, src, inner, pos) => {
                calls.push(format!(
                    "  in {name}(), called at {}",
                    location(&source, *pos)
                ));
                if !src.is_empty() {
                    source = src.clone();
                }
                e = inner;
            }
            EvalAltResult::ErrorInModule(name, inner, pos) => {
                calls.push(format!(
                    "  in module {name:?}, imported at {}",
                    location(&source, *pos)
                ));
                e = inner;
            }
            _ => break,
        }
    }
    let msg = match limit_message(e, limits) {
        Some(m) => m,
        None => match e {
            EvalAltResult::ErrorRuntime(v, _) => v.to_string(),
            EvalAltResult::ErrorTerminated(..) => "interrupted".to_string(),
            // Display appends " (line L, position C)"; the location is printed first instead.
            other => {
                let full = other.to_string();
                match full.rfind(" (line ") {
                    Some(i) if full.ends_with(')') => full[..i].to_string(),
                    _ => full,
                }
            }
        },
    };
    let mut out = format!("{}: {msg}", location(&source, e.position()));
    // Innermost first; a run of the same line once, with its count.
    let mut lines: Vec<String> = Vec::new();
    let mut i = calls.len();
    while i > 0 {
        let line = &calls[i - 1];
        let mut n = 1;
        while i > n && calls[i - 1 - n] == *line {
            n += 1;
        }
        i -= n;
        lines.push(match n {
            1 => line.clone(),
            n => format!("{line} ({n} times)"),
        });
    }
    const SHOWN: usize = 10;
    let elided = lines.len().saturating_sub(2 * SHOWN);
    for (k, l) in lines.iter().enumerate() {
        if elided > 0 && k >= SHOWN && k < lines.len() - SHOWN {
            if k == SHOWN {
                out.push_str(&format!("\n  ... {elided} more calls"));
            }
            continue;
        }
        out.push('\n');
        out.push_str(l);
    }
    out
}

/// `--set key=value`: JSON when it parses (numbers, bools, arrays), else a string.
pub fn parse_set(kv: &str) -> Result<(String, Dynamic), String> {
    let Some((k, v)) = kv.split_once('=') else {
        return Err(format!("--set {kv:?}: expected KEY=VALUE"));
    };
    let k = k.trim();
    if k.is_empty() || !k.chars().all(|c| c.is_alphanumeric() || c == '_') {
        return Err(format!(
            "--set {kv:?}: the key must be a name (letters, digits, _)"
        ));
    }
    let value = match serde_json::from_str::<serde_json::Value>(v) {
        Ok(j) => types::from_json(&j),
        Err(_) => v.to_string().into(),
    };
    Ok((k.to_string(), value))
}
