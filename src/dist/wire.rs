//! A compact byte encoding for what ranks gather from each other: numbers,
//! strings, and a rollout's records (everything replay and the logs read;
//! kept inputs are not sent). Reading checks every length.
use crate::policy::records::{LatentRecord, TokenRecord};
use crate::policy::Rollout;
use anyhow::{bail, Result};

#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn f64(&mut self, v: f64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn f32(&mut self, v: f32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn len(&mut self, n: usize) {
        self.i64(n as i64);
    }
    pub fn str(&mut self, s: &str) {
        self.len(s.len());
        self.0.extend_from_slice(s.as_bytes());
    }
    pub fn i64s(&mut self, v: &[i64]) {
        self.len(v.len());
        v.iter().for_each(|&x| self.i64(x));
    }
    pub fn f32s(&mut self, v: &[f32]) {
        self.len(v.len());
        v.iter().for_each(|&x| self.f32(x));
    }

    pub fn rollout(&mut self, ro: &Rollout) {
        self.len(ro.prompts.len());
        ro.prompts.iter().for_each(|p| self.i64s(p));
        self.len(ro.records.len());
        for row in &ro.records {
            self.len(row.len());
            row.iter().for_each(|r| self.record(r));
        }
        self.f64(ro.temperature);
        self.i64(ro.mix_k);
    }

    fn record(&mut self, r: &TokenRecord) {
        self.i64(r.token);
        self.i64(r.mode);
        self.u8(r.forced as u8);
        for x in [r.logp, r.router_logp, r.p_soft, r.entropy, r.topk_entropy] {
            self.f32(x);
        }
        self.i64s(&r.mix_ids);
        self.f32s(&r.mix_weights);
        match &r.latent {
            LatentRecord::None => self.u8(0),
            LatentRecord::Input(v) => {
                self.u8(1);
                self.f32s(v);
            }
            LatentRecord::Hrpo(v) => {
                self.u8(2);
                self.f32s(v);
            }
        }
    }
}

pub struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, at: 0 }
    }

    pub fn done(&self) -> bool {
        self.at == self.buf.len()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() - self.at < n {
            bail!(
                "gathered data ends early (byte {} of {}, {n} more wanted)",
                self.at,
                self.buf.len()
            );
        }
        let s = &self.buf[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    pub fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_le_bytes(self.take(8)?.try_into()?))
    }
    pub fn f64(&mut self) -> Result<f64> {
        Ok(f64::from_le_bytes(self.take(8)?.try_into()?))
    }
    pub fn f32(&mut self) -> Result<f32> {
        Ok(f32::from_le_bytes(self.take(4)?.try_into()?))
    }
    /// A length, checked against what is left (each item takes >= `min` bytes).
    pub fn len(&mut self, min: usize) -> Result<usize> {
        let n = self.i64()?;
        let left = (self.buf.len() - self.at) / min.max(1);
        if n < 0 || n as usize > left {
            bail!(
                "gathered data holds a bad length {n} at byte {}",
                self.at - 8
            );
        }
        Ok(n as usize)
    }
    pub fn str(&mut self) -> Result<String> {
        let n = self.len(1)?;
        Ok(String::from_utf8(self.take(n)?.to_vec())?)
    }
    pub fn i64s(&mut self) -> Result<Vec<i64>> {
        let n = self.len(8)?;
        (0..n).map(|_| self.i64()).collect()
    }
    pub fn f32s(&mut self) -> Result<Vec<f32>> {
        let n = self.len(4)?;
        (0..n).map(|_| self.f32()).collect()
    }

    pub fn rollout(&mut self) -> Result<Rollout> {
        let n = self.len(8)?;
        let prompts = (0..n).map(|_| self.i64s()).collect::<Result<_>>()?;
        let n = self.len(8)?;
        let mut records = Vec::with_capacity(n);
        for _ in 0..n {
            let k = self.len(1)?;
            records.push((0..k).map(|_| self.record()).collect::<Result<Vec<_>>>()?);
        }
        Ok(Rollout {
            prompts,
            records,
            inputs: Vec::new(),
            temperature: self.f64()?,
            mix_k: self.i64()?,
        })
    }

    fn record(&mut self) -> Result<TokenRecord> {
        let (token, mode, forced) = (self.i64()?, self.i64()?, self.u8()? != 0);
        let mut f = [0f32; 5];
        for x in &mut f {
            *x = self.f32()?;
        }
        let (mix_ids, mix_weights) = (self.i64s()?, self.f32s()?);
        let latent = match self.u8()? {
            0 => LatentRecord::None,
            1 => LatentRecord::Input(self.f32s()?),
            2 => LatentRecord::Hrpo(self.f32s()?),
            t => bail!("gathered data holds an unknown latent tag {t}"),
        };
        Ok(TokenRecord {
            token,
            mode,
            forced,
            logp: f[0],
            router_logp: f[1],
            p_soft: f[2],
            entropy: f[3],
            topk_entropy: f[4],
            mix_ids,
            mix_weights,
            latent,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rollout_reads_back_as_written_and_a_cut_one_is_refused() {
        let rec = |token, mode, latent| TokenRecord {
            token,
            mode,
            forced: mode == 0,
            logp: -0.5,
            router_logp: -0.25,
            p_soft: 0.125,
            entropy: 1.5,
            topk_entropy: 0.75,
            mix_ids: vec![token, 7],
            mix_weights: vec![0.6, 0.4],
            latent,
        };
        let ro = Rollout {
            prompts: vec![vec![1, 2, 3], vec![4]],
            records: vec![
                vec![
                    rec(5, 0, LatentRecord::None),
                    rec(6, 1, LatentRecord::Input(vec![0.5, -1.0])),
                ],
                vec![rec(-1, 2, LatentRecord::Hrpo(vec![2.0]))],
            ],
            inputs: Vec::new(),
            temperature: 0.5,
            mix_k: 10,
        };
        let mut w = Writer::default();
        w.rollout(&ro);
        let end = w.0.len();
        w.str("after");
        let mut r = Reader::new(&w.0);
        let back = r.rollout().unwrap();
        assert_eq!(back.prompts, ro.prompts);
        assert_eq!(back.records, ro.records);
        assert_eq!((back.temperature, back.mix_k), (0.5, 10));
        assert_eq!(r.str().unwrap(), "after");
        assert!(r.done());
        for cut in [40, end - 3] {
            let e = Reader::new(&w.0[..cut]).rollout().map(|_| ()).unwrap_err();
            assert!(format!("{e}").contains("gathered data"), "{e}");
        }
    }
}
