//! Weight matrices and the one matmul every projection goes through, with the
//! storage format chosen at load (as stored, re-quantised to Q8_0, or dense
//! in f32, f16 or bf16).

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor};

/// How projection weights are held in memory. Chosen once per model at load.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum WeightFormat {
    /// Q8_0 for quantized files (the fastest CPU kernels, near-lossless),
    /// f32 for f32/f16/bf16 checkpoints.
    #[default]
    Auto,
    /// Exactly the tensor types in the file, through candle's kernels.
    Stored,
    /// Re-quantised to Q8_0 at load.
    #[value(name = "q8_0")]
    #[serde(rename = "q8_0")]
    Q8_0,
    /// Dequantised to dense f32 at load.
    F32,
    /// Dense f16 (quantized files dequantised at load); activations in f16.
    F16,
    /// Dense bf16 (quantized files dequantised at load); activations in bf16.
    Bf16,
}

/// The format a given checkpoint ends up with once `Auto` is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Storage {
    Stored,
    Q8_0,
    F32,
    F16,
    Bf16,
}

impl Storage {
    /// The dtype of the activations between layers (and of the KV cache).
    /// Quantized matmuls take f32 inputs, so only dense half weights run
    /// half activations.
    pub(crate) fn activation_dtype(self) -> DType {
        match self {
            Storage::F16 => DType::F16,
            Storage::Bf16 => DType::BF16,
            Storage::Stored | Storage::Q8_0 | Storage::F32 => DType::F32,
        }
    }
}

impl WeightFormat {
    /// `Auto` on a GPU is bf16: it has f32's exponent range, so the residual
    /// stream of models with large outlier activations (Qwen2.5's reach the
    /// thousands, and their squares overflow f16 in a norm) cannot turn to
    /// inf, and HF checkpoints are published in bf16, so dense weights load
    /// without rounding. f16 keeps three more mantissa bits and is there to
    /// ask for. On the CPU `Auto` is what it always was.
    pub(crate) fn resolve(self, file_is_quantized: bool, device: &Device) -> Storage {
        match self {
            WeightFormat::Auto if !device.is_cpu() => Storage::Bf16,
            WeightFormat::Auto if file_is_quantized => Storage::Q8_0,
            WeightFormat::Auto => Storage::F32,
            WeightFormat::Stored => Storage::Stored,
            WeightFormat::Q8_0 => Storage::Q8_0,
            WeightFormat::F32 => Storage::F32,
            WeightFormat::F16 => Storage::F16,
            WeightFormat::Bf16 => Storage::Bf16,
        }
    }

    /// The name the configuration and the command line use.
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::Auto => "auto",
            WeightFormat::Stored => "stored",
            WeightFormat::Q8_0 => "q8_0",
            WeightFormat::F32 => "f32",
            WeightFormat::F16 => "f16",
            WeightFormat::Bf16 => "bf16",
        }
    }
}

/// True when candle's repacked Q8_0 kernel (AVX512-VNNI or AVX-VNNI tiles of
/// 16 rows) runs on this CPU. That kernel only takes inner dimensions that
/// are multiples of 256; elsewhere Q8_0 falls back to a per-row dot product
/// about 3x slower, so padding the inner dimension with zero columns pays.
fn vnni_tiles_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        (is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni"))
            || (is_x86_feature_detected!("avxvnni") && is_x86_feature_detected!("avx2"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

const VNNI_K_MULTIPLE: usize = 256;
const VNNI_N_MULTIPLE: usize = 16;

#[derive(Debug, Clone)]
enum Kind {
    Quantized(QMatMul),
    /// `(out, in)` in the activation dtype.
    Dense(Tensor),
}

/// `y = x W^T (+ b)` for `x` of shape `(rows, in)`.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    kind: Kind,
    bias: Option<Tensor>,
    in_dim: usize,
    /// Inner dimension of the stored weights (>= `in_dim` when zero-padded).
    stored_in: usize,
    span: tracing::Span,
}

impl Linear {
    pub(crate) fn from_qtensor(q: QTensor, storage: Storage, bias: Option<Tensor>) -> Result<Self> {
        let (_out, in_dim) = q.shape().dims2()?;
        match storage {
            Storage::Stored => Self::quantized(QMatMul::from_qtensor(q)?, in_dim, in_dim, bias),
            Storage::Q8_0 | Storage::F32 | Storage::F16 | Storage::Bf16 => {
                let w = q.dequantize(&q.device())?;
                Self::from_dense(w, storage, bias)
            }
        }
    }

    pub(crate) fn from_dense(w: Tensor, storage: Storage, bias: Option<Tensor>) -> Result<Self> {
        let act = storage.activation_dtype();
        let (out, in_dim) = w.dims2()?;
        let q8_ok = in_dim % GgmlDType::Q8_0.block_size() == 0;
        match storage {
            Storage::Q8_0 if q8_ok => {
                let w = w.to_dtype(DType::F32)?;
                // The tiles are a CPU kernel; CUDA's Q8_0 kernels take any multiple of 32.
                let pad = if w.device().is_cpu() && vnni_tiles_available() && out % VNNI_N_MULTIPLE == 0 {
                    in_dim.next_multiple_of(VNNI_K_MULTIPLE) - in_dim
                } else {
                    0
                };
                let w = if pad > 0 { w.pad_with_zeros(1, 0, pad)? } else { w };
                let q = QTensor::quantize(&w, GgmlDType::Q8_0)?;
                Self::quantized(QMatMul::from_qtensor(q)?, in_dim, in_dim + pad, bias)
            }
            // Stored dense tensors, a dense format asked for, or shapes Q8_0 cannot hold.
            _ => Ok(Self {
                kind: Kind::Dense(w.to_dtype(act)?),
                bias: bias.map(|b| b.to_dtype(act)).transpose()?,
                in_dim,
                stored_in: in_dim,
                span: tracing::span!(tracing::Level::TRACE, "linear"),
            }),
        }
    }

    fn quantized(m: QMatMul, in_dim: usize, stored_in: usize, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self {
            kind: Kind::Quantized(m),
            bias: bias.map(|b| b.to_dtype(DType::F32)).transpose()?,
            in_dim,
            stored_in,
            span: tracing::span!(tracing::Level::TRACE, "qmatmul"),
        })
    }

    /// Bytes of weights (and bias) one forward pass reads.
    pub(crate) fn bytes(&self) -> usize {
        let dense = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let w = match &self.kind {
            Kind::Quantized(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            Kind::Quantized(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) | Kind::Dense(t) => dense(t),
        };
        w + self.bias.as_ref().map_or(0, dense)
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _enter = self.span.enter();
        debug_assert_eq!(x.dim(1)?, self.in_dim);
        let y = match &self.kind {
            Kind::Quantized(m) if self.stored_in > self.in_dim => {
                m.forward(&x.pad_with_zeros(1, 0, self.stored_in - self.in_dim)?)?
            }
            Kind::Quantized(m) => m.forward(x)?,
            Kind::Dense(w) => x.matmul(&w.t()?)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}
