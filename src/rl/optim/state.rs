//! Optimizer state save/load for exact resume: one safetensors file holding
//! the moments, with the scalars as JSON in its metadata.
use super::adamw::{AdamW, ParamState};
use super::schedule::Schedule;
use crate::model::text::{clip, shorten};
use crate::model::weights::{self, kind_of, TensorBytes};
use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use tch::{Kind, Tensor};

const STATE_KEY: &str = "tarpo.optim";
const STATE_FORMAT: &str = "tarpo-adamw-v1";

#[derive(Serialize, Deserialize)]
struct SavedParam {
    shape: Vec<i64>,
    dtype: String,
    /// Per-parameter AdamW step; moments are stored iff > 0.
    step: u64,
}

#[derive(Serialize, Deserialize)]
struct SavedGroup {
    name: String,
    lr: f64,
    weight_decay: f64,
    params: Vec<SavedParam>,
}

#[derive(Serialize, Deserialize)]
struct SavedState {
    format: String,
    step: u64,
    consecutive_skips: usize,
    skipped_steps: u64,
    /// For information; the running configuration is kept on load.
    betas: (f64, f64),
    eps: f64,
    schedule: Schedule,
    groups: Vec<SavedGroup>,
}

/// Optimizer state is floating point only.
fn dtype_of(kind: Kind) -> Result<Dtype> {
    match kind {
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16 => weights::dtype_of(kind)
            .ok_or_else(|| anyhow!("cannot store optimizer state of dtype {kind:?}")),
        k => bail!("cannot store optimizer state of dtype {k:?}"),
    }
}

/// The dtype as written in the metadata (and compared on load).
fn dtype_name(kind: Kind) -> Result<String> {
    Ok(format!("{:?}", dtype_of(kind)?))
}

fn blob(t: &Tensor) -> Result<TensorBytes> {
    dtype_of(t.f_kind()?)?;
    TensorBytes::of(t)
}

/// A shape from the file, shortened for an error message.
fn short_shape(shape: &[i64]) -> String {
    if shape.len() <= 8 {
        format!("{shape:?}")
    } else {
        format!("{:?}... ({} dimensions)", &shape[..8], shape.len())
    }
}

fn moment_names(gi: usize, pi: usize) -> (String, String) {
    (
        format!("group{gi}.param{pi}.exp_avg"),
        format!("group{gi}.param{pi}.exp_avg_sq"),
    )
}

impl AdamW {
    /// Writes the optimizer state (moments, per-parameter and global step
    /// counts, skip counters) to one safetensors file, the scalars as JSON in
    /// its metadata. Written atomically and synced (`fsio::write_atomic`).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut blobs: Vec<(String, TensorBytes)> = Vec::new();
        let mut groups = Vec::new();
        for (gi, (g, states)) in self.groups.iter().zip(&self.state).enumerate() {
            let mut params = Vec::new();
            for (pi, (p, st)) in g.params.iter().zip(states).enumerate() {
                params.push(SavedParam {
                    shape: p.size(),
                    dtype: dtype_name(p.f_kind()?)?,
                    step: st.step,
                });
                if st.step > 0 {
                    let (Some(m), Some(v)) = (&st.exp_avg, &st.exp_avg_sq) else {
                        bail!("internal: AdamW moments missing for a stepped parameter");
                    };
                    let (nm, nv) = moment_names(gi, pi);
                    blobs.push((nm, blob(m)?));
                    blobs.push((nv, blob(v)?));
                }
            }
            groups.push(SavedGroup {
                name: g.name.clone(),
                lr: g.lr,
                weight_decay: g.weight_decay,
                params,
            });
        }
        let saved = SavedState {
            format: STATE_FORMAT.to_string(),
            step: self.step,
            consecutive_skips: self.consecutive_skips,
            skipped_steps: self.skipped_steps,
            betas: self.config.betas,
            eps: self.config.eps,
            schedule: self.config.schedule,
            groups,
        };
        let meta = HashMap::from([(STATE_KEY.to_string(), serde_json::to_string(&saved)?)]);
        let bytes = safetensors::serialize(blobs.iter().map(|(n, b)| (n.as_str(), b)), Some(meta))
            .map_err(|e| anyhow!("serializing optimizer state: {e}"))?;
        crate::fsio::write_atomic(path, |f| Ok(f.write_all(&bytes)?))?;
        Ok(())
    }

    /// Restores the state written by [`AdamW::save`]. The file must describe
    /// the same groups (names, parameter counts, shapes and dtypes) in the
    /// same order; on any mismatch or damage this fails and the optimizer is
    /// left as it was. Learning rates, weight decays, betas, eps and the
    /// schedule are those of the running configuration, not the file's.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let ctx = || format!("loading optimizer state {}", path.display());
        let bytes = std::fs::read(path).with_context(ctx)?;
        let (_, header) = weights::read_header(&bytes)
            .map_err(|e| anyhow!("not a valid safetensors file: {e:#}"))
            .with_context(ctx)?;
        let json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(STATE_KEY))
            .ok_or_else(|| {
                anyhow!("header: no {STATE_KEY:?} metadata: not an optimizer state file")
            })
            .with_context(ctx)?;
        let saved: SavedState = serde_json::from_str(json)
            .map_err(|e| {
                anyhow!(
                    "header: malformed {STATE_KEY:?} metadata ({})",
                    clip(&e.to_string())
                )
            })
            .with_context(ctx)?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| anyhow!("header: damaged safetensors file: {e:?}"))
            .with_context(ctx)?;
        let new_state = self.restore(&saved, &st).with_context(ctx)?;
        self.state = new_state;
        self.step = saved.step;
        self.consecutive_skips = saved.consecutive_skips;
        self.skipped_steps = saved.skipped_steps;
        Ok(())
    }

    fn restore(&self, saved: &SavedState, st: &SafeTensors) -> Result<Vec<Vec<ParamState>>> {
        if saved.format != STATE_FORMAT {
            bail!(
                "metadata key `format`: unsupported optimizer state format {} (expected {STATE_FORMAT:?})",
                shorten(&saved.format)
            );
        }
        if saved.groups.len() != self.groups.len() {
            bail!(
                "metadata key `groups`: the file has {} parameter groups, the optimizer {}",
                saved.groups.len(),
                self.groups.len()
            );
        }
        let mut expected_tensors = 0;
        let mut out = Vec::with_capacity(self.groups.len());
        for (gi, (g, sg)) in self.groups.iter().zip(&saved.groups).enumerate() {
            if g.name != sg.name {
                bail!(
                    "group {gi} is {} in the file but {:?} in the optimizer",
                    shorten(&sg.name),
                    g.name
                );
            }
            if g.params.len() != sg.params.len() {
                bail!(
                    "group {gi} ({}) has {} parameters in the file but {} in the optimizer",
                    g.name,
                    sg.params.len(),
                    g.params.len()
                );
            }
            let mut states = Vec::with_capacity(g.params.len());
            for (pi, (p, sp)) in g.params.iter().zip(&sg.params).enumerate() {
                let shape = p.size();
                let kind = p.f_kind()?;
                if sp.shape != shape {
                    bail!(
                        "group {gi} ({}) parameter {pi}: shape {} in the file but {:?} in the optimizer",
                        g.name,
                        short_shape(&sp.shape),
                        shape
                    );
                }
                let dtype = dtype_name(kind)?;
                if sp.dtype != dtype {
                    bail!(
                        "group {gi} ({}) parameter {pi}: dtype {} in the file but {dtype} in the optimizer",
                        g.name,
                        shorten(&sp.dtype)
                    );
                }
                if sp.step == 0 {
                    states.push(ParamState::default());
                    continue;
                }
                expected_tensors += 2;
                let (nm, nv) = moment_names(gi, pi);
                let read = |name: &str| -> Result<Tensor> {
                    let view = st
                        .tensor(name)
                        .map_err(|_| anyhow!("tensor {name}: missing (the metadata says group {gi} parameter {pi} has stepped)"))?;
                    let vshape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
                    if vshape != shape {
                        bail!(
                            "tensor {name}: shape {}, expected {shape:?}",
                            weights::short_dims(&vshape)
                        );
                    }
                    if kind_of(view.dtype()) != Some(kind) {
                        bail!("tensor {name}: dtype {:?}, expected {dtype}", view.dtype());
                    }
                    let numel: usize = view.shape().iter().product();
                    if view.data().len() != numel * kind.elt_size_in_bytes() {
                        bail!("tensor {name}: data size does not match its shape");
                    }
                    Ok(Tensor::f_from_data_size(view.data(), &vshape, kind)?
                        .f_to_device(p.device())?)
                };
                states.push(ParamState {
                    step: sp.step,
                    exp_avg: Some(read(&nm)?),
                    exp_avg_sq: Some(read(&nv)?),
                });
            }
            out.push(states);
        }
        if st.len() != expected_tensors {
            bail!(
                "header: the file holds {} tensors but its metadata describes {expected_tensors}",
                st.len()
            );
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rl::optim::test_util::{add_grad, bits_equal, param};
    use crate::rl::optim::{AdamWConfig, ParamGroup, ScheduleKind};

    fn grads_for(k: usize) -> [Tensor; 3] {
        let s = k as f64 + 1.0;
        [
            Tensor::from_slice(&[0.1f32, -0.2, 0.3, 0.05, 0.0, -0.4]).reshape([2, 3]) * s,
            Tensor::from_slice(&[0.7f32, -0.1]) / s,
            Tensor::from_slice(&[-0.3f32]) * (s * 0.5),
        ]
    }

    fn make(params: &[Tensor]) -> AdamW {
        AdamW::new(
            vec![
                ParamGroup::new(
                    "backbone",
                    vec![params[0].shallow_clone(), params[1].shallow_clone()],
                    1e-2,
                    0.1,
                ),
                ParamGroup::new("router_bias", vec![params[2].shallow_clone()], 3e-2, 0.0),
            ],
            AdamWConfig {
                max_grad_norm: Some(1.0),
                schedule: Schedule::new(ScheduleKind::Cosine, 2, 8, 0.1).unwrap(),
                ..Default::default()
            },
        )
        .unwrap()
    }

    fn fresh_params() -> Vec<Tensor> {
        vec![
            param(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]),
            param(&[-1.0, 0.5], &[2]),
            param(&[0.25], &[1]),
        ]
    }

    fn run(opt: &mut AdamW, params: &[Tensor], ks: std::ops::Range<usize>) {
        for k in ks {
            opt.zero_grad().unwrap();
            for (p, g) in params.iter().zip(grads_for(k)) {
                add_grad(p, &g);
            }
            opt.step().unwrap();
        }
    }

    #[test]
    fn save_load_round_trip() {
        let dir = std::env::temp_dir().join(format!("tarpo-optim-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("optim.safetensors");

        let pa = fresh_params();
        let mut a = make(&pa);
        run(&mut a, &pa, 0..3);
        // One skipped step so the skip counters are non-trivial.
        add_grad(
            &pa[0],
            &Tensor::full([2, 3], f64::NAN, (Kind::Float, tch::Device::Cpu)),
        );
        assert!(a.step().unwrap().skipped);
        a.save(&path).unwrap();
        let dir = path.parent().unwrap();
        assert!(!std::fs::read_dir(dir)
            .unwrap()
            .any(|e| crate::fsio::is_temp(&e.unwrap().path())));

        let pb: Vec<Tensor> = pa
            .iter()
            .map(|p| p.detach().copy().set_requires_grad(true))
            .collect();
        let mut b = make(&pb);
        b.load(&path).unwrap();
        assert_eq!(b.step_count(), 3);
        assert_eq!(b.consecutive_skips(), 1);
        assert_eq!(b.skipped_steps(), 1);
        assert_eq!(a.lrs(), b.lrs());
        for (sa, sb) in a.state.iter().flatten().zip(b.state.iter().flatten()) {
            assert_eq!(sa.step, sb.step);
            assert!(bits_equal(
                sa.exp_avg.as_ref().unwrap(),
                sb.exp_avg.as_ref().unwrap()
            ));
            assert!(bits_equal(
                sa.exp_avg_sq.as_ref().unwrap(),
                sb.exp_avg_sq.as_ref().unwrap()
            ));
        }
        run(&mut a, &pa, 3..5);
        run(&mut b, &pb, 3..5);
        for (x, y) in pa.iter().zip(&pb) {
            assert!(bits_equal(x, y));
        }
        // Saving again overwrites in place.
        a.save(&path).unwrap();
        b.load(&path).unwrap();
        assert_eq!(b.step_count(), 5);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn load_rejects_mismatches() {
        let dir = std::env::temp_dir().join(format!("tarpo-optim-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("optim.safetensors");
        let pa = fresh_params();
        let mut a = make(&pa);
        run(&mut a, &pa, 0..2);
        a.save(&path).unwrap();

        // Different shape.
        let mut pb = fresh_params();
        pb[1] = param(&[1.0, 2.0, 3.0], &[3]);
        let mut b = make(&pb);
        let e = format!("{:#}", b.load(&path).unwrap_err());
        assert!(e.contains("shape [2] in the file but [3]"), "{e}");
        assert_eq!(b.step_count(), 0);

        // Different parameter count.
        let pc = fresh_params();
        let mut c = AdamW::new(
            vec![
                ParamGroup::new("backbone", vec![pc[0].shallow_clone()], 1e-2, 0.1),
                ParamGroup::new("router_bias", vec![pc[2].shallow_clone()], 3e-2, 0.0),
            ],
            AdamWConfig::default(),
        )
        .unwrap();
        let e = format!("{:#}", c.load(&path).unwrap_err());
        assert!(e.contains("2 parameters in the file but 1"), "{e}");

        // Different group count.
        let mut d = AdamW::new(
            vec![ParamGroup::new("backbone", fresh_params(), 1e-2, 0.1)],
            AdamWConfig::default(),
        )
        .unwrap();
        let e = format!("{:#}", d.load(&path).unwrap_err());
        assert!(e.contains("2 parameter groups"), "{e}");

        // Missing and damaged files.
        let mut ok = make(&fresh_params());
        assert!(ok.load(&dir.join("missing.safetensors")).is_err());
        let junk = dir.join("junk.safetensors");
        std::fs::write(&junk, b"not a safetensors file").unwrap();
        assert!(ok.load(&junk).is_err());
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&junk, &bytes[..bytes.len() - 4]).unwrap();
        assert!(ok.load(&junk).is_err());
        assert_eq!(ok.step_count(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
