//! Where a worker runs: a device as the configuration names it (`"cpu"`,
//! `"cuda:N"`), and the candle device it opens. CUDA needs the `cuda`
//! feature (`make build-cuda`); a build without it refuses a CUDA device at
//! start-up, naming the setting.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// One entry of a model's `devices`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceKind {
    Cpu,
    /// The NVIDIA GPU with this ordinal.
    Cuda(usize),
}

impl DeviceKind {
    /// Whether this build can open the device (CUDA needs the `cuda` feature).
    pub fn supported(&self) -> Result<(), String> {
        match self {
            DeviceKind::Cpu => Ok(()),
            DeviceKind::Cuda(_) if cfg!(feature = "cuda") => Ok(()),
            DeviceKind::Cuda(_) => Err(format!(
                "{self} needs a build with the cuda feature (`make build-cuda`); this one runs on \"cpu\" only"
            )),
        }
    }

    /// Opens the device (a CUDA context on its GPU).
    pub fn open(&self) -> Result<candle_core::Device, String> {
        self.supported()?;
        match self {
            DeviceKind::Cpu => Ok(candle_core::Device::Cpu),
            DeviceKind::Cuda(i) => {
                candle_core::Device::new_cuda(*i).map_err(|e| format!("opening {self}: {e}"))
            }
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceKind::Cpu => f.write_str("cpu"),
            DeviceKind::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl FromStr for DeviceKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "cpu" {
            return Ok(DeviceKind::Cpu);
        }
        match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Ok(DeviceKind::Cuda(i)),
            _ => Err(format!("a device is \"cpu\" or \"cuda:N\" (N the GPU's ordinal); got {s:?}")),
        }
    }
}

impl TryFrom<String> for DeviceKind {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<DeviceKind> for String {
    fn from(d: DeviceKind) -> String {
        d.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_named_cpu_or_cuda_with_an_ordinal() {
        assert_eq!("cpu".parse::<DeviceKind>(), Ok(DeviceKind::Cpu));
        assert_eq!("cuda:1".parse::<DeviceKind>(), Ok(DeviceKind::Cuda(1)));
        assert_eq!(DeviceKind::Cuda(3).to_string(), "cuda:3");
        for bad in ["gpu", "cuda", "cuda:x", "CPU"] {
            assert!(bad.parse::<DeviceKind>().unwrap_err().contains("\"cuda:N\""), "{bad}");
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_build_without_cuda_refuses_a_gpu_and_says_how_to_get_one() {
        assert!(DeviceKind::Cpu.open().is_ok());
        let err = DeviceKind::Cuda(0).open().unwrap_err();
        assert!(err.contains("cuda:0") && err.contains("make build-cuda"), "{err}");
    }
}
