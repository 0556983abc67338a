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

/// A Rhai engine with every workbench type and primitive.
pub fn engine() -> Engine {
    let mut e = Engine::new();
    e.set_module_resolver(Resolver {
        files: FileModuleResolver::new(),
    });
    // Ctrl-C: long native work polls ctl itself; script loops stop here.
    e.on_progress(|_| crate::ctl::is_interrupted().then(|| Dynamic::from("interrupted")));
    e.set_max_expr_depths(256, 256);
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
}

impl Session {
    /// `args` becomes the constant map `args` (from `--set key=value`).
    pub fn new(args: Map) -> Session {
        let mut scope = Scope::new();
        scope.push_constant("args", args);
        Session {
            engine: engine(),
            scope,
            fns: AST::empty(),
        }
    }

    /// Runs `code` (named `source` in errors); variables, functions and
    /// imports persist. Errors come back formatted; a panic inside native
    /// code becomes an error too, and the session stays usable.
    pub fn eval(&mut self, code: &str, source: &str) -> Result<Dynamic, String> {
        crate::ctl::clear();
        let mut ast = self
            .engine
            .compile_with_scope(&self.scope, code)
            .map_err(|e| format_error(&e.into(), source))?;
        ast.set_source(source);
        let run = self.fns.merge(&ast);
        let engine = &self.engine;
        let scope = &mut self.scope;
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            engine.eval_ast_with_scope::<Dynamic>(scope, &run)
        }));
        let out = match out {
            Ok(r) => r.map_err(|e| format_error(&e, source)),
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
        let v = self.scope.get_value::<Dynamic>(name)?;
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
        w.extend(self.scope.iter().map(|(n, _, _)| n.to_string()));
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

/// `file:line:col: message`, then the chain of script functions it happened in.
pub fn format_error(err: &EvalAltResult, file: &str) -> String {
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
    let msg = match e {
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
    };
    let mut out = format!("{}: {msg}", location(&source, e.position()));
    for c in calls.iter().rev() {
        out.push('\n');
        out.push_str(c);
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
