//! GPU health from NVML, through `nvml-wrapper`, which loads `libnvidia-ml.so.1` at run time: a
//! machine without the NVIDIA driver (or a CPU standby) simply has no GPU data; that is not an
//! error.
//!
//! A fault is fatal — the GPU agent asks for an immediate failover — when NVML reports a critical
//! Xid that means the GPU is unusable (fallen off the bus, double-bit ECC, contained/uncontained
//! ECC, NVLink or GSP failures), a new uncorrectable ECC error since the agent started, or a
//! device that is lost.

use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError};
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, EventSet};

use crate::proto::GpuHealth;

/// Xids after which a GPU cannot be trusted with work (NVIDIA's Xid catalogue).
pub const FATAL_XIDS: &[u64] = &[48, 61, 62, 63, 64, 74, 79, 92, 94, 95, 119, 120, 140];

/// The value NVML reports for an Xid it does not know (`XidError::Unknown`).
const UNKNOWN_XID: u64 = 999;

/// The devices and their Xid event sets; both borrow the loaded library.
struct Watched<'nvml> {
    devices: Vec<Device<'nvml>>,
    /// One set per device that accepted the registration: `register_events` frees the set it
    /// fails on, so a shared set would be lost to one device that does not support Xid events.
    events: Vec<EventSet<'nvml>>,
}

self_cell::self_cell!(
    /// The library and what was opened through it, dropped in that order's reverse (event sets
    /// freed, then `nvmlShutdown` and the library closed).
    struct Loaded {
        owner: nvml_wrapper::Nvml,
        #[covariant]
        dependent: Watched,
    }
);

pub struct Nvml {
    loaded: Loaded,
    ecc_baseline: Vec<u64>,
    fatal: Option<String>,
}

impl Watched<'_> {
    /// Every device NVML hands out, each registered for critical Xid events.
    fn open(nvml: &nvml_wrapper::Nvml) -> Watched<'_> {
        let count = nvml.device_count().unwrap_or(0);
        let devices: Vec<Device<'_>> = (0..count)
            .filter_map(|i| nvml.device_by_index(i).ok())
            .collect();
        let events = devices
            .iter()
            .filter_map(|d| {
                let set = nvml.create_event_set().ok()?;
                d.register_events(EventTypes::CRITICAL_XID_ERROR, set).ok()
            })
            .collect();
        Watched { devices, events }
    }
}

/// Uncorrectable ECC errors since the driver loaded, when the device counts them.
fn uncorrected_ecc(d: &Device<'_>) -> Option<u64> {
    d.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
        .ok()
}

impl Nvml {
    /// Loads NVML; `None` when the library is not there or does not initialise.
    pub fn open() -> Option<Nvml> {
        let nvml = match nvml_wrapper::Nvml::init() {
            Ok(nvml) => nvml,
            Err(NvmlError::LibloadingError(_)) => {
                tracing::debug!("NVML not found: no GPU health data");
                return None;
            }
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "NVML present but unusable (missing symbols or init failed): no GPU health data"
                );
                return None;
            }
        };
        let loaded = Loaded::new(nvml, Watched::open);
        let devices = &loaded.borrow_dependent().devices;
        let ecc_baseline = devices
            .iter()
            .map(|d| uncorrected_ecc(d).unwrap_or(0))
            .collect();
        tracing::info!(devices = devices.len(), "NVML loaded: reporting GPU health");
        Some(Nvml {
            loaded,
            ecc_baseline,
            fatal: None,
        })
    }

    /// Samples health now (drains pending Xid events without waiting).
    pub fn sample(&mut self) -> GpuHealth {
        let Nvml {
            loaded,
            ecc_baseline,
            fatal,
        } = self;
        let watched = loaded.borrow_dependent();
        let mut util_sum = 0u32;
        for (i, d) in watched.devices.iter().enumerate() {
            match d.utilization_rates() {
                Ok(u) => util_sum += u.gpu,
                Err(NvmlError::GpuLost) => {
                    fatal.get_or_insert_with(|| format!("GPU {i} is lost (fell off the bus)"));
                }
                Err(_) => {}
            }
            if let Some(c) = uncorrected_ecc(d)
                && c > ecc_baseline[i]
            {
                fatal.get_or_insert_with(|| {
                    format!(
                        "GPU {i}: {} new uncorrectable ECC error(s)",
                        c - ecc_baseline[i]
                    )
                });
            }
        }
        for set in &watched.events {
            drain_xids(set, fatal);
        }
        let count = watched.devices.len() as u32;
        GpuHealth {
            count,
            utilization: util_sum.checked_div(count).unwrap_or(0),
            fatal: fatal.is_some(),
            fatal_reason: fatal.clone().unwrap_or_default(),
        }
    }
}

/// Reads the pending events of `set` without waiting (NVML answers "timeout" when none is left;
/// any other error ends the drain too) and records the first fatal Xid.
fn drain_xids(set: &EventSet<'_>, fatal: &mut Option<String>) {
    while let Ok(ev) = set.wait(0) {
        if !ev.event_type.contains(EventTypes::CRITICAL_XID_ERROR) {
            continue;
        }
        let xid = match ev.event_data {
            Some(XidError::Value(xid)) => xid,
            _ => UNKNOWN_XID,
        };
        tracing::warn!(xid, "NVML reported a critical Xid");
        if FATAL_XIDS.contains(&xid) {
            fatal.get_or_insert_with(|| format!("Xid {xid}"));
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn absent_library_is_not_an_error() {
        // On machines without the NVIDIA driver this is None; with it, sampling must work.
        if let Some(mut n) = super::Nvml::open() {
            let h = n.sample();
            assert!(
                !h.fatal,
                "a healthy test machine reported {}",
                h.fatal_reason
            );
        }
    }
}
