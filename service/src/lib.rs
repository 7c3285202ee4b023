//! Plumbing both Portcullis services share, and nothing of either's domain: the tamper-evident
//! audit trail and its sinks ([`audit`]), what `SIGHUP` does ([`signal`]), secrets read from
//! files and held safely ([`secrets`]), the `[log]` table ([`log`]), time formatting
//! ([`time`]), the headers of the internal gateway → storage hop ([`hop`]) and configuration
//! keys from the environment ([`env_config`]).
//!
//! The gateway and the storage service depend on this crate; neither on the other for it
//! (the gateway depends on `storage-backend` only to embed it in `gateway dev`).

pub mod audit;
pub mod env_config;
pub mod hop;
pub mod log;
pub mod secrets;
pub mod signal;
pub mod time;
