//! `Zone`: one guest's GPU state inside its worker process — allocations, handles, quotas —
//! and the dispatch of decoded requests to the backend.
//!
//! Every request is checked here before a backend sees it: device ranges must lie inside
//! one of *this zone's* live allocations (overflow-checked), stream handles must be live in
//! this zone's table, bulk descriptors must lie inside the data window. Nothing in this
//! module trusts the guest, and nothing panics on its input.

use crate::backend::{CuError, CuResultOf, GpuBackend};
use crate::handles::{HandleError, HandleTable};
use idm_core::{DataWindow, SharedMemory};
use std::collections::BTreeMap;
use vgpu_proto::*;

/// Per-zone limits, from configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Quotas {
    /// Device memory the zone may hold, in bytes.
    pub mem_bytes: u64,
    /// Live objects (allocations + streams + …) the zone may hold.
    pub max_handles: u32,
    /// Asynchronous requests accepted before the worker waits for the GPU to catch up.
    pub max_async_in_flight: u32,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas { mem_bytes: 4 << 30, max_handles: 4096, max_async_in_flight: 1024 }
    }
}

/// Largest chunk staged through host memory per copy step.
const STAGING_CHUNK: usize = 4 << 20;

/// A successful reply.
#[derive(Debug, PartialEq, Eq)]
pub enum Response {
    /// Empty success.
    Done(Done),
    /// Attach reply.
    Attach(AttachReply),
    /// Allocation reply.
    MemAlloc(MemAllocReply),
    /// Memory info reply.
    MemInfo(MemInfo),
    /// New handle.
    Handle(HandleReply),
}

/// One zone's state.
pub struct Zone<B: GpuBackend> {
    id: u32,
    backend: B,
    quotas: Quotas,
    /// Live allocations: start address → size.
    allocs: BTreeMap<u64, u64>,
    mem_used: u64,
    streams: HandleTable<B::Stream>,
    async_since_sync: u32,
    staging: Vec<u8>,
}

impl<B: GpuBackend> std::fmt::Debug for Zone<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Zone")
            .field("id", &self.id)
            .field("allocations", &self.allocs.len())
            .field("mem_used", &self.mem_used)
            .field("streams", &self.streams.len())
            .finish()
    }
}

impl From<HandleError> for CuError {
    fn from(e: HandleError) -> Self {
        match e {
            HandleError::Invalid => CuError::INVALID_HANDLE,
            HandleError::QuotaExceeded(_) => CuError::OUT_OF_MEMORY,
        }
    }
}

/// Looks up an optional stream handle (a free function so callers can borrow the table
/// and the backend separately).
fn stream_ref<S>(streams: &HandleTable<S>, h: Option<Handle>) -> CuResultOf<Option<&S>> {
    h.map(|h| streams.get(h).map_err(CuError::from)).transpose()
}

impl<B: GpuBackend> Zone<B> {
    /// A zone with no objects yet.
    pub fn new(id: u32, backend: B, quotas: Quotas) -> Self {
        Zone {
            id,
            backend,
            quotas,
            allocs: BTreeMap::new(),
            mem_used: 0,
            streams: HandleTable::new(quotas.max_handles),
            async_since_sync: 0,
            staging: Vec::new(),
        }
    }

    /// Device memory the zone holds.
    pub fn mem_used(&self) -> u64 {
        self.mem_used
    }

    /// Live objects (allocations and streams).
    pub fn live_objects(&self) -> u64 {
        self.allocs.len() as u64 + u64::from(self.streams.len())
    }

    /// Checks that `[addr, addr + len)` lies inside one of this zone's allocations.
    fn check_range(&self, addr: u64, len: u64) -> CuResultOf<()> {
        let (&start, &size) = self.allocs.range(..=addr).next_back().ok_or(CuError::INVALID_VALUE)?;
        let end = addr.checked_add(len).ok_or(CuError::INVALID_VALUE)?;
        if end > start + size {
            return Err(CuError::INVALID_VALUE);
        }
        Ok(())
    }

    fn stream(&self, h: Option<Handle>) -> CuResultOf<Option<&B::Stream>> {
        stream_ref(&self.streams, h)
    }

    fn staging(&mut self, len: usize) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.staging);
        buf.resize(len.min(STAGING_CHUNK), 0);
        buf
    }

    /// Executes one decoded request. `no_reply` marks asynchronous requests, which count
    /// against the in-flight quota.
    pub fn handle<M: SharedMemory>(
        &mut self,
        req: Request,
        no_reply: bool,
        window: &DataWindow<M>,
    ) -> CuResultOf<Response> {
        if no_reply {
            self.async_since_sync += 1;
            if self.async_since_sync >= self.quotas.max_async_in_flight {
                // Bound the GPU's queue for this zone: wait for it before accepting more.
                self.backend.synchronize()?;
                self.async_since_sync = 0;
            }
        }
        let done = Ok(Response::Done(Done {}));
        match req {
            Request::Attach(a) => {
                if a.revision != VGPU_PROTOCOL_REVISION {
                    return Err(CuError::NOT_SUPPORTED);
                }
                let mut device = self.backend.device_info();
                device.total_mem = device.total_mem.min(self.quotas.mem_bytes);
                Ok(Response::Attach(AttachReply { zone: self.id, device, window_size: window.size() as u64 }))
            }
            Request::MemAlloc(MemAlloc { size }) => {
                if size == 0 {
                    return Err(CuError::INVALID_VALUE);
                }
                if self.mem_used.checked_add(size).is_none_or(|t| t > self.quotas.mem_bytes) {
                    return Err(CuError::OUT_OF_MEMORY);
                }
                if self.live_objects() >= u64::from(self.quotas.max_handles) {
                    return Err(CuError::OUT_OF_MEMORY);
                }
                let dptr = self.backend.mem_alloc(size)?;
                self.allocs.insert(dptr, size);
                self.mem_used += size;
                Ok(Response::MemAlloc(MemAllocReply { dptr }))
            }
            Request::MemFree(MemFree { dptr }) => {
                // Only the exact start of one of this zone's allocations may be freed.
                let size = *self.allocs.get(&dptr).ok_or(CuError::INVALID_VALUE)?;
                self.backend.mem_free(dptr)?;
                self.allocs.remove(&dptr);
                self.mem_used -= size;
                done
            }
            Request::MemGetInfo(_) => {
                let (free, total) = self.backend.mem_get_info()?;
                let quota_left = self.quotas.mem_bytes - self.mem_used;
                Ok(Response::MemInfo(MemInfo { free: free.min(quota_left), total: total.min(self.quotas.mem_bytes) }))
            }
            Request::MemcpyHtoD(MemcpyHtoD { dst, src, stream }) => {
                let (_, len) = window.check(src).map_err(|_| CuError::INVALID_VALUE)?;
                self.check_range(dst, len as u64)?;
                self.stream(stream)?;
                let mut buf = self.staging(len);
                let mut done_bytes = 0usize;
                let result = (|| {
                    while done_bytes < len {
                        let n = (len - done_bytes).min(buf.len());
                        let part = BulkRef { offset: src.offset + done_bytes as u64, len: n as u64 };
                        window.read(part, &mut buf[..n]).map_err(|_| CuError::INVALID_VALUE)?;
                        let s = stream_ref(&self.streams, stream)?;
                        self.backend.copy_htod(dst + done_bytes as u64, &buf[..n], s)?;
                        done_bytes += n;
                    }
                    Ok(())
                })();
                self.staging = buf;
                result.and(done)
            }
            Request::MemcpyDtoH(MemcpyDtoH { dst, src, stream }) => {
                let (_, len) = window.check(dst).map_err(|_| CuError::INVALID_VALUE)?;
                self.check_range(src, len as u64)?;
                self.stream(stream)?;
                let mut buf = self.staging(len);
                let mut done_bytes = 0usize;
                let result = (|| {
                    while done_bytes < len {
                        let n = (len - done_bytes).min(buf.len());
                        let s = stream_ref(&self.streams, stream)?;
                        self.backend.copy_dtoh(&mut buf[..n], src + done_bytes as u64, s)?;
                        let part = BulkRef { offset: dst.offset + done_bytes as u64, len: n as u64 };
                        window.write(part, &buf[..n]).map_err(|_| CuError::INVALID_VALUE)?;
                        done_bytes += n;
                    }
                    Ok(())
                })();
                self.staging = buf;
                result.and(done)
            }
            Request::MemcpyDtoD(MemcpyDtoD { dst, src, len, stream }) => {
                self.check_range(dst, len)?;
                self.check_range(src, len)?;
                let s = stream_ref(&self.streams, stream)?;
                self.backend.copy_dtod(dst, src, len, s)?;
                done
            }
            Request::MemsetD8(MemsetD8 { dst, value, count, stream }) => {
                self.check_range(dst, count)?;
                let s = stream_ref(&self.streams, stream)?;
                self.backend.memset_d8(dst, value, count, s)?;
                done
            }
            Request::MemsetD32(MemsetD32 { dst, value, count, stream }) => {
                self.check_range(dst, count.checked_mul(4).ok_or(CuError::INVALID_VALUE)?)?;
                let s = stream_ref(&self.streams, stream)?;
                self.backend.memset_d32(dst, value, count, s)?;
                done
            }
            Request::CtxSynchronize(_) => {
                self.async_since_sync = 0;
                self.backend.synchronize()?;
                done
            }
            Request::StreamCreate(StreamCreate { flags }) => {
                if self.live_objects() >= u64::from(self.quotas.max_handles) {
                    return Err(CuError::OUT_OF_MEMORY);
                }
                let s = self.backend.stream_create(flags)?;
                match self.streams.insert(s) {
                    Ok(handle) => Ok(Response::Handle(HandleReply { handle })),
                    Err(e) => Err(e.into()),
                }
            }
            Request::StreamSynchronize(StreamSynchronize { stream }) => {
                let s = self.streams.get(stream)?;
                self.backend.stream_synchronize(s)?;
                done
            }
            Request::StreamDestroy(StreamDestroy { stream }) => {
                let s = self.streams.remove(stream)?;
                self.backend.stream_destroy(s)?;
                done
            }
            Request::Unknown(_) => Err(CuError::NOT_SUPPORTED),
        }
    }

    /// Releases everything the zone holds (memory is scrubbed by the backend's free).
    pub fn teardown(&mut self) {
        let streams: Vec<_> = self.streams.drain().collect();
        for s in streams {
            let _ = self.backend.stream_destroy(s);
        }
        for (dptr, _) in std::mem::take(&mut self.allocs) {
            let _ = self.backend.mem_free(dptr);
        }
        self.mem_used = 0;
    }
}

impl<B: GpuBackend> Drop for Zone<B> {
    fn drop(&mut self) {
        self.teardown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::sim::SimGpu;
    use idm_core::region::test_utils::heap_region;

    fn zone(q: Quotas) -> Zone<SimGpu> {
        Zone::new(1, SimGpu::new(1 << 30), q)
    }

    fn alloc(z: &mut Zone<SimGpu>, w: &DataWindow<&idm_core::RawRegion>, size: u64) -> CuResultOf<u64> {
        match z.handle(Request::MemAlloc(MemAlloc { size }), false, w)? {
            Response::MemAlloc(r) => Ok(r.dptr),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn memory_quota_gives_out_of_memory_and_frees_count_again() {
        let (_m, r) = heap_region(4096);
        let w = DataWindow::new(&r);
        let mut z = zone(Quotas { mem_bytes: 1000, ..Quotas::default() });
        let a = alloc(&mut z, &w, 600).unwrap();
        assert_eq!(alloc(&mut z, &w, 401), Err(CuError::OUT_OF_MEMORY));
        assert_eq!(alloc(&mut z, &w, u64::MAX), Err(CuError::OUT_OF_MEMORY));
        alloc(&mut z, &w, 400).unwrap();
        z.handle(Request::MemFree(MemFree { dptr: a }), false, &w).unwrap();
        alloc(&mut z, &w, 600).unwrap();
        assert_eq!(z.mem_used(), 1000);
    }

    #[test]
    fn handle_quota_counts_allocations_and_streams() {
        let (_m, r) = heap_region(4096);
        let w = DataWindow::new(&r);
        let mut z = zone(Quotas { max_handles: 2, ..Quotas::default() });
        alloc(&mut z, &w, 8).unwrap();
        z.handle(Request::StreamCreate(StreamCreate { flags: 0 }), false, &w).unwrap();
        assert_eq!(alloc(&mut z, &w, 8), Err(CuError::OUT_OF_MEMORY));
        assert_eq!(z.handle(Request::StreamCreate(StreamCreate { flags: 0 }), false, &w), Err(CuError::OUT_OF_MEMORY));
    }

    #[test]
    fn ranges_must_stay_inside_one_allocation() {
        let (_m, r) = heap_region(4096);
        let w = DataWindow::new(&r);
        let mut z = zone(Quotas::default());
        let a = alloc(&mut z, &w, 100).unwrap();
        let src = BulkRef { offset: 0, len: 64 };
        let ok = Request::MemcpyHtoD(MemcpyHtoD { dst: a + 36, src, stream: None });
        assert!(z.handle(ok, false, &w).is_ok());
        for dst in [a + 37, a - 1, u64::MAX - 10, 0] {
            let bad = Request::MemcpyHtoD(MemcpyHtoD { dst, src, stream: None });
            assert_eq!(z.handle(bad, false, &w), Err(CuError::INVALID_VALUE), "dst {dst:#x}");
        }
        let outside_window = BulkRef { offset: 4090, len: 10 };
        let bad = Request::MemcpyDtoH(MemcpyDtoH { dst: outside_window, src: a, stream: None });
        assert_eq!(z.handle(bad, false, &w), Err(CuError::INVALID_VALUE));
        let bad = Request::MemsetD32(MemsetD32 { dst: a, value: 0, count: u64::MAX / 2, stream: None });
        assert_eq!(z.handle(bad, false, &w), Err(CuError::INVALID_VALUE));
        let bad = Request::MemFree(MemFree { dptr: a + 4 });
        assert_eq!(z.handle(bad, false, &w), Err(CuError::INVALID_VALUE), "interior pointer");
    }

    #[test]
    fn copies_round_trip_through_the_window() {
        let (_m, r) = heap_region(1 << 16);
        let w = DataWindow::new(&r);
        let mut z = zone(Quotas::default());
        let a = alloc(&mut z, &w, 1000).unwrap();
        let b = alloc(&mut z, &w, 1000).unwrap();
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        w.write(BulkRef { offset: 0, len: 1000 }, &data).unwrap();
        z.handle(
            Request::MemcpyHtoD(MemcpyHtoD { dst: a, src: BulkRef { offset: 0, len: 1000 }, stream: None }),
            false,
            &w,
        )
        .unwrap();
        z.handle(Request::MemcpyDtoD(MemcpyDtoD { dst: b, src: a, len: 1000, stream: None }), true, &w).unwrap();
        z.handle(Request::MemsetD8(MemsetD8 { dst: b, value: 9, count: 10, stream: None }), true, &w).unwrap();
        let out = BulkRef { offset: 2000, len: 1000 };
        z.handle(Request::MemcpyDtoH(MemcpyDtoH { dst: out, src: b, stream: None }), false, &w).unwrap();
        let mut got = vec![0u8; 1000];
        w.read(out, &mut got).unwrap();
        assert_eq!(&got[..10], &[9; 10]);
        assert_eq!(&got[10..], &data[10..]);
    }

    #[test]
    fn stale_and_forged_stream_handles_are_refused() {
        let (_m, r) = heap_region(4096);
        let w = DataWindow::new(&r);
        let mut z = zone(Quotas::default());
        let Response::Handle(HandleReply { handle }) =
            z.handle(Request::StreamCreate(StreamCreate { flags: 0 }), false, &w).unwrap()
        else {
            panic!()
        };
        z.handle(Request::StreamDestroy(StreamDestroy { stream: handle }), false, &w).unwrap();
        for h in [handle, Handle(0), Handle(0xdead_beef_0000_0001)] {
            let r = z.handle(Request::StreamSynchronize(StreamSynchronize { stream: h }), false, &w);
            assert_eq!(r, Err(CuError::INVALID_HANDLE));
        }
    }

    #[test]
    fn unknown_requests_are_not_supported() {
        let (_m, r) = heap_region(4096);
        let w = DataWindow::new(&r);
        let mut z = zone(Quotas::default());
        let r = z.handle(Request::Unknown(idm_core::MessageId(0x0fff)), false, &w);
        assert_eq!(r, Err(CuError::NOT_SUPPORTED));
    }
}
