//! C ABI (planned)
