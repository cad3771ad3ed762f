//! `SimGpu`: a **test double** of a GPU in host memory, for machines without one.
//!
//! Memory and copy operations behave exactly (allocation, bounds, contents, memsets,
//! streams that complete immediately). It runs no kernels (launches are libvgpu's issue; a
//! small documented set of built-in test kernels will be added there). Nothing measured on
//! it says anything about a real GPU: it reports itself as simulated in [`DeviceInfo`].

use super::{CuError, CuResultOf, GpuBackend};
use std::collections::BTreeMap;
use vgpu_proto::DeviceInfo;

/// Where simulated device addresses start (a recognisable, non-null, high value).
const SIM_BASE: u64 = 0x7e00_0000_0000;
/// Allocation granularity, as CUDA's (allocations are 256-byte aligned at least).
const SIM_ALIGN: u64 = 512;

/// The simulated GPU.
#[derive(Debug)]
pub struct SimGpu {
    total: u64,
    used: u64,
    next_addr: u64,
    allocs: BTreeMap<u64, Vec<u8>>,
    next_stream: u32,
}

impl SimGpu {
    /// A simulated device with `total` bytes of memory.
    pub fn new(total: u64) -> SimGpu {
        SimGpu { total, used: 0, next_addr: SIM_BASE, allocs: BTreeMap::new(), next_stream: 1 }
    }

    /// The allocation holding `[addr, addr + len)`, and the offset of `addr` in it.
    fn locate(&mut self, addr: u64, len: u64) -> CuResultOf<(&mut Vec<u8>, usize)> {
        let (&start, buf) = self.allocs.range_mut(..=addr).next_back().ok_or(CuError::INVALID_VALUE)?;
        let off = addr - start;
        let end = off.checked_add(len).ok_or(CuError::INVALID_VALUE)?;
        if end > buf.len() as u64 {
            return Err(CuError::INVALID_VALUE);
        }
        Ok((buf, off as usize))
    }
}

/// A simulated stream (work completes as it is issued).
#[derive(Debug, PartialEq, Eq)]
pub struct SimStream(u32);

impl GpuBackend for SimGpu {
    type Stream = SimStream;

    fn device_info(&self) -> DeviceInfo {
        let mut name = heapless::String::new();
        let _ = name.push_str("xen-vgpu simulated GPU (test double)");
        DeviceInfo {
            name,
            uuid: *b"vgpu-sim-device!",
            total_mem: self.total,
            cc_major: 9,
            cc_minor: 0,
            driver_version: 13000,
            simulated: true,
        }
    }

    fn mem_get_info(&mut self) -> CuResultOf<(u64, u64)> {
        Ok((self.total - self.used, self.total))
    }

    fn mem_alloc(&mut self, size: u64) -> CuResultOf<u64> {
        if size == 0 {
            return Err(CuError::INVALID_VALUE);
        }
        if size > self.total - self.used {
            return Err(CuError::OUT_OF_MEMORY);
        }
        let len = usize::try_from(size).map_err(|_| CuError::OUT_OF_MEMORY)?;
        let addr = self.next_addr;
        self.next_addr = addr.checked_add(size.div_ceil(SIM_ALIGN) * SIM_ALIGN).ok_or(CuError::OUT_OF_MEMORY)?;
        // Fresh device memory is not zeroed on a real GPU; fill it with a pattern so tests
        // that forget to initialise memory notice.
        self.allocs.insert(addr, vec![0xa5; len]);
        self.used += size;
        Ok(addr)
    }

    fn mem_free(&mut self, dptr: u64) -> CuResultOf<()> {
        let buf = self.allocs.remove(&dptr).ok_or(CuError::INVALID_VALUE)?;
        self.used -= buf.len() as u64;
        Ok(())
    }

    fn copy_htod(&mut self, dst: u64, src: &[u8], _stream: Option<&SimStream>) -> CuResultOf<()> {
        let (buf, off) = self.locate(dst, src.len() as u64)?;
        buf[off..off + src.len()].copy_from_slice(src);
        Ok(())
    }

    fn copy_dtoh(&mut self, dst: &mut [u8], src: u64, _stream: Option<&SimStream>) -> CuResultOf<()> {
        let (buf, off) = self.locate(src, dst.len() as u64)?;
        dst.copy_from_slice(&buf[off..off + dst.len()]);
        Ok(())
    }

    fn copy_dtod(&mut self, dst: u64, src: u64, len: u64, _stream: Option<&SimStream>) -> CuResultOf<()> {
        let mut tmp = vec![0u8; usize::try_from(len).map_err(|_| CuError::INVALID_VALUE)?];
        self.copy_dtoh(&mut tmp, src, None)?;
        self.copy_htod(dst, &tmp, None)
    }

    fn memset_d8(&mut self, dst: u64, value: u8, count: u64, _stream: Option<&SimStream>) -> CuResultOf<()> {
        let (buf, off) = self.locate(dst, count)?;
        buf[off..off + count as usize].fill(value);
        Ok(())
    }

    fn memset_d32(&mut self, dst: u64, value: u32, count: u64, _stream: Option<&SimStream>) -> CuResultOf<()> {
        if dst % 4 != 0 {
            return Err(CuError::INVALID_VALUE);
        }
        let bytes = count.checked_mul(4).ok_or(CuError::INVALID_VALUE)?;
        let (buf, off) = self.locate(dst, bytes)?;
        for w in buf[off..off + bytes as usize].chunks_exact_mut(4) {
            w.copy_from_slice(&value.to_le_bytes());
        }
        Ok(())
    }

    fn synchronize(&mut self) -> CuResultOf<()> {
        Ok(())
    }

    fn stream_create(&mut self, _flags: u32) -> CuResultOf<SimStream> {
        self.next_stream += 1;
        Ok(SimStream(self.next_stream))
    }

    fn stream_synchronize(&mut self, _stream: &SimStream) -> CuResultOf<()> {
        Ok(())
    }

    fn stream_destroy(&mut self, _stream: SimStream) -> CuResultOf<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_behaves_exactly() {
        let mut g = SimGpu::new(1 << 20);
        let a = g.mem_alloc(1000).unwrap();
        let b = g.mem_alloc(1000).unwrap();
        assert_ne!(a, b);
        g.copy_htod(a + 10, &[1, 2, 3], None).unwrap();
        g.memset_d32(b, 0xdead_beef, 4, None).unwrap();
        g.copy_dtod(a + 20, b, 16, None).unwrap();
        let mut out = [0u8; 26];
        g.copy_dtoh(&mut out, a + 10, None).unwrap();
        assert_eq!(&out[..3], &[1, 2, 3]);
        assert_eq!(&out[10..14], &0xdead_beefu32.to_le_bytes());
        assert_eq!(g.copy_htod(a + 999, &[0, 0], None), Err(CuError::INVALID_VALUE));
        assert_eq!(g.mem_alloc(2 << 20), Err(CuError::OUT_OF_MEMORY));
        g.mem_free(a).unwrap();
        assert_eq!(g.mem_free(a), Err(CuError::INVALID_VALUE));
        assert_eq!(g.mem_get_info().unwrap(), ((1 << 20) - 1000, 1 << 20));
    }
}
