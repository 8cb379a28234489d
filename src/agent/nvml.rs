//! GPU health from NVML, loaded at run time with `dlopen`: a machine without the NVIDIA driver
//! (or a CPU standby) simply has no GPU data; that is not an error.
//!
//! A fault is fatal — the GPU agent asks for an immediate failover — when NVML reports a critical
//! Xid that means the GPU is unusable (fallen off the bus, double-bit ECC, contained/uncontained
//! ECC, NVLink or GSP failures), a new uncorrectable ECC error since the agent started, or a
//! device that is lost.

use std::ffi::{CStr, c_char, c_int, c_uint, c_ulonglong, c_void};

use crate::proto::GpuHealth;

type Ret = c_int;
type Device = *mut c_void;
type EventSet = *mut c_void;

const SUCCESS: Ret = 0;
const ERROR_TIMEOUT: Ret = 10;
const ERROR_GPU_IS_LOST: Ret = 15;
const EVENT_XID_CRITICAL: c_ulonglong = 0x8;
const MEMORY_ERROR_UNCORRECTED: c_int = 1;
const VOLATILE_ECC: c_int = 0;

/// Xids after which a GPU cannot be trusted with work (NVIDIA's Xid catalogue).
pub const FATAL_XIDS: &[u64] = &[48, 61, 62, 63, 64, 74, 79, 92, 94, 95, 119, 120, 140];

#[repr(C)]
#[derive(Default)]
struct Utilization {
    gpu: c_uint,
    memory: c_uint,
}

#[repr(C)]
struct EventData {
    device: Device,
    event_type: c_ulonglong,
    event_data: c_ulonglong,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

struct Fns {
    shutdown: unsafe extern "C" fn() -> Ret,
    count: unsafe extern "C" fn(*mut c_uint) -> Ret,
    handle: unsafe extern "C" fn(c_uint, *mut Device) -> Ret,
    utilization: unsafe extern "C" fn(Device, *mut Utilization) -> Ret,
    ecc: unsafe extern "C" fn(Device, c_int, c_int, *mut c_ulonglong) -> Ret,
    set_create: unsafe extern "C" fn(*mut EventSet) -> Ret,
    register: unsafe extern "C" fn(Device, c_ulonglong, EventSet) -> Ret,
    wait: unsafe extern "C" fn(EventSet, *mut EventData, c_uint) -> Ret,
}

pub struct Nvml {
    lib: *mut c_void,
    f: Fns,
    devices: Vec<Device>,
    ecc_baseline: Vec<u64>,
    events: Option<EventSet>,
    fatal: Option<String>,
}

// SAFETY: NVML is thread-safe; the handles are plain identifiers owned by this value.
unsafe impl Send for Nvml {}

unsafe fn sym<T: Copy>(lib: *mut c_void, name: &CStr) -> Option<T> {
    let p = unsafe { libc::dlsym(lib, name.as_ptr()) };
    if p.is_null() {
        None
    } else {
        Some(unsafe { std::mem::transmute_copy::<*mut c_void, T>(&p) })
    }
}

impl Nvml {
    /// Loads NVML; `None` when the library or a device is not there.
    pub fn open() -> Option<Nvml> {
        let lib = unsafe {
            libc::dlopen(
                c"libnvidia-ml.so.1".as_ptr() as *const c_char,
                libc::RTLD_NOW | libc::RTLD_LOCAL,
            )
        };
        if lib.is_null() {
            tracing::debug!("NVML not found: no GPU health data");
            return None;
        }
        let loaded = unsafe {
            (|| {
                let init: unsafe extern "C" fn() -> Ret = sym(lib, c"nvmlInit_v2")?;
                let f = Fns {
                    shutdown: sym(lib, c"nvmlShutdown")?,
                    count: sym(lib, c"nvmlDeviceGetCount_v2")?,
                    handle: sym(lib, c"nvmlDeviceGetHandleByIndex_v2")?,
                    utilization: sym(lib, c"nvmlDeviceGetUtilizationRates")?,
                    ecc: sym(lib, c"nvmlDeviceGetTotalEccErrors")?,
                    set_create: sym(lib, c"nvmlEventSetCreate")?,
                    register: sym(lib, c"nvmlDeviceRegisterEvents")?,
                    wait: sym(lib, c"nvmlEventSetWait_v2")?,
                };
                if init() != SUCCESS {
                    return None;
                }
                Some(f)
            })()
        };
        let Some(f) = loaded else {
            tracing::warn!(
                "NVML present but unusable (missing symbols or init failed): no GPU health data"
            );
            unsafe { libc::dlclose(lib) };
            return None;
        };
        let mut n: c_uint = 0;
        if unsafe { (f.count)(&mut n) } != SUCCESS {
            n = 0;
        }
        let mut devices = Vec::new();
        for i in 0..n {
            let mut d: Device = std::ptr::null_mut();
            if unsafe { (f.handle)(i, &mut d) } == SUCCESS {
                devices.push(d);
            }
        }
        let mut ecc_baseline = Vec::new();
        for d in &devices {
            let mut c: c_ulonglong = 0;
            let r = unsafe { (f.ecc)(*d, MEMORY_ERROR_UNCORRECTED, VOLATILE_ECC, &mut c) };
            ecc_baseline.push(if r == SUCCESS { c } else { 0 });
        }
        let mut set: EventSet = std::ptr::null_mut();
        let events = if unsafe { (f.set_create)(&mut set) } == SUCCESS {
            for d in &devices {
                unsafe { (f.register)(*d, EVENT_XID_CRITICAL, set) };
            }
            Some(set)
        } else {
            None
        };
        tracing::info!(devices = devices.len(), "NVML loaded: reporting GPU health");
        Some(Nvml {
            lib,
            f,
            devices,
            ecc_baseline,
            events,
            fatal: None,
        })
    }

    /// Samples health now (drains pending Xid events without waiting).
    pub fn sample(&mut self) -> GpuHealth {
        let mut util_sum = 0u32;
        for (i, d) in self.devices.iter().enumerate() {
            let mut u = Utilization::default();
            match unsafe { (self.f.utilization)(*d, &mut u) } {
                SUCCESS => util_sum += u.gpu,
                ERROR_GPU_IS_LOST => {
                    self.fatal
                        .get_or_insert_with(|| format!("GPU {i} is lost (fell off the bus)"));
                }
                _ => {}
            }
            let mut c: c_ulonglong = 0;
            if unsafe { (self.f.ecc)(*d, MEMORY_ERROR_UNCORRECTED, VOLATILE_ECC, &mut c) }
                == SUCCESS
                && c > self.ecc_baseline[i]
            {
                self.fatal.get_or_insert_with(|| {
                    format!(
                        "GPU {i}: {} new uncorrectable ECC error(s)",
                        c - self.ecc_baseline[i]
                    )
                });
            }
        }
        if let Some(set) = self.events {
            loop {
                let mut ev = EventData {
                    device: std::ptr::null_mut(),
                    event_type: 0,
                    event_data: 0,
                    gpu_instance_id: 0,
                    compute_instance_id: 0,
                };
                match unsafe { (self.f.wait)(set, &mut ev, 0) } {
                    SUCCESS => {
                        if ev.event_type & EVENT_XID_CRITICAL != 0 {
                            tracing::warn!(xid = ev.event_data, "NVML reported a critical Xid");
                            if FATAL_XIDS.contains(&ev.event_data) {
                                self.fatal
                                    .get_or_insert_with(|| format!("Xid {}", ev.event_data));
                            }
                        }
                    }
                    ERROR_TIMEOUT => break,
                    _ => break,
                }
            }
        }
        let count = self.devices.len() as u32;
        GpuHealth {
            count,
            utilization: util_sum.checked_div(count).unwrap_or(0),
            fatal: self.fatal.is_some(),
            fatal_reason: self.fatal.clone().unwrap_or_default(),
        }
    }
}

impl Drop for Nvml {
    fn drop(&mut self) {
        unsafe {
            (self.f.shutdown)();
            libc::dlclose(self.lib);
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
