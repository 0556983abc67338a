//! `counterfactual(ro, opts)`: each free routing decision of a rollout
//! changed in turn and the rest re-sampled (policy/counterfactual.rs), as a
//! frame with the answer and reward before and after.
use super::bind_run::FrameHandle;
use super::help;
use super::opts::Opts;
use super::types::*;
use crate::analysis::token_class::token_class;
use crate::policy::counterfactual::{counterfactuals, Change};
use crate::policy::SOFT;
use crate::rl::reward as rewards;
use anyhow::{anyhow, bail, Result};
use polars::prelude::*;
use rhai::{Engine, Map};
use std::rc::Rc;

pub fn register(engine: &mut Engine) {
    engine.register_fn("counterfactual", |ro: RolloutHandle| {
        rt(counterfactual(&ro, Map::new()))
    });
    engine.register_fn("counterfactual", |ro: RolloutHandle, o: Map| {
        rt(counterfactual(&ro, o))
    });
}

fn mode_name(m: i64) -> &'static str {
    if m == SOFT {
        "soft"
    } else {
        "hard"
    }
}

fn index_list(o: &Opts, name: &str) -> Result<Option<Vec<usize>>> {
    let Some(v) = o.raw(name) else {
        return Ok(None);
    };
    let Some(a) = v.clone().try_cast::<rhai::Array>() else {
        bail!("counterfactual: option `{name}` must be an array of indices, got {v}");
    };
    let ints = ints(&a, name)?;
    if let Some(i) = ints.iter().find(|&&i| i < 0) {
        bail!("counterfactual: `{name}` holds {i}, not an index");
    }
    Ok(Some(ints.into_iter().map(|i| i as usize).collect()))
}

fn counterfactual(ro: &RolloutHandle, o: Map) -> Result<FrameHandle> {
    let o = Opts::check("counterfactual", help::COUNTERFACTUAL, o)?;
    let d = &ro.0;
    let Some(made) = &d.made else {
        bail!("counterfactual: this rollout cannot be re-run as it was made (it needs a router rollout of rollout_group, not a selection, a join or a reference rollout)");
    };
    let change = Change::parse(&o.str("mode")?)?;
    let reward = o.str("reward")?;
    let score = rewards::lookup(&reward)?;
    let rows = index_list(&o, "rows")?.unwrap_or_else(|| (0..d.ro.records.len()).collect());
    let positions = index_list(&o, "positions")?;
    let st = d.backbone.0.borrow();
    let p = &st.policy;
    let router = p
        .router
        .as_ref()
        .ok_or_else(|| anyhow!("counterfactual: the backbone has no router"))?;
    let tok = &p.model.tok;
    let flips = counterfactuals(
        &p.model.net,
        router,
        tok,
        &d.ro,
        made,
        &rows,
        positions.as_deref(),
        change,
    )?;

    let mut c = Cols::default();
    for f in &flips {
        let answer = &d.items[f.row / d.group].answer;
        let before = &d.texts[f.row];
        let ids: Vec<i64> = f
            .records
            .iter()
            .filter(|r| r.has_token())
            .map(|r| r.token)
            .collect();
        let after = tok.decode(&ids, true)?;
        let token = tok.decode(&[d.ro.records[f.row][f.position].token], false)?;
        let (ab, aa) = (
            rewards::extract_answer(before, &reward)?,
            rewards::extract_answer(&after, &reward)?,
        );
        let (rb, ra) = (score(before, answer), score(&after, answer));
        c.prompt_id.push((f.row / d.group) as i64);
        c.sample_id.push((f.row % d.group) as i64);
        c.position.push(f.position as i64);
        c.token_class.push(token_class(&token));
        c.token.push(token);
        c.mode_before.push(mode_name(f.before));
        c.mode_after.push(mode_name(f.after));
        c.answer_changed.push(ab != aa);
        c.answer_before.push(ab);
        c.answer_after.push(aa);
        c.reward_before.push(rb);
        c.reward_after.push(ra);
        c.reward_changed.push(rb != ra);
        c.tokens_after.push(f.records.len() as i64);
        c.completion_after.push(after);
    }
    Ok(FrameHandle(Rc::new(c.into_frame()?)))
}

/// The frame's columns (COUNTERFACTUAL_COLUMNS in the help).
#[derive(Default)]
struct Cols {
    prompt_id: Vec<i64>,
    sample_id: Vec<i64>,
    position: Vec<i64>,
    token: Vec<String>,
    token_class: Vec<&'static str>,
    mode_before: Vec<&'static str>,
    mode_after: Vec<&'static str>,
    answer_before: Vec<Option<String>>,
    answer_after: Vec<Option<String>>,
    answer_changed: Vec<bool>,
    reward_before: Vec<f64>,
    reward_after: Vec<f64>,
    reward_changed: Vec<bool>,
    tokens_after: Vec<i64>,
    completion_after: Vec<String>,
}

impl Cols {
    fn into_frame(self) -> Result<DataFrame> {
        let n = self.position.len();
        let cols = vec![
            Column::new("prompt_id".into(), self.prompt_id),
            Column::new("sample_id".into(), self.sample_id),
            Column::new("position".into(), self.position),
            Column::new("token".into(), self.token),
            Column::new("token_class".into(), self.token_class),
            Column::new("mode_before".into(), self.mode_before),
            Column::new("mode_after".into(), self.mode_after),
            Column::new("answer_before".into(), self.answer_before),
            Column::new("answer_after".into(), self.answer_after),
            Column::new("answer_changed".into(), self.answer_changed),
            Column::new("reward_before".into(), self.reward_before),
            Column::new("reward_after".into(), self.reward_after),
            Column::new("reward_changed".into(), self.reward_changed),
            Column::new("tokens_after".into(), self.tokens_after),
            Column::new("completion_after".into(), self.completion_after),
        ];
        DataFrame::new(n, cols).map_err(|e| anyhow!("counterfactual frame: {e}"))
    }
}
