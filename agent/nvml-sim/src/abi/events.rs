//! Event sets: `nvmlEventSetCreate`, `nvmlDeviceRegisterEvents`,
//! `nvmlEventSetWait_v2`, `nvmlEventSetFree`.
//!
//! A set is a boxed [`EventSet`] handed out as the opaque pointer. It
//! remembers, per registered GPU, the event mask and the highest event
//! sequence number at registration time (only later events are delivered),
//! plus the last sequence number it delivered. Waiting polls the state every
//! [`POLL`] until an event matches or the timeout passes.

use super::{
    guard, position, snapshot, with_gpu, INVALID_ARGUMENT, NOT_SUPPORTED, SUCCESS, TIMEOUT,
    UNINITIALIZED,
};
use crate::state::{State, EVENT_DBE, EVENT_SBE, EVENT_XID};
use nvml_wrapper_sys::bindings::*;
use std::ffi::{c_uint, c_ulonglong};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a waiting set looks at the state again (each look re-reads
/// the state file: 10 a second keeps a waiting agent near idle, and an XID
/// still arrives well within a poll of the agent).
const POLL: Duration = Duration::from_millis(100);

struct Registration {
    gpu: u32,
    mask: u64,
    after_seq: u64,
}

#[derive(Default)]
struct Inner {
    registrations: Vec<Registration>,
    delivered: u64,
}

/// What an `nvmlEventSet_t` points at.
#[derive(Default)]
pub(crate) struct EventSet {
    inner: Mutex<Inner>,
}

impl EventSet {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next deliverable event: (seq, gpu position, type, data).
    fn next(&self, state: &State) -> Option<(u64, usize, u64, u64)> {
        let mut inner = self.lock();
        let found = state.events.iter().find_map(|e| {
            if e.seq <= inner.delivered {
                return None;
            }
            let wanted = inner
                .registrations
                .iter()
                .any(|r| r.gpu == e.gpu && e.seq > r.after_seq && r.mask & e.event_type != 0);
            if !wanted {
                return None;
            }
            let pos = state.gpus.iter().position(|g| g.index == e.gpu)?;
            Some((e.seq, pos, e.event_type, e.xid))
        })?;
        inner.delivered = found.0;
        Some(found)
    }
}

/// The set behind a handle, or `None` for null.
///
/// # Safety
/// `set` is null or a pointer from `nvmlEventSetCreate` not yet freed.
unsafe fn set_ref<'a>(set: nvmlEventSet_t) -> Option<&'a EventSet> {
    // SAFETY: per this function's contract the pointer is null or a live
    // `Box<EventSet>` created by `nvmlEventSetCreate`.
    unsafe { set.cast::<EventSet>().as_ref() }
}

/// `nvmlEventSetCreate`.
#[no_mangle]
pub unsafe extern "C" fn nvmlEventSetCreate(set: *mut nvmlEventSet_t) -> nvmlReturn_t {
    guard(|| {
        if set.is_null() {
            return INVALID_ARGUMENT;
        }
        if !super::initialized() {
            return UNINITIALIZED;
        }
        let boxed = Box::into_raw(Box::<EventSet>::default());
        // SAFETY: non-null and writable per NVML's contract.
        unsafe { set.write(boxed.cast()) };
        SUCCESS
    })
}

/// `nvmlDeviceRegisterEvents`: adds `types` for `device` to the set.
/// Types the GPU does not support make it `NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceRegisterEvents(
    device: nvmlDevice_t,
    types: c_ulonglong,
    set: nvmlEventSet_t,
) -> nvmlReturn_t {
    guard(|| {
        // SAFETY: `set` is null or live (NVML's contract).
        let Some(set) = (unsafe { set_ref(set) }) else {
            return INVALID_ARGUMENT;
        };
        with_gpu(device, false, |state, g| {
            let supported = EVENT_XID
                | if g.ecc.enabled {
                    EVENT_SBE | EVENT_DBE
                } else {
                    0
                };
            if types & !supported != 0 {
                return NOT_SUPPORTED;
            }
            let mut inner = set.lock();
            match inner.registrations.iter_mut().find(|r| r.gpu == g.index) {
                Some(r) => r.mask |= types,
                None => inner.registrations.push(Registration {
                    gpu: g.index,
                    mask: types,
                    after_seq: state.max_seq(),
                }),
            }
            SUCCESS
        })
    })
}

/// `nvmlEventSetWait_v2`: the next registered event in sequence order, or
/// `TIMEOUT` after `timeout_ms`.
#[no_mangle]
pub unsafe extern "C" fn nvmlEventSetWait_v2(
    set: nvmlEventSet_t,
    data: *mut nvmlEventData_t,
    timeout_ms: c_uint,
) -> nvmlReturn_t {
    guard(|| {
        // SAFETY: `set` is null or live (NVML's contract).
        let Some(set) = (unsafe { set_ref(set) }) else {
            return INVALID_ARGUMENT;
        };
        if data.is_null() {
            return INVALID_ARGUMENT;
        }
        let deadline = Instant::now() + Duration::from_millis(u64::from(timeout_ms));
        loop {
            let state = match snapshot() {
                Ok(s) => s,
                Err(e) => return e,
            };
            if let Some((_, pos, event_type, xid)) = set.next(&state) {
                let event = nvmlEventData_t {
                    device: super::handle(pos),
                    eventType: event_type,
                    eventData: xid,
                    gpuInstanceId: 0,
                    computeInstanceId: 0,
                };
                debug_assert!(position(&state, event.device).is_some());
                // SAFETY: non-null and writable per NVML's contract.
                unsafe { data.write(event) };
                return SUCCESS;
            }
            let now = Instant::now();
            if now >= deadline {
                return TIMEOUT;
            }
            std::thread::sleep(POLL.min(deadline - now));
        }
    })
}

/// `nvmlEventSetFree`: releases the set (even after shutdown, so nothing
/// leaks; the return code then says `UNINITIALIZED`).
#[no_mangle]
pub unsafe extern "C" fn nvmlEventSetFree(set: nvmlEventSet_t) -> nvmlReturn_t {
    guard(|| {
        if set.is_null() {
            return INVALID_ARGUMENT;
        }
        // SAFETY: a pointer from `nvmlEventSetCreate`, freed only once
        // (NVML's contract), so it is a live `Box<EventSet>`.
        drop(unsafe { Box::from_raw(set.cast::<EventSet>()) });
        if super::initialized() {
            SUCCESS
        } else {
            UNINITIALIZED
        }
    })
}
