//! Parsing of the user-facing device and dtype names.
use anyhow::{bail, Result};
use tch::{Device, Kind};

/// "cpu", "cuda" or "cuda:N" ("cuda" is GPU LOCAL_RANK in a job).
pub fn parse_device(s: &str) -> Result<Device> {
    let device = match s {
        "cpu" => Device::Cpu,
        // In a data-parallel job, each rank's own GPU.
        "cuda" => Device::Cuda(crate::dist::world().local_rank),
        _ => match s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) => Device::Cuda(n),
            None => bail!("unknown device {s:?} (expected cpu, cuda or cuda:N)"),
        },
    };
    if let Device::Cuda(n) = device {
        let count = tch::Cuda::device_count() as usize;
        if n >= count {
            bail!("device {s:?} is not available ({count} CUDA device(s) found)");
        }
    }
    Ok(device)
}

/// "f32", "bf16" or "f16" (also the long torch names).
pub fn parse_dtype(s: &str) -> Result<Kind> {
    Ok(match s {
        "f32" | "float32" | "fp32" => Kind::Float,
        "bf16" | "bfloat16" => Kind::BFloat16,
        "f16" | "float16" | "fp16" => Kind::Half,
        _ => bail!("unknown dtype {s:?} (expected f32, bf16 or f16)"),
    })
}

pub fn dtype_name(k: Kind) -> &'static str {
    match k {
        Kind::Float => "f32",
        Kind::BFloat16 => "bf16",
        Kind::Half => "f16",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert_eq!(parse_dtype("bf16").unwrap(), Kind::BFloat16);
        assert!(parse_device("tpu").unwrap_err().to_string().contains("tpu"));
        assert!(parse_dtype("f8").unwrap_err().to_string().contains("f8"));
    }
}
