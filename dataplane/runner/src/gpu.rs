//! GPU health through NVML (feature `nvml`): memory in use, ECC error counts, temperature and
//! power, sampled once a second on a thread of its own and folded into the Health signal.
//! Without the feature, or without an NVIDIA driver, there is no GPU sample.

use mantle_proto::GpuStatus;
use tokio::sync::watch;

/// The latest GPU reading.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GpuSample {
    pub status: GpuStatus,
    /// Uncorrectable ECC errors counted in the last hour.
    pub uncorrected_ecc_last_hour: u64,
}

/// Starts sampling GPU `index`; the receiver holds `None` when no GPU can be read.
#[cfg(feature = "nvml")]
pub fn spawn_sampler(index: u32) -> watch::Receiver<Option<GpuSample>> {
    use std::time::{Duration, Instant};

    use nvml_wrapper::Nvml;
    use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, TemperatureSensor};

    let (tx, rx) = watch::channel(None);
    let nvml = match Nvml::init() {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "NVML is not available; GPU health is not reported");
            return rx;
        }
    };
    let spawned = std::thread::Builder::new().name("mantle-nvml".into()).spawn(move || {
        let mut ecc_rate = crate::health::HourlyRate::default();
        loop {
            let sample = nvml.device_by_index(index).and_then(|d| {
                let memory = d.memory_info()?;
                let ecc = |kind| d.total_ecc_errors(kind, EccCounter::Aggregate).unwrap_or(0);
                let uncorrected = ecc(MemoryError::Uncorrected);
                Ok(GpuSample {
                    status: GpuStatus {
                        memory_used_bytes: memory.used,
                        memory_total_bytes: memory.total,
                        ecc_errors_corrected: ecc(MemoryError::Corrected),
                        ecc_errors_uncorrected: uncorrected,
                        temperature_celsius: d.temperature(TemperatureSensor::Gpu).unwrap_or(0),
                        power_milliwatts: d.power_usage().unwrap_or(0),
                    },
                    uncorrected_ecc_last_hour: ecc_rate.observe(Instant::now(), uncorrected),
                })
            });
            match sample {
                Ok(s) => {
                    if tx.send(Some(s)).is_err() {
                        return;
                    }
                }
                Err(e) => tracing::warn!(error = %e, index, "reading the GPU through NVML failed"),
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "could not start the NVML sampler");
    }
    rx
}

/// Starts sampling GPU `index`; without the `nvml` feature there is never a sample.
#[cfg(not(feature = "nvml"))]
pub fn spawn_sampler(_index: u32) -> watch::Receiver<Option<GpuSample>> {
    watch::channel(None).1
}
