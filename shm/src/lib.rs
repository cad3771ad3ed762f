//! Local shared-memory transport (placeholder until written).
