//! The name a pod's zone gets: its Xen domain's name, which host-proxy uses as the zone's name
//! (a `[[zone]]` entry named like the domain gets its quotas and sharing mode, and sharing
//! groups name zones), so operators can write pods into host-proxy's configuration.
//!
//! A Kubernetes pod's zone is `<namespace>.<name>` (both DNS-1123 labels, unique among live
//! pods); a container started without Kubernetes (`ctr run`) is `ctr.<sandbox id>`. Names
//! are at most [`MAX_LEN`] bytes of `[a-z0-9.-]`: anything else becomes `-`, and a longer name
//! keeps its first bytes and ends in `-` and 8 hex digits of its SHA-256, so two long names
//! that share a prefix still differ.

use crate::backend::PodIdentity;
use sha2::{Digest, Sha256};

/// The longest zone name.
pub const MAX_LEN: usize = 63;

fn clean(s: &str) -> String {
    s.chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '-' })
        .collect()
}

/// The zone (Xen domain) name of a pod.
pub fn zone_name(pod: &PodIdentity) -> String {
    let full = match &pod.name {
        Some(ns_name) => clean(&ns_name.replacen('/', ".", 1)),
        None => format!("ctr.{}", clean(&pod.sandbox_id)),
    };
    if full.len() <= MAX_LEN {
        return full;
    }
    let digest: String = Sha256::digest(full.as_bytes()).iter().take(4).map(|b| format!("{b:02x}")).collect();
    format!("{}-{digest}", &full[..MAX_LEN - 9])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: Option<&str>, id: &str) -> PodIdentity {
        PodIdentity { sandbox_id: id.into(), name: name.map(Into::into), uid: None }
    }

    #[test]
    fn pods_are_named_namespace_dot_name_and_others_by_sandbox() {
        assert_eq!(zone_name(&pod(Some("ml/producer"), "abc")), "ml.producer");
        assert_eq!(zone_name(&pod(None, "c1")), "ctr.c1");
        assert_eq!(zone_name(&pod(None, "My_Container/1")), "ctr.my-container-1");
    }

    #[test]
    fn long_names_are_cut_with_a_digest_and_stay_distinct() {
        let a = zone_name(&pod(Some(&format!("ns/{}", "a".repeat(100))), "x"));
        let b = zone_name(&pod(Some(&format!("ns/{}b", "a".repeat(99))), "x"));
        assert_eq!((a.len(), b.len()), (MAX_LEN, MAX_LEN));
        assert_ne!(a, b);
        assert!(a.starts_with("ns.aaaa"));
        assert!(a.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.'));
    }
}
