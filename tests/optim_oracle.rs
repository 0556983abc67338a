//! AdamW against PyTorch: `torch.optim.AdamW` (betas (0.9, 0.99), two
//! parameter groups, one without weight decay) with `clip_grad_norm_` at 1.0
//! and transformers' warm-up + cosine (min ratio 0.1) schedule under
//! `LambdaLR`, replayed on the same parameters and gradients for 6 steps.
mod common;
use tarpo::rl::optim::{AdamW, AdamWConfig, ParamGroup, Schedule, ScheduleKind};
use tch::{Kind, Tensor};

const STEPS: usize = 6;
const N_PARAMS: usize = 4;

#[test]
fn adamw_matches_torch() {
    let dir = common::cached_oracle("adamw_oracle.py", &[]);
    let t = common::read_tensors(&dir.join("adamw.safetensors"));
    let get = |name: &str| {
        t.get(name)
            .unwrap_or_else(|| panic!("{name} missing from the oracle"))
            .shallow_clone()
    };
    let params: Vec<Tensor> = (0..N_PARAMS)
        .map(|i| get(&format!("init.{i}")).copy().set_requires_grad(true))
        .collect();
    let mut opt = AdamW::new(
        vec![
            ParamGroup::new(
                "A",
                vec![params[0].shallow_clone(), params[1].shallow_clone()],
                1e-2,
                0.1,
            ),
            ParamGroup::new(
                "B",
                vec![params[2].shallow_clone(), params[3].shallow_clone()],
                3e-2,
                0.0,
            ),
        ],
        AdamWConfig {
            betas: (0.9, 0.99),
            eps: 1e-8,
            max_grad_norm: Some(1.0),
            max_consecutive_skips: 3,
            schedule: Schedule::new(ScheduleKind::Cosine, 2, STEPS as u64, 0.1).unwrap(),
        },
    )
    .unwrap();

    let norms = Vec::<f32>::try_from(get("norm")).unwrap();
    let lrs = Vec::<Vec<f64>>::try_from(get("lr")).unwrap();
    assert!(norms.iter().any(|&n| n > 1.0), "no step clips: {norms:?}");
    let mut worst_param = 0f64;
    let mut worst_norm = 0f64;
    for k in 0..STEPS {
        opt.zero_grad().unwrap();
        for (i, p) in params.iter().enumerate() {
            // d/dp sum(p * g) = g exactly.
            let g = get(&format!("grad.{k}.{i}"));
            (p * &g).sum(Kind::Float).backward();
            assert_eq!(common::max_abs_diff(&p.grad(), &g), 0.0);
        }
        let want_lrs = &lrs[k];
        let got_lrs = opt.lrs();
        for (g, w) in got_lrs.iter().zip(want_lrs) {
            assert!(
                (g - w).abs() <= 1e-15,
                "step {k}: lrs {got_lrs:?} vs torch {want_lrs:?}"
            );
        }
        let r = opt.step().unwrap();
        assert!(!r.skipped);
        assert_eq!(r.lr, got_lrs[0]);
        let dn = (r.grad_norm - norms[k] as f64).abs();
        assert!(
            dn <= 1e-6,
            "step {k}: grad norm {} vs torch {}",
            r.grad_norm,
            norms[k]
        );
        worst_norm = worst_norm.max(dn);
        for (i, p) in params.iter().enumerate() {
            let want = get(&format!("param.{k}.{i}"));
            let d = common::max_abs_diff(&p.detach(), &want);
            assert!(d <= 1e-6, "step {k} param {i}: max |diff| {d:e}");
            worst_param = worst_param.max(d);
        }
    }
    println!("max |param diff| {worst_param:e}, max |norm diff| {worst_norm:e}");
}
