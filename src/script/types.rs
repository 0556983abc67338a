//! The workbench's values as scripts see them. Handles are cheap clones of
//! shared state (a backbone assigned to two variables is one model), and the
//! conversions between Rhai values and Rust ones live here.
use crate::model::Model;
use crate::policy::{Rng, Rollout};
use crate::rl::dataset::{Dataset, Sampler};
use crate::rl::loss::LossMetrics;
use crate::rl::optim::AdamW;
use crate::rl::policy::Policy;
use crate::rl::update::LossSums;
use anyhow::{anyhow, bail, Result};
use rhai::{Array, Dynamic, EvalAltResult, Map, Position};
use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;

/// A loaded model with what scripts attach to it (router, HRPO gate, LoRA).
#[derive(Clone)]
pub struct Backbone(pub Rc<RefCell<BackboneState>>);

pub struct BackboneState {
    pub policy: Policy,
    /// Draws each rollout's seed.
    pub rng: Rng,
    /// The losses whose gradients the parameters hold, not yet stepped.
    pub pending: Pending,
    /// Losses computed so far (each gets the next serial).
    pub losses: u64,
}

/// Gradients accumulated by `tarpo_loss` calls since the last optimizer step.
#[derive(Default)]
pub struct Pending {
    pub serials: Vec<u64>,
    pub sums: Option<LossSums>,
}

impl Backbone {
    pub fn new(model: Model, seed: u64) -> Backbone {
        Backbone(Rc::new(RefCell::new(BackboneState {
            policy: Policy::new(model),
            rng: Rng::new(seed),
            pending: Pending::default(),
            losses: 0,
        })))
    }

    pub fn same(&self, other: &Backbone) -> bool {
        Rc::ptr_eq(&self.0, &other.0)
    }
}

/// The router of a backbone (a view: it reads the backbone's current router).
#[derive(Clone)]
pub struct RouterHandle(pub Backbone);

/// A data set and its sampler (shared by clones, so sampling advances once).
#[derive(Clone)]
pub struct DatasetHandle {
    pub data: Rc<Dataset>,
    pub sampler: Rc<RefCell<Sampler>>,
    pub path: PathBuf,
}

/// One prompt of a rollout: its text as given, the reference answer, and its
/// data-set row when it came from one.
#[derive(Clone, Debug)]
pub struct PromptItem {
    pub prompt: String,
    pub answer: String,
    pub id: i64,
    /// The row's other string fields (a HumanEval `test`, `entry_point`).
    pub fields: std::collections::BTreeMap<String, String>,
}

/// A rollout with what scripts need beside the records.
#[derive(Clone)]
pub struct RolloutHandle(pub Rc<RolloutData>);

pub struct RolloutData {
    pub ro: Rollout,
    pub group: usize,
    /// One per prompt (completion i belongs to prompt i / group).
    pub items: Vec<PromptItem>,
    /// Decoded completions (special tokens skipped).
    pub texts: Vec<String>,
    pub max_new: usize,
    /// The backbone that made it (for token text and marked spans).
    pub backbone: Backbone,
    /// The options that made it, when it can be re-run as it was (a router
    /// rollout of rollout_group; not a selection, a join or a reference rollout).
    pub made: Option<crate::policy::RolloutOptions>,
}

/// The loss of one `tarpo_loss` call; its gradient is in the parameters until
/// an optimizer step consumes it (with the other losses accumulated with it).
#[derive(Clone)]
pub struct LossHandle {
    /// This loss alone, as a batch of its own.
    pub metrics: LossMetrics,
    pub serial: u64,
    pub backbone: Backbone,
}

#[derive(Clone)]
pub struct OptimizerHandle(pub Rc<RefCell<OptimizerState>>);

pub struct OptimizerState {
    pub adamw: AdamW,
    pub backbone: Backbone,
    /// Learning rates and decay for parameters that appear later (a router
    /// attached after the optimizer was made).
    pub lr: f64,
    pub router_lr: f64,
    pub weight_decay: f64,
    /// Trained tensors known equal on every rank (broadcast from rank 0).
    pub in_sync: usize,
}

/// A native error as a script error (the engine adds the script position).
pub fn rt<T>(r: Result<T>) -> Result<T, Box<EvalAltResult>> {
    r.map_err(|e| {
        if e.downcast_ref::<crate::ctl::Interrupted>().is_some() {
            return Box::new(EvalAltResult::ErrorTerminated(
                "interrupted".into(),
                Position::NONE,
            ));
        }
        Box::new(EvalAltResult::ErrorRuntime(
            format!("{e:#}").into(),
            Position::NONE,
        ))
    })
}

/// An array of numbers as f64 (ints widen); `what` names it in errors.
pub fn floats(a: &Array, what: &str) -> Result<Vec<f64>> {
    a.iter()
        .enumerate()
        .map(|(i, v)| {
            super::opts::as_f64(v)
                .ok_or_else(|| anyhow!("{what}[{i}] must be a number, got {}", v.type_name()))
        })
        .collect()
}

pub fn ints(a: &Array, what: &str) -> Result<Vec<i64>> {
    a.iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_int()
                .map_err(|t| anyhow!("{what}[{i}] must be an int, got {t}"))
        })
        .collect()
}

pub fn float_array(xs: impl IntoIterator<Item = f64>) -> Array {
    xs.into_iter().map(Dynamic::from_float).collect()
}

pub fn int_array(xs: impl IntoIterator<Item = i64>) -> Array {
    xs.into_iter().map(Dynamic::from_int).collect()
}

/// A JSON value as a Rhai value.
pub fn from_json(v: &serde_json::Value) -> Dynamic {
    use serde_json::Value as J;
    match v {
        J::Null => Dynamic::UNIT,
        J::Bool(b) => (*b).into(),
        J::Number(n) => match n.as_i64() {
            Some(i) => i.into(),
            None => n.as_f64().unwrap_or(f64::NAN).into(),
        },
        J::String(s) => s.clone().into(),
        J::Array(a) => Dynamic::from_array(a.iter().map(from_json).collect()),
        J::Object(o) => {
            Dynamic::from_map(o.iter().map(|(k, v)| (k.into(), from_json(v))).collect())
        }
    }
}

/// A Rhai value as JSON; `what` names it in errors (handles cannot be saved).
pub fn to_json(v: &Dynamic, what: &str) -> Result<serde_json::Value> {
    use serde_json::Value as J;
    Ok(if v.is_unit() {
        J::Null
    } else if let Ok(b) = v.as_bool() {
        J::Bool(b)
    } else if let Ok(i) = v.as_int() {
        J::from(i)
    } else if let Ok(f) = v.as_float() {
        serde_json::Number::from_f64(f).map_or(J::Null, J::Number)
    } else if v.is_string() {
        J::String(v.to_string())
    } else if let Some(a) = v.clone().try_cast::<Array>() {
        J::Array(
            a.iter()
                .enumerate()
                .map(|(i, x)| to_json(x, &format!("{what}[{i}]")))
                .collect::<Result<_>>()?,
        )
    } else if let Some(f) = v.clone().try_cast::<rhai::FnPtr>() {
        J::String(format!("fn {}", f.fn_name()))
    } else if let Some(m) = v.clone().try_cast::<Map>() {
        J::Object(map_to_json(&m, what)?)
    } else {
        bail!(
            "{what}: a {} cannot be saved (numbers, strings, bools, arrays and maps can)",
            v.type_name()
        )
    })
}

pub fn map_to_json(m: &Map, what: &str) -> Result<serde_json::Map<String, serde_json::Value>> {
    m.iter()
        .map(|(k, v)| Ok((k.to_string(), to_json(v, &format!("{what}.{k}"))?)))
        .collect()
}
