//! Replays the fuzz harnesses (`fuzz/src/lib.rs`) in plain `cargo test`: on their seeds,
//! on every committed corpus file (seeds and `regression-*` inputs from fixed crashes), and
//! checks that the committed seeds match what the harness generates.
//!
//! Regenerate the seed files after changing the fixtures or the input format with
//! `UPDATE_SEEDS=1 cargo test -p idm-core --test fuzz_corpus`.

#[path = "../fuzz/src/lib.rs"]
mod harness;

use std::path::{Path, PathBuf};

/// A fuzz target: its name (and corpus directory), harness, and seeds.
struct Target {
    name: &'static str,
    run: fn(&[u8]),
    seeds: Vec<(&'static str, Vec<u8>)>,
}

fn targets() -> [Target; 2] {
    [
        Target { name: "frame_decode", run: harness::frame_decode, seeds: harness::seeds::frame_decode() },
        Target { name: "ring_ops", run: harness::ring_ops, seeds: harness::seeds::ring_ops() },
    ]
}

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target)
}

/// No file access, so this one also runs under Miri.
#[test]
fn seeds_run_cleanly() {
    for target in targets() {
        for (_, bytes) in target.seeds {
            (target.run)(&bytes);
        }
    }
}

#[test]
#[cfg_attr(miri, ignore = "reads files, which Miri's isolation forbids")]
fn committed_seeds_are_current() {
    let update = std::env::var_os("UPDATE_SEEDS").is_some();
    for target in targets() {
        let dir = corpus_dir(target.name);
        for (name, bytes) in target.seeds {
            let path = dir.join(name);
            if update {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &bytes).unwrap();
            } else {
                let committed = std::fs::read(&path).unwrap_or_default();
                assert!(
                    committed == bytes,
                    "{} is missing or stale; regenerate with \
                     `UPDATE_SEEDS=1 cargo test -p idm-core --test fuzz_corpus`",
                    path.display()
                );
            }
        }
    }
}

#[test]
#[cfg_attr(miri, ignore = "reads files, which Miri's isolation forbids")]
fn committed_corpus_replays_cleanly() {
    for target in targets() {
        let mut files: Vec<_> =
            std::fs::read_dir(corpus_dir(target.name)).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        assert!(!files.is_empty(), "no corpus for {}", target.name);
        for path in files {
            let bytes = std::fs::read(&path).unwrap();
            // Name the input that fails, since the panic comes from inside the harness.
            eprintln!("replaying {}", path.display());
            (target.run)(&bytes);
        }
    }
}

/// A brief fuzz run in every `cargo test`: deterministic mutations (bit flips, byte writes,
/// insertions, removals, splices of another seed's tail) of the seeds and the committed
/// corpus. `VGPU_FUZZ_MUTATIONS` per target (default 3000).
#[test]
#[cfg_attr(miri, ignore = "reads files, which Miri's isolation forbids")]
fn mutations_run_cleanly() {
    let n: u64 = std::env::var("VGPU_FUZZ_MUTATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(3000);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for target in targets() {
        let mut inputs: Vec<Vec<u8>> = target.seeds.into_iter().map(|(_, b)| b).collect();
        for entry in std::fs::read_dir(corpus_dir(target.name)).unwrap() {
            inputs.push(std::fs::read(entry.unwrap().path()).unwrap());
        }
        for _ in 0..n {
            let mut input = inputs[next() as usize % inputs.len()].clone();
            for _ in 0..1 + next() % 4 {
                let at = if input.is_empty() { 0 } else { next() as usize % input.len() };
                match next() % 5 {
                    0 if !input.is_empty() => input[at] ^= 1 << (next() % 8),
                    1 if !input.is_empty() => input[at] = next() as u8,
                    2 => input.insert(at, next() as u8),
                    3 if !input.is_empty() => drop(input.remove(at)),
                    _ => {
                        let other = &inputs[next() as usize % inputs.len()];
                        let from = next() as usize % (other.len() + 1);
                        input.truncate(at);
                        input.extend_from_slice(&other[from..]);
                    }
                }
            }
            (target.run)(&input);
        }
    }
}
