//! A minimal guest session against a running host-proxy: attach, allocate, copy a pattern
//! to the device and back through the data window, verify, free. Used by `cargo xtask demo`.
//!
//! Usage: `guest_session SOCKET`

use anyhow::{bail, Context, Result};
use idm_core::{BulkRef, Client, Message, WaitPolicy};
use idm_shm::{ChannelLayout, ShmEndpoint};
use std::time::{Duration, Instant};
use vgpu_proto::generated::*;
use vgpu_proto::*;

fn main() -> Result<()> {
    let socket = std::env::args().nth(1).context("usage: guest_session SOCKET")?;
    let layout = ChannelLayout::new(1 << 20, 64 << 20)?;
    let policy = WaitPolicy { spin_iters: 20_000, timeout: Some(Duration::from_secs(10)) };
    let ShmEndpoint { channel, window, .. } =
        idm_shm::connect(&socket, layout, policy).with_context(|| format!("cannot reach host-proxy at {socket}"))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut client = Client::connect(channel, 512 << 10, &mut buf)?;
    fn send<T: Message, R: Message>(c: &mut idm_shm::ShmClient, b: &mut [u8], m: &T) -> Result<R> {
        Ok(c.call(m, b)?.decode::<R>()?)
    }
    let attach: AttachReply = send(&mut client, &mut buf, &Attach { revision: VGPU_PROTOCOL_REVISION })?;
    println!(
        "attached as zone {} to {:?}{} ({} MiB visible)",
        attach.zone,
        attach.device.name.as_str(),
        if attach.device.simulated { " [simulated test double, not a GPU]" } else { "" },
        attach.device.total_mem >> 20
    );
    let size = 32u64 << 20;
    let CuMemAllocV2Reply { dptr } = send(&mut client, &mut buf, &CuMemAllocV2 { bytesize: size })?;
    let data: Vec<u8> = (0..size as usize).map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[0]).collect();
    let src = BulkRef { offset: 0, len: size };
    let dst = BulkRef { offset: size, len: size };
    window.write(src, &data)?;
    let t = Instant::now();
    let _: Done = send(&mut client, &mut buf, &MemcpyHtoD { dst: dptr, src, stream: Handle(0) })?;
    let _: Done = send(&mut client, &mut buf, &MemcpyDtoH { dst, src: dptr, stream: Handle(0) })?;
    let elapsed = t.elapsed();
    let mut back = vec![0u8; size as usize];
    window.read(dst, &mut back)?;
    if back != data {
        bail!("device copy round trip returned different bytes");
    }
    println!("32 MiB host→device→host round trip verified in {:.1} ms", elapsed.as_secs_f64() * 1e3);
    let t = Instant::now();
    let n = 10_000;
    for _ in 0..n {
        let _: CuMemGetInfoV2Reply = send(&mut client, &mut buf, &CuMemGetInfoV2 {})?;
    }
    println!("{n} synchronous calls: {:.2} µs per call", t.elapsed().as_secs_f64() * 1e6 / n as f64);
    let _: Done = send(&mut client, &mut buf, &CuMemFreeV2 { dptr })?;
    println!("freed; session done");
    Ok(())
}
